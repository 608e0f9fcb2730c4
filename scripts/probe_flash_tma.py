"""Probe (GPU): the flash kernel with q, k, v loaded by the copy engine (kernels/flash_attention_tma.py) against the
pointer kernel and SDPA at issue 3's cases, in diffusers' (B, N, H*d) layout: the default config and a sweep of
tile configs for the descriptor kernel, each checked against SDPA before it is timed (CUDA-graph replays).
    python scripts/probe_flash_tma.py [--cases "2,8,4096,4096,40;..."] [--no-sweep]
"""
import argparse
import os

import torch
import torch.nn.functional as F
import triton

from sdkernels.kernels import flash_attention as fa
from sdkernels.kernels import flash_attention_tma as ft
from sdkernels.ops.attention import as_bhnd
from probe_sweep import checked_us, graph_us, sweep  # scripts/

CASES = ("2,8,4096,4096,40;2,8,1024,1024,80;2,8,256,256,160;2,10,16384,16384,64;2,8,4096,77,40;2,10,4096,77,64;"
         "2,8,4096,4096,128")
SWEEP = [(64, 128, 4, 2), (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 2), (64, 128, 8, 2), (128, 128, 4, 2),
         (128, 128, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 64, 8, 3)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=CASES, help="B,H,N,Nk,d cases separated by ';'")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--kernels", default="tma,pointer", help="which kernels the sweep times")
    p.add_argument("--one-chunk", default=None, help="head dims the descriptor kernel runs as one padded chunk "
                   "(SDKERNELS_FLASH_TMA_ONE_CHUNK, e.g. 40; '' for none; default: the package's own)")
    args = p.parse_args()
    if args.one_chunk is not None:
        os.environ["SDKERNELS_FLASH_TMA_ONE_CHUNK"] = args.one_chunk
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16, us per call")
    for case in args.cases.split(";"):
        B, H, N, Nk, d = (int(v) for v in case.split(","))
        q, k, v = (as_bhnd(torch.randn(B, n, H * d, device="cuda", dtype=torch.float16), H) for n in (N, Nk, Nk))
        out = as_bhnd(torch.empty(B, N, H * d, device="cuda", dtype=torch.float16), H)
        flops = 4 * B * H * N * Nk * d
        expected = F.scaled_dot_product_attention(q, k, v)
        sdpa_us = graph_us(lambda: F.scaled_dot_product_attention(q, k, v))

        def timed(fn):
            return checked_us(fn, out, expected, graph_us)

        os.environ["SDKERNELS_FLASH_TMA"] = "0"
        pointer_us, note = timed(lambda: fa.flash_attention_triton(q, k, v, out, d ** -0.5, None))
        os.environ["SDKERNELS_FLASH_TMA"] = ""
        assert ft.use_tma(q, k, v, out, None), ft.tma_why_not(q, k, v, out, None)
        tma_us, tma_note = timed(lambda: fa.flash_attention_triton(q, k, v, out, d ** -0.5, None))
        print(f"B={B},H={H},N={N},Nk={Nk},d={d}: sdpa {sdpa_us:.1f}, pointer {pointer_us:.1f} {note}"
              f"({sdpa_us / pointer_us:.3f}x sdpa), tma {tma_us:.1f} {tma_note}({sdpa_us / tma_us:.3f}x sdpa, "
              f"{flops / tma_us * 1e-6:.0f} TFLOP/s)", flush=True)
        if not args.sweep:
            continue
        for kernel in args.kernels.split(","):
            os.environ["SDKERNELS_FLASH_TMA"] = "1" if kernel == "tma" else "0"
            results = sweep(SWEEP, lambda c: fa.flash_attention_triton(q, k, v, out, d ** -0.5, None, c), out,
                            expected, graph_us)
            for us, config, note in results[:4]:
                print(f"  {kernel} {config}: {us:.1f} us ({sdpa_us / us:.3f}x sdpa, {flops / us * 1e-6:.0f} TFLOP/s)"
                      f" {note}", flush=True)
        os.environ["SDKERNELS_FLASH_TMA"] = ""


if __name__ == "__main__":
    main()
