"""Probe (GPU): where the mma.sync Winograd kernel's time goes. Times the kernel whole and with one stage left out
at a time (the binding's bench-only `ablate`: no filter copies, no input copies, no input transform, no MMAs; the
output is then not the convolution), beside cuDNN and the WMMA kernel; fp16 channels_last, conv + bias,
triton.testing.do_bench medians. The full kernel is checked against cuDNN first.
    python scripts/probe_winograd_stages.py [--cases "1,128,128,1024,1024;..."]
"""
import argparse

import torch
import triton

from sdkernels import _ext
from sdkernels.ops import conv3x3_eager
from sdkernels.ops.winograd import transformed_filter
from sdkernels.testing import relative_error

CASES = "1,128,128,1024,1024;1,128,128,512,512;1,256,256,512,512;1,256,256,256,256;2,320,320,64,64"
ABLATIONS = {1: "no filter copies", 2: "no input copies", 3: "no transform", 4: "no MMAs"}


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=CASES, help="N,C,K,H,W cases separated by ';'")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fp16, us per call")
    ext = _ext.load()
    for case in args.cases.split(";"):
        N, C, K, H, W = (int(v) for v in case.split(","))
        x = torch.randn(N, C, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = (torch.randn(K, C, 3, 3, device="cuda") / (9 * C) ** 0.5).half()
        b = torch.randn(K, device="cuda", dtype=torch.float16)
        u = transformed_filter(w)
        expected = conv3x3_eager(x, w, b)
        out = torch.empty_like(expected)

        def run(kernel, ablate=0):
            ext.winograd_conv3x3(x, u, b, None, out, 1.0, kernel=kernel, ablate=ablate)

        run(2)
        err = relative_error(out, expected)
        base = us(lambda: conv3x3_eager(x, w, b))
        full = us(lambda: run(2))
        line = [f"N={N},C={C},K={K},H={H},W={W}: cudnn {base:.1f}, mma {full:.1f} ({base / full:.2f}x"
                f"{'' if err < 1e-2 else f' WRONG {err:.2g}'}), wmma {us(lambda: run(1)):.1f};"]
        for ablate, what in ABLATIONS.items():
            t = us(lambda: run(2, ablate))
            line.append(f"{what} {t:.1f} (-{full - t:.1f})")
        print(" ".join(line), flush=True)


if __name__ == "__main__":
    main()
