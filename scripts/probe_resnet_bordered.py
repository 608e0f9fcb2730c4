"""Probe (GPU): where the fused ResNet block's time goes on the triton_bordered path, stage by stage, beside the
unfused path's pieces (cuDNN conv without bias, our GroupNorm + SiLU op):

    python scripts/probe_resnet_bordered.py [--shapes 2x320x320x64x64,...] [--configs 256x128x64x8x3,...]

Times: triton.testing.do_bench_cudagraph medians (each call replayed from a CUDA graph: no host time), fp16,
channels_last; SDKERNELS_TUNING=0 (priority dispatch); SDKERNELS_GN_PLAN forces group_norm_stats' plan per row.
--configs adds the block's two conv epilogues (temb + output statistics; residual) at each given tile config
(BLOCK_M x BLOCK_N x BK x warps x stages, unsplit) beside launch_config's."""
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
    p.add_argument("--configs", default="", help="tile configs to time the conv epilogues at, comma-separated")
    args = p.parse_args()
    configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",") if c]
    # us, each call replayed from a CUDA graph: no host time
    bench = lambda f: triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3  # noqa: E731
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
        res = torch.randn_like(out)
        rows = {
            "group_norm_stats": lambda: group_norm_stats(x, 32, 1e-5),
            **{f"group_norm_stats plan={plan}": (lambda p=plan: _with_plan(p, lambda: group_norm_stats(x, 32, 1e-5)))
               for plan in ("tile", "rows", "flat")},
            "gn_silu_bordered": lambda: cp.gn_silu_bordered(x, norm),
            "group_norm+silu op (unfused)": lambda: group_norm(x, 32, gw, gb, 1e-5, silu=True),
            "conv_padded": lambda: cp.conv3x3_padded(xp, w, b, None, None, 1.0, out),
            "conv_padded +temb +stats": lambda: cp.conv3x3_padded(xp, w, b, temb, None, 1.0, out, stats_groups=32),
            "conv_padded +residual": lambda: cp.conv3x3_padded(xp, w, b, None, res, 1.0, out),
            **{f"{what} cfg={cfg}": (lambda c=cfg, kw=kw: cp.conv3x3_padded(xp, w, b, **kw, scale=1.0, out=out,
                                                                              config=c, split=1))
               for cfg in configs for what, kw in (("conv_padded", dict(add=None, residual=None)),
                                                   ("+temb +stats", dict(add=temb, residual=None, stats_groups=32)),
                                                   ("+residual", dict(add=None, residual=res)))},
            "cudnn no bias": lambda: F.conv2d(x, w, None, padding=1),
            "cudnn + bias": lambda: F.conv2d(x, w, b, padding=1),
        }
        print(f"N={N} Cin={Cin} Cout={Cout} {H}x{W}:", flush=True)
        for name, f in rows.items():
            try:
                print(f"   {name:56s} {bench(f):8.1f} us", flush=True)
            except Exception as e:  # report and go on
                print(f"   {name:56s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
