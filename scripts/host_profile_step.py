"""Host (CPU) time of one whole UNet step, eager against patched (no CUDA graphs), and where the patched step's host
time goes: the thread's CPU time per step (what a launch-bound step costs) and a cProfile of a few steps.
    python scripts/host_profile_step.py [--model sd15] [--batch 2] [--resolution 512] [--rows 30]
        [--init unit|diffusers] [--ops a,b] [--no-step-choice] [--each [--all-only]] [--compare]
(--each: no profiles; the step's time with each patcher alone, then all, paired against an unpatched copy; the last
row launches every Triton kernel through Triton's own path, kernels/launch.py's cache off; --compare: no cProfile,
each op's and CUDA runtime call's self CPU time in an eager and a patched step, profiled in alternation)"""
import argparse
from collections import Counter
import cProfile
import pstats
import time

import torch

import sdkernels
from sdkernels import models, step_choice
from sdkernels.benchmarking import paired_ms
from sdkernels.kernels import launch

STEPS = 10
ROUNDS = 5


def host_ms(step) -> tuple:
    """(CPU ms of this thread per step, wall ms per step): the best of ROUNDS runs of STEPS back-to-back steps after a
    warm-up (a shared host's other tenants slow some runs down by tens of percent)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    best = (float("inf"), float("inf"))
    for _ in range(ROUNDS):
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(STEPS):
            step()
        cpu = time.thread_time() - cpu
        torch.cuda.synchronize()
        best = min(best, (cpu / STEPS * 1e3, (time.perf_counter() - wall) / STEPS * 1e3))
    return best


class _BackendCounts(dict):
    """dispatch's last-backend record, counting each (op, backend) as it is set."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __setitem__(self, op, backend):
        self.counts[op, backend] += 1
        super().__setitem__(op, backend)


def profile(step, label, rows) -> None:
    from sdkernels import dispatch
    record, dispatch._last_backend = dispatch._last_backend, _BackendCounts()
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [step() for _ in range(5)])
    torch.cuda.synchronize()
    counts, dispatch._last_backend = dispatch._last_backend.counts, record
    print(f"\n== {label}: op calls per step by backend: "
          + ", ".join(f"{op}={backend} x{n / 5:g}" for (op, backend), n in sorted(counts.items())))
    print(f"\n== {label}: 5 steps, by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
    print(f"\n== {label}: 5 steps, sdkernels functions by cumulative time")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats("sdkernels", rows)


def runtime_calls(step, label, rows) -> None:
    """The CUDA runtime/driver calls of 3 steps by self CPU time: a synchronizing call (cudaStreamSynchronize,
    cudaEventSynchronize, cudaFree, cudaMalloc) in a step would show here, where cProfile sees only Python."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"\n== {label}: 3 steps, torch.profiler by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def alternating_op_host_us(steps: dict, rounds: int = 4) -> dict:
    """{label: {op or runtime call: (calls per step, self CPU us per call)}}: torch.profiler around one step of each
    labelled step in turn, ``rounds`` times, the order reversed every other round, so that a host whose speed drifts
    between runs slows every label alike (sequential profiles read the drift as a difference in every op's cost)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    totals = {label: {} for label in steps}
    for r in range(rounds):
        for label in list(steps) if r % 2 == 0 else reversed(list(steps)):
            with torch_profile(activities=activities) as prof:
                steps[label]()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            for event in prof.key_averages():
                calls, us = totals[label].get(event.key, (0, 0.0))
                totals[label][event.key] = (calls + event.count, us + event.self_cpu_time_total)
    return {label: {key: (calls / rounds, us / calls) for key, (calls, us) in ops.items() if calls}
            for label, ops in totals.items()}


def compare_op_host_time(eager_step, patched_step, rows: int) -> None:
    """Each op's and runtime call's host time in an eager and a patched step, profiled in alternation."""
    times = alternating_op_host_us({"eager": eager_step, "patched": patched_step})
    eager, patched = times["eager"], times["patched"]
    total = {key: sum(n * us for n, us in (eager.get(key, (0, 0.0)), patched.get(key, (0, 0.0))))
             for key in set(eager) | set(patched)}
    print("\n== self CPU time per step, eager and patched steps profiled in alternation (calls per step, us per call, "
          "ms per step)")
    print(f"{'':52s} {'eager':>25s} {'patched':>25s}")
    for key in sorted(total, key=total.get, reverse=True)[:rows]:
        cells = []
        for n, us in (eager.get(key, (0, 0.0)), patched.get(key, (0, 0.0))):
            cells.append(f"{n:7.1f} {us:8.2f} {n * us / 1e3:7.3f}")
        print(f"{key[:52]:52s} {cells[0]}   {cells[1]}")
    for label, ops in times.items():
        print(f"{label}: {sum(n * us for n, us in ops.values()) / 1e3:.2f} ms of self CPU time per step in all")


def host_time_by_patcher(model, args) -> None:
    """The step's host and wall time with each patcher alone, all (as patch() leaves the model: with its measured
    step choice), and all with the original modules forced (what the patched modules' wrappers cost), each against
    an unpatched copy of the model."""
    import copy
    from sdkernels.patch import running_originals
    patched_model = copy.deepcopy(model)
    call_args, call_kwargs = models.model_inputs(model, args.batch, args.resolution)
    eager_step = lambda: models.model_call(model, call_args, call_kwargs)  # noqa: E731
    patched_step = lambda: models.model_call(patched_model, call_args, call_kwargs)  # noqa: E731

    def originals_step():
        with running_originals():
            return patched_step()

    def triton_launch_step():  # every Triton launch through JITFunction.run (kernels/launch.py off)
        launch.ENABLED = False
        try:
            return patched_step()
        finally:
            launch.ENABLED = True

    print(f"{args.model} B={args.batch} {args.resolution} px on {torch.cuda.get_device_name()}: ms per step "
          "(medians of alternating runs), CPU time of this thread and wall time")
    rows = [] if args.all_only else [(name, [name], patched_step, False) for name in sdkernels.default_ops()]
    rows += [("all", None, patched_step, False), ("all, as patched", None, patched_step, True),
             ("all, originals", None, originals_step, False),
             ("all, uncached launches", None, triton_launch_step, False)]
    for label, ops, step, with_step_choice in rows:
        sdkernels.patch(patched_model, ops=ops)
        if not with_step_choice:
            step_choice.uninstall(patched_model)
        r = paired_ms(eager_step, step)
        sdkernels.unpatch(patched_model)
        print(f"  {label:16s} CPU eager {r['baseline_cpu']:7.2f} patched {r['cpu']:7.2f} "
              f"({r['cpu_ratio']:.3f}x)   wall eager {r['baseline_wall']:7.2f} patched {r['wall']:7.2f} "
              f"({r['wall_ratio']:.3f}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--init", choices=models.INITS, default="unit", help="random weights as the e2e bench has them")
    p.add_argument("--each", action="store_true", help="host time with each patcher alone, no profiles")
    p.add_argument("--all-only", action="store_true", help="--each: the rows of all patchers only")
    p.add_argument("--ops", default=None, help="comma-separated patchers to apply (default: patch()'s)")
    p.add_argument("--compare", action="store_true",
                   help="each op's host time in eager and patched steps, profiled in alternation, side by side")
    p.add_argument("--no-step-choice", action="store_true",
                   help="profile the patched modules even where patch()'s step choice would run the originals")
    args = p.parse_args()
    with torch.device("cuda"):
        model = models.build(args.model, init=args.init, dtype=torch.float16)
    model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, args.batch, args.resolution)
    step = lambda: models.model_call(model, call_args, call_kwargs)  # noqa: E731
    with torch.no_grad():
        if args.each:
            return host_time_by_patcher(model, args)
        if args.compare:
            import copy
            patched_model = copy.deepcopy(model)
            sdkernels.patch(patched_model, ops=args.ops.split(",") if args.ops else None)
            if args.no_step_choice:
                step_choice.uninstall(patched_model)
            patched_step = lambda: models.model_call(patched_model, call_args, call_kwargs)  # noqa: E731
            for run in (step, patched_step, step, patched_step):  # warm-up (the step choice measures here)
                run()
            return compare_op_host_time(step, patched_step, args.rows)
        eager = host_ms(step)
        profile(step, "eager", args.rows)
        runtime_calls(step, "eager", args.rows)
        sdkernels.patch(model, ops=args.ops.split(",") if args.ops else None)
        if args.no_step_choice:
            step_choice.uninstall(model)
        patched = host_ms(step)
        profile(step, "patched", args.rows)
        runtime_calls(step, "patched", args.rows)
    print(f"\n{args.model} B={args.batch} {args.resolution} px on {torch.cuda.get_device_name()}: host CPU ms per step "
          f"(wall ms): eager {eager[0]:.2f} ({eager[1]:.2f}), patched {patched[0]:.2f} ({patched[1]:.2f})")


if __name__ == "__main__":
    main()
