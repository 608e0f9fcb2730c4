"""GPU sweep behind the GroupNorm+SiLU plan choice at the SD1.5 UNet's shapes (batch 2, channels_last, 32 groups):
eager, the CUDA backend, the Triton backend as dispatched, and the group_tile plan at several tile sizes and warp
counts. Per call times of CUDA-graph replays over input sets larger than L2 (bench_rotating_ms, as
bench/bench_group_norm.py). Prints a table; nothing is written.
    python scripts/sweep_group_norm.py [--shapes B,C,H,W ...]"""
import argparse

import torch
import torch.nn.functional as F

import sdkernels
import sdkernels.kernels.group_norm as gn
from sdkernels.benchmarking import bench_rotating_ms, input_sets

SD15 = [(2, 320, 64, 64), (2, 320, 32, 32), (2, 640, 32, 32), (2, 640, 16, 16), (2, 1280, 16, 16), (2, 1280, 8, 8),
        (2, 2560, 8, 8), (2, 2560, 16, 16), (2, 1920, 16, 16), (2, 1920, 32, 32), (2, 1280, 32, 32),
        (2, 960, 32, 32), (2, 960, 64, 64), (2, 640, 64, 64)]
TILES = (2048, 4096, 8192, 16384)
WARPS = (4, 8, 16)
GROUPS = 32


def sweep(shape):
    x0 = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
    b = torch.randn(shape[1], device="cuda", dtype=torch.float16)
    sets = [(x0,)] + input_sets(lambda: (torch.randn_like(x0),), x0.numel() * 4)
    out = torch.empty_like(x0)
    expected = F.silu(F.group_norm(x0.float(), GROUPS, w.float(), b.float(), 1e-5))
    times = {"eager": bench_rotating_ms(lambda x: F.silu(F.group_norm(x, GROUPS, w, b, 1e-5)), sets)}
    for backend in ("cuda", "triton"):
        def op(x, backend=backend):
            with sdkernels.use_backend(backend, op="group_norm", strict=True):
                return sdkernels.group_norm(x, GROUPS, w, b, 1e-5, True)
        times[backend] = bench_rotating_ms(op, sets)
    strides = (x0.stride(0), x0.stride(1), x0.stride(3))
    epilogue = dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, HAS_RESIDUAL=False)
    for tile in TILES:
        for warps in WARPS:
            def tiled(x, tile=tile, warps=warps):
                gn.launch_group_tile(x, GROUPS, w, b, x, out, 1e-5, strides, strides, strides, epilogue,
                                     tile=tile, warps=warps)
                return out
            tiled(x0)
            err = (out.float() - expected).abs().max().item()
            assert err < 2e-2, f"group_tile tile={tile} warps={warps}: max error {err}"
            times[f"tile {tile} w{warps}"] = bench_rotating_ms(tiled, sets)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=None, help="B,C,H,W ... (default: the SD1.5 UNet's)")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SD15
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, channels_last, us per call")
    for shape in shapes:
        times = sweep(shape)
        eager = times["eager"]
        best = min((k for k in times if k.startswith("tile")), key=times.get)
        line = "  ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items() if not k.startswith("tile"))
        print(f"{shape}: {line}  best group_tile [{best}] {times[best] * 1e3:.1f} us = {eager / times[best]:.2f}x "
              f"eager (5x: {eager / 5 * 1e3:.1f} us)")
        print("    " + "  ".join(f"{k[5:]} {v * 1e3:.1f}" for k, v in times.items() if k.startswith("tile")))


if __name__ == "__main__":
    main()
