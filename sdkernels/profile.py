"""Where one UNet step (or VAE decode) spends its device time, by kind of kernel, eager next to patched:

    python -m sdkernels.profile --model sd15 [--batch 2] [--resolution 512] [--steps 5] [--top 15] [--objective call]
    python -m sdkernels.profile --model vae --resolution 1024 --low-memory     # patched with low_memory=True
    python -m sdkernels.profile --model sd15 --compile     # a third column: torch.compile's kernels (GPU only)

It runs the model (random weights at unit gain, fp16 and channels_last on a GPU; fp32 in Triton's interpreter on the
CPU, where only the shape of the table means something) under torch.profiler for a few steps after a warm-up, sums
each kernel's own device time per step into classes (convolution, GEMM, attention, GroupNorm, GEGLU/GELU,
LayerNorm, elementwise, copies and layout, other), and prints both tables and the patched step's top kernels: what
to fuse next is what the patched step still spends most of its time on.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton (sdkernels imports it)

from . import models  # noqa: E402
from . import step_choice, tuning  # noqa: E402
from .patch import patch, unpatch  # noqa: E402

# (class, pattern over the kernel's name, lower-cased), first match wins: our Triton kernels by their names, cuDNN,
# cuBLAS and PyTorch's own kernels by theirs.
KERNEL_CLASSES = [
    ("attention", r"flash|fmha|attention|softmax_times_v|row_stats|merge_row|_efficient_attention"),
    ("groupnorm", r"group_norm|groupnorm|one_pass_kernel|flat_partials|flat_apply|rows_partials|rows_apply|"
                  r"finalize_kernel|gn_|welford|^_tile_kernel"),
    ("geglu/gelu", r"geglu|gelu"),
    ("layernorm", r"layer_norm|layernorm"),
    ("convolution", r"conv|implicit_gemm|xmma_fprop|fprop|dgrad|winograd|cudnn"),
    ("gemm", r"gemm|cutlass|nvjet|sm90_xmma|cublas|matmul|addmm|\bmm\b|bmm|linear"),
    ("copies/layout", r"copy|transpose|permute|contiguous|cat|nchw|nhwc|memcpy|upsample|interpolate"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|add|mul|silu|sigmoid|div|bias_residual"),
]


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def device_time_us(event) -> float:
    """An averaged profiler event's own device time in us (the attribute's name changed across torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_step(step, steps: int) -> dict:
    """{kernel name: us per step} of ``step()`` over ``steps`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    step()  # warm-up: compiling, autotuning and measuring happen here, not in the profile
    if on_gpu:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for event in prof.key_averages():
        if on_gpu and getattr(event, "device_type", None) is not None and "CUDA" not in str(event.device_type):
            continue
        per_kernel[event.key] += device_time_us(event) / steps
    return dict(per_kernel)


def by_class(per_kernel: dict) -> dict:
    totals = defaultdict(float)
    for name, us in per_kernel.items():
        totals[kernel_class(name)] += us
    return dict(totals)


def report(eager: dict, patched: dict, top: int, compiled: dict = None) -> str:
    """The per-class table (eager, patched, and torch.compile's column where given), then the patched top kernels."""
    columns = [("eager", by_class(eager)), ("patched", by_class(patched))]
    if compiled is not None:
        columns.append(("compile", by_class(compiled)))
    totals = [sum(classes.values()) for _, classes in columns]
    lines = ["  " + f"{'class':16s}" + "".join(f" {name + ' us':>11s} {'share':>6s}" for name, _ in columns)]
    labels = set().union(*(classes for _, classes in columns))
    for label in sorted(labels, key=lambda k: -columns[1][1].get(k, 0.0)):
        cells = [(classes.get(label, 0.0), total) for (_, classes), total in zip(columns, totals)]
        lines.append(f"  {label:16s}" + "".join(f" {us:11.1f} {us / max(total, 1e-9):6.1%}" for us, total in cells))
    lines.append(f"  {'total':16s}" + "".join(f" {total:11.1f} {'':6s}" for total in totals))
    lines.append(f"\n  patched step, top {top} kernels:")
    for name, us in sorted(patched.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us:10.1f} us  {kernel_class(name):14s} {name[:90]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15" if torch.cuda.is_available() else "tiny-unet",
                   choices=list(models.MODELS))
    p.add_argument("--batch", type=int, help="default: the model's usual batch")
    p.add_argument("--resolution", type=int, help="default: the model's usual resolution")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after one warm-up)")
    p.add_argument("--top", type=int, default=15, help="how many of the patched step's kernels to list")
    p.add_argument("--ops", help="comma-separated sdkernels patchers (default: sdkernels.default_ops())")
    p.add_argument("--low-memory", action="store_true",
                   help="patch with low_memory=True (large activations in bands of rows, sdkernels.banded)")
    p.add_argument("--compile", action="store_true",
                   help="also profile torch.compile of the eager model (default mode: the kernels reduce-overhead "
                        "replays in its CUDA graphs; GPU only, a minute or more to compile)")
    p.add_argument("--objective", choices=tuning.OBJECTIVES, default="device",
                   help="what the measured backend choices minimize: the GPU time a CUDA-graph replay pays (device, "
                        "the default) or one call's time with its host overhead (call, a step without graphs)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    spec = models.spec(args.model)
    dtype = torch.float16 if gpu else torch.float32
    with torch.device("cuda" if gpu else "cpu"):
        model = models.build(args.model, init="unit", dtype=dtype)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, args.batch or spec.batch, args.resolution or spec.resolution)

    def step(entry=None):
        """One step: the model's, or ``entry``'s (torch.compile of it) on the same inputs."""
        with torch.no_grad():
            return (entry or models.entry(model))(*call_args, **call_kwargs)

    eager = profile_step(step, args.steps)
    compiled = None
    if args.compile and gpu:
        compiled_call = torch.compile(models.entry(model))
        compiled = profile_step(lambda: step(compiled_call), args.steps)
        torch._dynamo.reset()
    patch(model, ops=args.ops.split(",") if args.ops else None, low_memory=args.low_memory)
    # The patched modules' kernels, always: without graphs the step choice may otherwise run the original modules
    # (it did in one of three profiles of the SD1.5 step on an H200).
    step_choice.uninstall(model)
    try:
        with tuning.optimizing_for(args.objective):
            patched = profile_step(step, args.steps)
    finally:
        unpatch(model)
    device = torch.cuda.get_device_name() if gpu else "CPU (Triton interpreter: not speed)"
    print(f"{args.model}, batch {args.batch or spec.batch}, {args.resolution or spec.resolution} px, {dtype}, "
          f"{device}{', patched with low_memory' if args.low_memory else ''}: device time per step by kernel class")
    print(report(eager, patched, args.top, compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
