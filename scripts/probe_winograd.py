"""Probe (GPU): the Winograd F(2x2, 3x3) kernels (CUDA: WMMA and mma.sync; Triton: kernels/winograd_conv3x3.py)
against cuDNN and triton_tma at issue 6's shapes, with a sweep of its tile configs; each provider checked against
cuDNN before it is timed (triton.testing.do_bench, medians), conv + bias, fp16 channels_last.
    python scripts/probe_winograd.py [--cases "1,128,128,1024,1024;..."] [--no-sweep]
"""
import argparse
import os

import torch
import triton

import sdkernels
from sdkernels import conv3x3
from sdkernels.kernels import winograd_conv3x3 as wk
from sdkernels.ops import conv3x3_eager
from sdkernels.ops.winograd import transformed_filter
from sdkernels.testing import relative_error
from probe_sweep import sweep  # scripts/

# (backend, SDKERNELS_WINOGRAD_KERNEL): the CUDA Winograd's WMMA and mma.sync kernels side by side.
PROVIDERS = [("triton_tma", ""), ("winograd", "wmma"), ("winograd", "mma"), ("triton_winograd", "")]
CASES = "1,128,128,1024,1024;1,128,128,512,512;1,256,256,512,512;1,256,256,256,256;1,512,512,256,256;2,320,320,64,64"
# (TH, TW, BLOCK_K, BLOCK_C, num_warps, num_stages): the configs ptxas compiled with little or no spilling (sm_90,
# on the CPU); the default (8, 8, 16, 16, 8, 1) is timed as the backend.
SWEEP = [(8, 8, 16, 16, 8, 2), (8, 8, 32, 16, 8, 1), (8, 8, 32, 16, 8, 2), (4, 4, 32, 16, 4, 1),
         (4, 8, 16, 16, 4, 1), (4, 4, 32, 32, 4, 1), (4, 4, 64, 16, 4, 1), (8, 8, 32, 32, 8, 1),
         (8, 8, 64, 16, 8, 1), (4, 8, 16, 32, 4, 1)]


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=CASES, help="N,C,K,H,W cases separated by ';'")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16, us per call,"
          " direct-conv-equivalent TFLOP/s")
    for case in args.cases.split(";"):
        N, C, K, H, W = (int(v) for v in case.split(","))
        x = torch.randn(N, C, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = (torch.randn(K, C, 3, 3, device="cuda") / (9 * C) ** 0.5).half().to(memory_format=torch.channels_last)
        b = torch.randn(K, device="cuda", dtype=torch.float16)
        flops = 2 * N * K * H * W * C * 9
        expected = conv3x3_eager(x, w, b)
        u = transformed_filter(w)
        out = torch.empty_like(expected)
        line = [f"N={N},C={C},K={K},H={H},W={W}:"]
        base = us(lambda: conv3x3_eager(x, w, b))
        line.append(f"cudnn {base:.1f}")
        for backend, kernel in PROVIDERS:
            os.environ["SDKERNELS_WINOGRAD_KERNEL"] = kernel
            name = f"{backend}({kernel})" if kernel else backend
            with sdkernels.use_backend(backend, op="conv3x3", strict=True):
                try:
                    err = relative_error(conv3x3(x, w, b), expected)
                    t = us(lambda: conv3x3(x, w, b))
                    line.append(f"{name} {t:.1f} ({base / t:.2f}x{'' if err < 1e-2 else f' WRONG {err:.2g}'})")
                except Exception as e:  # noqa: BLE001  (a backend this GPU or build lacks)
                    line.append(f"{name} {type(e).__name__}")
        os.environ.pop("SDKERNELS_WINOGRAD_KERNEL")
        print(" ".join(line), flush=True)
        if not args.sweep:
            continue
        results = sweep(SWEEP, lambda c: wk.winograd_conv3x3_triton(x, u, b, None, out, 1.0, config=c), out,
                        expected, us)
        for t, config, note in results[:5]:
            print(f"  triton_winograd {config}: {t:.1f} us ({base / t:.2f}x cudnn, {flops / t * 1e-6:.0f} TFLOP/s) "
                  f"{note}", flush=True)


if __name__ == "__main__":
    main()
