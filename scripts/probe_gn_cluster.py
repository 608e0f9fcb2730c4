"""Probe: the one-launch cluster GroupNorm against the two-kernel CUDA plan and Triton at a few SD1.5 shapes, each
backend forced, fp16 channels_last, run a few times (for ncu: ``ncu -k regex:gn_ ... python scripts/probe_gn_cluster.py``).
"""
import torch

import sdkernels

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (2, 1280, 32, 32)]


def main():
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
        for backend in ("cuda", "cuda_cluster"):
            with sdkernels.use_backend(backend, op="group_norm", strict=True):
                for _ in range(3):
                    sdkernels.group_norm(x, 32, w, w, 1e-5, True)
        torch.cuda.synchronize()
        print(shape, "done", flush=True)


if __name__ == "__main__":
    main()
