"""Host (Python) time per call of each op, measured without a GPU: the ops run on tiny CPU tensors with every Triton
launch stubbed out, so what is timed is the wrapper, the custom-op layers, the checks, dispatch, output allocation
and the launchers' own work up to JITFunction.run (not run itself: that part is Triton's, measure it on a GPU with
scripts/host_overhead.py). Re-check host-overhead changes with it on any machine; to compare two versions, run it
from this checkout against the other (PYTHONPATH=<other checkout>, with sdkernels/kernels linked to its kernels/).
The time is this thread's CPU time, the best of REPEATS short runs, so other processes on the machine barely move it.
    python scripts/host_overhead_cpu.py [--profile] [--calls N]
(--profile: cProfile of each op's calls, by own time)"""
import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)     # the compiled-kernel path, as on a GPU
os.environ.pop("SDKERNELS_POISON_OUTPUTS", None)

import torch  # noqa: E402
import triton.runtime.autotuner  # noqa: E402
import triton.runtime.jit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_overhead  # noqa: E402  (the op cases, shared with the GPU script)

import sdkernels  # noqa: E402
import sdkernels.kernels.launch  # noqa: E402
import sdkernels.kernels.utils  # noqa: E402

REPEATS = 20  # the best of many short runs: robust to other processes taking the CPU


def stub_gpu() -> None:
    """Launches do nothing, autotuning picks the first config without timing, and CPU tensors pass the Triton
    backends' device checks."""
    launch = sdkernels.kernels.launch
    triton.runtime.jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None

    def cached_run(self, *args, grid, warmup, **kwargs):
        # kernels/launch.py's cached launches (no driver here): a stub that sdkernels.replay can record, as it records
        # a cached launch's repeat on a GPU
        if launch.recorder is not None:
            launch.recorder.launched(lambda *a: None, (1, 1, 1), None, (*args, *kwargs.values()))

    launch.CachedLaunchJITFunction.run = cached_run
    launch._stream = lambda device: None
    triton.runtime.autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [1.0, 1.0, 1.0]
    original = sdkernels.kernels.utils.device_ok

    def device_ok(*tensors):
        return all(t is None or t.is_cpu or t.is_cuda for t in tensors)  # as cheap as the real check

    for module in list(sys.modules.values()):  # also where it was imported by name
        if (getattr(module, "__name__", "").startswith("sdkernels")
                and getattr(module, "device_ok", None) is original):
            module.device_ok = device_ok


def host_us(fn, calls: int) -> float:
    """This thread's CPU time per call, the best of REPEATS runs of calls / REPEATS calls each."""
    for _ in range(50):
        fn()
    per_run = max(calls // REPEATS, 1)
    best = float("inf")
    for _ in range(REPEATS):
        start = time.thread_time()
        for _ in range(per_run):
            fn()
        best = min(best, (time.thread_time() - start) / per_run)
    return best * 1e6


def check_backends() -> None:
    """Each op took its fast backend (a reference fallback would time the wrong path)."""
    for op in ("group_norm", "geglu", "linear_geglu", "flash_attention"):
        backend = sdkernels.dispatch.last_backend(op)
        if backend in (None, "reference"):
            sys.exit(f"{op} ran on {backend}, not a Triton backend: the stubs did not take")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    stub_gpu()
    host_overhead.DEVICE = "cpu"
    cases = list(host_overhead.op_cases())
    print(f"host time per call, us (CPU tensors, Triton launches stubbed; torch {torch.__version__})")
    with torch.no_grad():
        for name, ours, _ in cases:
            ours()
        check_backends()
        for name, ours, _ in cases:
            print(f"  {name:20s} {host_us(ours, args.calls):8.1f}")
        if args.profile:
            for name, ours, _ in cases:
                profiler = cProfile.Profile()
                profiler.runcall(lambda: [ours() for _ in range(args.calls)])
                print(f"\n== {name}: {args.calls} calls, by own time")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
