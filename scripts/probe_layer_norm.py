"""Probe (GPU): the transformer blocks' LayerNorms (B, T, C) as sdkernels::group_norm on the (B*T, C, 1) view with
one group (the same statistics and affine), against F.layer_norm, per backend, in CUDA graphs over rotating inputs:

    python scripts/probe_layer_norm.py
"""
import contextlib

import torch
import torch.nn.functional as F

from sdkernels import dispatch
from sdkernels.benchmarking import bench_rotating_ms, input_sets
from sdkernels.ops.group_norm import group_norm

SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280), (2, 16384, 640)]


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for B, T, C in SHAPES:
        w = torch.randn(C, device="cuda", dtype=torch.float16)
        b = torch.randn(C, device="cuda", dtype=torch.float16)
        sets = input_sets(lambda: (torch.randn(B, T, C, device="cuda", dtype=torch.float16),), B * T * C * 4)
        x = sets[0][0]
        want = F.layer_norm(x.float(), (C,), w.float(), b.float(), 1e-5)
        row = [f"B={B},T={T},C={C}"]
        eager = bench_rotating_ms(lambda x: F.layer_norm(x, (C,), w, b, 1e-5), sets)
        row.append(f"eager {eager * 1e3:6.1f} us ({4 * x.numel() / eager / 1e6:5.0f} GB/s)")
        for backend in ("triton", "cuda", None):
            def ours(x):
                return group_norm(x.view(B * T, C, 1), 1, w, b, 1e-5).view(B, T, C)
            try:
                with dispatch.use_backend(backend, "group_norm", strict=True) if backend else contextlib.nullcontext():
                    err = (ours(x).float() - want).abs().max().item()
                    ms = bench_rotating_ms(ours, sets)
                row.append(f"{backend or 'default'} {ms * 1e3:6.1f} us x{eager / ms:4.2f} err {err:.1e}")
            except Exception as e:  # a backend that refuses the shape says why
                row.append(f"{backend}: {type(e).__name__} {str(e)[:80]}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
