"""Probe (GPU): GroupNorm's kernels one by one at channels_last SD shapes, by the profiler's device times (not the
CUDA-graph replay bench_group_norm times): the Triton tile, the CUDA backend's one-kernel (cluster) plan and its two
kernels. Tells a kernel's own time from what a call costs around it (launch, programmatic-launch waits).

    python scripts/probe_gn_kernels.py [--shapes 2,1280,8,8;2,320,32,32] [--calls 50] [--variants triton,...]
        [--bounds]

--bounds adds torch's clone of x (one read, one write, like the copy the VAE target is measured by) and its read-only
pass over x (x.sum in fp32), each with its achieved GB/s. The CUDA kernels' probe knob SDKERNELS_GN_PLAN is read
once per process: run one process per value.
"""
import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import sdkernels  # noqa: E402
from sdkernels.dispatch import use_backend  # noqa: E402

VARIANTS = {"triton": ("triton", None), "cuda one kernel": ("cuda", None), "cuda two kernels": ("cuda", "0")}


def device_times(fn, calls):
    """{kernel name: (calls, mean us)} of fn's kernels over `calls` calls, and the events' mean us per call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name].append(e.device_time)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return {k: (len(v), sum(v) / len(v)) for k, v in per.items()}, 1000 * start.elapsed_time(end) / calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2,1280,8,8;2,320,32,32;2,640,16,16;2,1920,32,32;2,320,64,64")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--bounds", action="store_true")
    args = p.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    for text in args.shapes.split(";"):
        shape = tuple(int(v) for v in text.split(","))
        x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w, b = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
        if args.bounds:
            nbytes = x.numel() * x.element_size()
            for name, fn, moved in (("clone", lambda: x.clone(memory_format=torch.preserve_format), 2 * nbytes),
                                    ("sum", lambda: x.sum(dtype=torch.float32), nbytes)):
                kernels, per_call = device_times(fn, args.calls)
                device_us = sum(n * t for n, t in kernels.values()) / args.calls
                print(f"{text:16s} {name:18s} device {device_us:8.2f} us, {moved / device_us / 1e3:7.1f} GB/s "
                      f"(events {per_call:.2f} us)", flush=True)
        for name, (backend, knob) in variants.items():
            if knob is not None:
                os.environ["SDKERNELS_GN_CLUSTER"] = knob
            try:
                with use_backend(backend, op="group_norm", strict=True):
                    kernels, per_call = device_times(lambda: sdkernels.group_norm(x, 32, w, b, 1e-5, True), args.calls)
            finally:
                os.environ.pop("SDKERNELS_GN_CLUSTER", None)
            listing = ", ".join(f"{k[:40]} x{n // args.calls}: {t:.2f} us" for k, (n, t) in kernels.items())
            plan = os.environ.get("SDKERNELS_GN_PLAN", "")
            print(f"{text:16s} {name:18s} {plan:9s} per call (events, eager) {per_call:7.2f} us | {listing}",
                  flush=True)


if __name__ == "__main__":
    main()
