"""Host (Python) cost of one whole UNet step, eager against patched, measured without a GPU: an SD1.5-shaped UNet
(SD1.5's blocks, layers and attention layout at a few channels: head dims 40 and 80, one head) runs on tiny CPU
fp16 tensors with every Triton launch stubbed out (scripts/host_overhead_cpu.py's stubs), so what differs between
the two is the Python and dispatch work around the kernels, which a GPU host pays per step without CUDA graphs
(issue 5). It prints Python function calls per step (deterministic: the metric to cut) and this thread's CPU ms per
step (the best of several runs), and with --profile the patched step's functions by call count and by own time.
    python scripts/host_step_cpu.py [--ops a,b] [--profile] [--rows 40] [--rounds 7] [--flat]
(--flat: also the steps flattened by sdkernels.flat, eager's and patch(flat=True)'s: the Python left around the ops;
with --profile, which op nodes replay their recorded calls, sdkernels.replay)
The patched path differs from a GPU's where a backend exists only there (the CUDA extension's GroupNorm, cuBLAS
choices, the measured backend and step choices: tuning is off on a CPU)."""
import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)     # the compiled-kernel path, as on a GPU
os.environ.pop("SDKERNELS_POISON_OUTPUTS", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_overhead_cpu import stub_gpu  # noqa: E402  (scripts/)

import sdkernels  # noqa: E402
from sdkernels import models, step_choice  # noqa: E402

# SD1.5's UNet (the diffusers defaults: four levels, two ResNet blocks a level, cross-attention in three) at 40-80
# channels, one attention head a block: head dims 40 and 80 as SD1.5's levels have them, groups of 5 and 10 channels.
SD15_SHAPED = dict(sample_size=8, block_out_channels=(40, 80, 80, 80), norm_num_groups=8, cross_attention_dim=32,
                   attention_head_dim=1)
ROUNDS, STEPS = 7, 5


def python_calls(step) -> int:
    """Python-level function calls (cProfile's count, builtins included) of one step."""
    profiler = cProfile.Profile()
    profiler.runcall(step)
    return sum(row[1] for row in pstats.Stats(profiler).stats.values())


def cpu_ms(step, rounds: int = ROUNDS) -> float:
    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(STEPS):
            step()
        best = min(best, (time.thread_time() - start) / STEPS * 1e3)
    return best


def report_replay() -> None:
    """Which flat-graph op nodes replay, and why the others do not (sdkernels.replay)."""
    import collections
    import gc
    from sdkernels.replay import RecordedCall
    states = collections.Counter()
    for obj in gc.get_objects():
        if type(obj) is RecordedCall:
            replays = any(p.__class__ is tuple for p in obj.programs.values())
            states[(obj.op_name, "replays" if replays else f"runs: {obj.why_not}")] += 1
    for (name, state), n in sorted(states.items()):
        print(f"  {n:4d} {name}: {state}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=None, help="comma-separated patchers (default: patch()'s)")
    p.add_argument("--profile", action="store_true", help="the patched step's functions by calls and by own time")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds (the best is kept)")
    p.add_argument("--flat", action="store_true", help="also the flat steps (sdkernels.flat)")
    args = p.parse_args()
    stub_gpu()
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel(**SD15_SHAPED).to(torch.float16).eval().requires_grad_(False)
    call_args, call_kwargs = models.model_inputs(model, 2, 64)
    step = lambda: models.model_call(model, call_args, call_kwargs)  # noqa: E731
    print(f"SD1.5-shaped UNet, batch 2, 8 x 8 latents, fp16 on the CPU, Triton launches stubbed; torch "
          f"{torch.__version__}")
    with torch.no_grad():
        eager = (python_calls(step), cpu_ms(step, args.rounds))
        if args.flat:
            import copy
            from sdkernels import flat
            flat_model = torch.compile(copy.deepcopy(model), backend=flat.flat_backend)
            flat_step = lambda: models.model_call(flat_model, call_args, call_kwargs)  # noqa: E731
            flat_step()  # traced
            print(f"  flat eager: Python calls per step {python_calls(flat_step)}, "
                  f"CPU ms {cpu_ms(flat_step, args.rounds):.2f}")
        sdkernels.patch(model, ops=args.ops.split(",") if args.ops else None)
        step_choice.uninstall(model)  # the patched modules, always
        step()
        patched = (python_calls(step), cpu_ms(step, args.rounds))
        print(f"  Python calls per step: eager {eager[0]}, patched {patched[0]}")
        print(f"  CPU ms per step:       eager {eager[1]:.2f}, patched {patched[1]:.2f}")
        if args.flat:
            sdkernels.patch(model, ops=args.ops.split(",") if args.ops else None, flat=True)
            step_choice.uninstall(model)
            step(), step()  # eager, then traced
            print(f"  flat patched: Python calls per step {python_calls(step)}, CPU ms {cpu_ms(step, args.rounds):.2f}")
            if args.profile:
                report_replay()
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(step)
            for order in ("ncalls", "tottime"):
                print(f"\n== patched step, by {order}")
                pstats.Stats(profiler).sort_stats(order).print_stats(args.rows)


if __name__ == "__main__":
    main()
