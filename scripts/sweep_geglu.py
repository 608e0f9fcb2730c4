"""GPU sweep behind the GEGLU tile choices: every linear_geglu config (pointer and TMA) at the SD shapes beside
cuBLAS F.linear, and the elementwise geglu's tile sizes beside a copy of the same bytes. Medians of CUDA-graph
replays (do_bench). Prints a table; nothing is written.

    python scripts/sweep_geglu.py [--linear] [--elementwise]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_geglu import SD_CASES  # noqa: E402
from sdkernels.benchmarking import bench_ms, copy_bandwidth_gbps  # noqa: E402
import sdkernels.kernels.geglu as eltwise  # noqa: E402
import sdkernels.kernels.linear_geglu as fused  # noqa: E402


def sweep_linear(dtype):
    for M, K, N2, where in SD_CASES:
        N = N2 // 2
        x = torch.randn(M, K, device="cuda").to(dtype)
        w = (torch.randn(N2, K, device="cuda") * K ** -0.5).to(dtype)
        b = torch.randn(N2, device="cuda").to(dtype)
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        flops = 2.0 * M * K * N2
        cublas = bench_ms(lambda: F.linear(x, w, b), graph=True)
        rows = []
        extra = [fused._config(128, 128, 128, 2, 8, tma=True), fused._config(128, 64, 128, 3, 8, tma=True)]
        for config in fused.CONFIGS + fused.TMA_CONFIGS + extra:
            if not fused.fits(config, dtype, x.device):
                continue
            try:
                ms = bench_ms(lambda: fused.linear_geglu_triton(x, w, b, out, False, config=config), graph=True)
            except Exception as e:  # a config that cannot run here is reported, the sweep goes on
                print(f"  {config}: {type(e).__name__} {str(e)[:80]}")
                continue
            rows.append((ms, config))
        rows.sort(key=lambda r: r[0])
        print(f"M={M},K={K},N={N2} ({where}): cuBLAS linear {cublas * 1e3:.1f} us ({flops / cublas / 1e9:.0f} TF/s)")
        for ms, config in rows[:4]:
            print(f"    {ms * 1e3:7.1f} us {flops / ms / 1e9:4.0f} TF/s {cublas / ms:5.2f}x cuBLAS  {config}")
        flags = dict(HAS_BIAS=True, APPROXIMATE_TANH=False, INPUT_PRECISION="tf32", DOT_IN_FP32=False)
        launch = fused._Launch(x, w, b, out, flags)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        splits = []
        tails = fused.TAIL_CONFIGS + [fused._config(64, 128, 64, 4, 4, tma=True),
                                      fused._config(64, 64, 128, 2, 4, tma=True)]
        for _, config in rows[:3]:
            for plan in fused.split_plans(M, N, config, tails, sms):
                splits.append((bench_ms(lambda: launch.run(plan), graph=True), plan))
        for ms, plan in sorted(splits, key=lambda r: r[0])[:5]:
            text = " + ".join(f"({c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} tma={c.kwargs['USE_TMA']} "
                              f"w{c.num_warps} s{c.num_stages} k/{c.kwargs['SPLIT_K']}) {a}..{e}" for c, a, e in plan)
            print(f"    split {ms * 1e3:7.1f} us {flops / ms / 1e9:4.0f} TF/s {cublas / ms:5.2f}x cuBLAS  {text}")


def sweep_elementwise(dtype):
    copy = copy_bandwidth_gbps()
    print(f"copy bandwidth (512 MiB): {copy:.0f} GB/s")
    original = eltwise.TILE_ELEMENTS
    for M, K, N2, where in SD_CASES:
        h = torch.randn(M, N2, device="cuda").to(dtype)
        out = torch.empty(M, N2 // 2, device="cuda", dtype=dtype)
        moved = h.numel() * h.element_size() * 1.5
        src = torch.empty(int(moved // 2), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        same_bytes = bench_ms(lambda: dst.copy_(src), graph=True)
        line = [f"M={M},N={N2}: copy of the same bytes {same_bytes * 1e3:.1f} us ({moved / same_bytes / 1e6:.0f} GB/s)"]
        for tile in (2048, 4096, 8192, 16384):
            eltwise.TILE_ELEMENTS = tile
            eltwise.tile_shape.cache_clear()
            ms = bench_ms(lambda: eltwise.gelu_rows_triton(h, out, M, N2 // 2, (1, 1, M), (0, 0, N2), (0, 0, N2 // 2),
                                                           True, False), graph=True)
            line.append(f"tile {tile} {eltwise.tile_shape(M, N2 // 2)}: {ms * 1e3:.1f} us "
                        f"{100 * moved / ms / 1e6 / copy:.0f}%")
        print("\n    ".join(line))
    eltwise.TILE_ELEMENTS = original
    eltwise.tile_shape.cache_clear()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--linear", action="store_true")
    p.add_argument("--elementwise", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.elementwise or not a.linear:
        sweep_elementwise(torch.float16)
    if a.linear or not a.elementwise:
        sweep_linear(torch.float16)
