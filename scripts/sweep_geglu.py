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
import triton
import triton.language as tl

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


@triton.jit
def _geglu_variant(in_ptr, out_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   EVICT_FIRST: tl.constexpr):
    """Experiment: contiguous (rows, 2 * cols) -> (rows, cols), programs striding over the tiles (persistent when
    the grid is smaller than the tile count), loads optionally marked evict-first."""
    col_tiles = tl.cdiv(cols, BLOCK_C)
    tiles = tl.cdiv(rows, BLOCK_R) * col_tiles
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        r = (t // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = (t % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        offs = r.to(tl.int64)[:, None] * (2 * cols) + c[None, :]
        if EVICT_FIRST:
            a = tl.load(in_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
            g = tl.load(in_ptr + offs + cols, mask=mask, eviction_policy="evict_first").to(tl.float32)
        else:
            a = tl.load(in_ptr + offs, mask=mask).to(tl.float32)
            g = tl.load(in_ptr + offs + cols, mask=mask).to(tl.float32)
        y = a * 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        tl.store(out_ptr + r.to(tl.int64)[:, None] * cols + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def sweep_variants(h, out, M, cols, moved, copy):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    line = []
    for block_r, block_c, warps in ((8, 256, 4), (4, 512, 4), (16, 256, 8)):
        if block_c > cols:
            continue
        tiles = triton.cdiv(M, block_r) * triton.cdiv(cols, block_c)
        for per_sm in (0, 4, 8):
            for evict in (False, True):
                grid = tiles if per_sm == 0 else min(tiles, sms * per_sm)
                ms = bench_ms(lambda: _geglu_variant[(grid,)](h, out, M, cols, BLOCK_R=block_r, BLOCK_C=block_c,
                                                             EVICT_FIRST=evict, num_warps=warps), graph=True)
                line.append((ms, f"{block_r}x{block_c} w{warps} grid {'tiles' if per_sm == 0 else f'{per_sm}/SM'} "
                                 f"evict_first={evict}: {ms * 1e3:.1f} us {100 * moved / ms / 1e6 / copy:.0f}%"))
    return [text for _, text in sorted(line)[:4]]


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
        line += ["variant " + text for text in sweep_variants(h, out, M, N2 // 2, moved, copy)]
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
