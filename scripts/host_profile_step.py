"""Host (CPU) time of one whole UNet step, eager against patched (no CUDA graphs), and where the patched step's host
time goes: the thread's CPU time per step (what a launch-bound step costs) and a cProfile of a few steps.
    python scripts/host_profile_step.py [--model sd15] [--batch 2] [--resolution 512] [--rows 30] [--init unit|diffusers]"""
import argparse
import cProfile
import pstats
import time

import torch

import sdkernels
from sdkernels import models

STEPS = 20


def host_ms(step) -> tuple:
    """(CPU ms of this thread per step, wall ms per step) over STEPS back-to-back steps after a warm-up."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(STEPS):
        step()
    cpu = time.thread_time() - cpu
    torch.cuda.synchronize()
    return cpu / STEPS * 1e3, (time.perf_counter() - wall) / STEPS * 1e3


def profile(step, label, rows) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [step() for _ in range(5)])
    torch.cuda.synchronize()
    print(f"\n== {label}: 5 steps, by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
    print(f"\n== {label}: 5 steps, sdkernels functions by cumulative time")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats("sdkernels", rows)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--init", choices=models.INITS, default="unit", help="random weights as the e2e bench has them")
    args = p.parse_args()
    with torch.device("cuda"):
        model = models.build(args.model, init=args.init, dtype=torch.float16)
    model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, args.batch, args.resolution)
    step = lambda: models.model_call(model, call_args, call_kwargs)  # noqa: E731
    with torch.no_grad():
        eager = host_ms(step)
        profile(step, "eager", args.rows)
        sdkernels.patch(model)
        patched = host_ms(step)
        profile(step, "patched", args.rows)
    print(f"\n{args.model} B={args.batch} {args.resolution} px on {torch.cuda.get_device_name()}: host CPU ms per step "
          f"(wall ms): eager {eager[0]:.2f} ({eager[1]:.2f}), patched {patched[0]:.2f} ({patched[1]:.2f})")


if __name__ == "__main__":
    main()
