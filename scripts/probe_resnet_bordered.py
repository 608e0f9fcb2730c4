"""Probe (GPU): where the fused ResNet block's time goes on the triton_bordered path, stage by stage, beside the
unfused path's pieces (cuDNN conv without bias, our GroupNorm + SiLU op):

    python scripts/probe_resnet_bordered.py [--shapes 2x320x320x64x64,...]

Times: triton.testing.do_bench_cudagraph medians (each call replayed from a CUDA graph: no host time), fp16,
channels_last; SDKERNELS_TUNING=0 (priority dispatch); SDKERNELS_GN_PLAN forces group_norm_stats' plan per row."""
import argparse
import os

os.environ.setdefault("SDKERNELS_TUNING", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import sdkernels  # noqa: E402,F401
from sdkernels.kernels import conv3x3_padded as cp  # noqa: E402
from sdkernels.ops.group_norm import group_norm, group_norm_stats  # noqa: E402
from sdkernels.testing import env_set  # noqa: E402

SHAPES = "2x320x320x64x64,2x640x640x32x32,2x1280x1280x16x16,2x1280x1280x8x8,1x512x512x128x128"


def _with_plan(plan, run):
    with env_set("SDKERNELS_GN_PLAN", plan):
        return run()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=SHAPES)
    args = p.parse_args()
    # us, each call replayed from a CUDA graph: no host time
    bench = lambda f: triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3  # noqa: E731
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for spec in args.shapes.split(","):
        N, Cin, Cout, H, W = map(int, spec.split("x"))
        x = torch.randn(N, Cin, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = (torch.randn(Cout, Cin, 3, 3, device="cuda", dtype=torch.float16) / (3 * Cin ** 0.5)).to(
            memory_format=torch.channels_last)
        b = torch.randn(Cout, device="cuda", dtype=torch.float16)
        gw, gb = torch.randn(Cin, device="cuda", dtype=torch.float16), torch.randn(Cin, device="cuda",
                                                                                 dtype=torch.float16)
        temb = torch.randn(N, Cout, device="cuda", dtype=torch.float16)
        stats = group_norm_stats(x, 32, 1e-5)
        norm = (stats.contiguous(), gw, gb)
        xp = cp.gn_silu_bordered(x, norm)
        out = torch.empty(N, Cout, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        rows = {
            "group_norm_stats": lambda: group_norm_stats(x, 32, 1e-5),
            **{f"group_norm_stats plan={plan}": (lambda p=plan: _with_plan(p, lambda: group_norm_stats(x, 32, 1e-5)))
               for plan in ("tile", "rows", "flat")},
            "gn_silu_bordered": lambda: cp.gn_silu_bordered(x, norm),
            "group_norm+silu op (unfused)": lambda: group_norm(x, 32, gw, gb, 1e-5, silu=True),
            "conv_padded": lambda: cp.conv3x3_padded(xp, w, b, None, None, 1.0, out),
            "conv_padded +temb +stats": lambda: cp.conv3x3_padded(xp, w, b, temb, None, 1.0, out, stats_groups=32),
            "conv_padded +residual": lambda: cp.conv3x3_padded(xp, w, b, None, x, 1.0, out) if Cin == Cout else None,
            "conv_padded stream-K": lambda: cp.conv3x3_padded(xp, w, b, None, None, 1.0, out, stream_k=sms),
            "conv_padded +temb +stats stream-K": lambda: cp.conv3x3_padded(xp, w, b, temb, None, 1.0, out,
                                                                           stats_groups=32, stream_k=sms),
            "cudnn no bias": lambda: F.conv2d(x, w, None, padding=1),
            "cudnn + bias": lambda: F.conv2d(x, w, b, padding=1),
        }
        print(f"N={N} Cin={Cin} Cout={Cout} {H}x{W}:", flush=True)
        for name, f in rows.items():
            try:
                print(f"   {name:32s} {bench(f):8.1f} us", flush=True)
            except Exception as e:  # report and go on
                print(f"   {name:32s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
