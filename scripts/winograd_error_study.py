"""Issue 6's stretch: the error of Winograd F(4x4, 3x3) (6x6 input patches) against F(2x2, 3x3), the variant the
CUDA kernel computes, each as the kernel would compute it (sdkernels/ops/winograd.py's reference: transforms in fp32,
the transformed operands V and U rounded to the input dtype for the tensor-core GEMMs, fp32 sums), against the float64
direct convolution of the same rounded inputs. Unit-variance inputs, unit-gain weights (outputs of unit variance),
one 32x32 image, K = 32. Device-independent arithmetic: runs on the CPU.

    python scripts/winograd_error_study.py [--out bench/results/winograd_error.json]

Per dtype and variant: the rms and largest error relative to the output's rms, the rms error as a multiple of a
direct convolution's (exact products and sums, one rounding of the output: what cuDNN's fp32 accumulation comes near),
and the largest error as a fraction of the per-element bound (winograd.error_bound, below 1 where it holds).
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sdkernels.ops.winograd as wg  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def study(C: int, dtype: torch.dtype, variant, K: int = 32, side: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, side, side, generator=g).to(dtype)
    w = (torch.randn(K, C, 3, 3, generator=g) / math.sqrt(9 * C)).to(dtype)
    e = wg.rounding_errors(x, w, variant)
    exact, bound, err, direct = e["exact"], e["bound"], e["winograd"], e["direct"]
    rms = exact.square().mean().sqrt().item()
    return dict(variant=variant.name, C=C, dtype=str(dtype).removeprefix("torch."),
                rms_rel=err.square().mean().sqrt().item() / rms, max_rel=err.abs().max().item() / rms,
                vs_direct=(err.square().mean() / direct.square().mean()).sqrt().item(),
                max_over_bound=(err.abs() / bound).max().item())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", default="128,512")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    print(f"{'C':>4s} {'dtype':6s} {'variant':12s} {'rms err':>9s} {'max err':>9s} {'x direct':>9s} {'max/bound':>9s}")
    for C in map(int, args.channels.split(",")):
        for name, dtype in DTYPES.items():
            for variant in (wg.F2X2, wg.F4X4):
                r = study(C, dtype, variant)
                rows.append(r)
                print(f"{C:4d} {name:6s} {variant.name:12s} {r['rms_rel']:9.2e} {r['max_rel']:9.2e} "
                      f"{r['vs_direct']:8.2f}x {r['max_over_bound']:9.3f}")
    if args.out:
        meta = dict(device="cpu (exact arithmetic emulating the kernel's roundings)", torch=torch.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    rows=rows)
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
