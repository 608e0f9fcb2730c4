"""Probe (GPU, sm_90): the bordered 3x3 convolution's K loop (kernels/conv3x3_padded.py: nine shifted 2-D GEMMs over
a zero-bordered NHWC input) with descriptors made on the device and `tl.range(..., warp_specialize=WS)`, the form in
which Triton 3.6 warp-specializes a loop on Hopper (a producer warp for the copies, consumer warpgroups for the
MMAs), against the shipped kernel (host descriptors, its launch_config) and cuDNN, at SD1.5 block shapes: does
specialization bring the convolution to cuDNN's speed (issue 7 needs ~0.9x of it where the fusion budget is tight)?
Bare convolutions (no bias or epilogue), fp16, channels_last; CUDA-graph replays, each output checked first.
    python scripts/probe_conv_ws.py [--shapes 2x320x320x64x64,...]
"""
import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sdkernels.kernels import conv3x3_padded as cp
from probe_sweep import checked_us, graph_us  # scripts/

SHAPES = "2x320x320x64x64,2x1280x1280x16x16,2x2560x1280x16x16,2x960x320x64x64,2x1920x1280x16x16"
CONFIGS = [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
           (256, 128, 64, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]


@triton.jit
def _conv_ws(xp_ptr, w_ptr, out_ptr, H, W, Cin, Cout, tiles_n, rows_total, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    tile_n = pid % tiles_n
    tile_m = pid // tiles_n
    Wp = W + 2
    x_desc = tl.make_tensor_descriptor(xp_ptr, [rows_total, Cin], [Cin, 1], [BLOCK_M, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, [Cout, 9 * Cin], [9 * Cin, 1], [BLOCK_N, BK])
    q0 = n * (H + 2) * Wp + Wp + tile_m * BLOCK_M
    co0 = tile_n * BLOCK_N
    chunks = Cin // BK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, 9 * chunks, warp_specialize=WS):
        tap = step // chunks
        c0 = (step - tap * chunks) * BK
        a = x_desc.load([q0 + (tap // 3 - 1) * Wp + (tap % 3 - 1), c0])
        b = w_desc.load([co0, tap * Cin + c0])
        acc = tl.dot(a, b.T, acc)
    i = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    h = i // Wp
    w = i % Wp - 1
    co = co0 + tl.arange(0, BLOCK_N)
    ok = ((h < H) & (w >= 0) & (w < W))[:, None] & (co < Cout)[None, :]
    row = (n * H + h) * W + w
    tl.store(out_ptr + row.to(tl.int64)[:, None] * Cout + co[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="NxCinxCoutxHxW, comma-separated")
    args = p.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16, bare convs")
    for spec in args.shapes.split(","):
        N, Cin, Cout, H, W = map(int, spec.split("x"))
        x = torch.randn(N, Cin, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = (torch.randn(Cout, Cin, 3, 3, device="cuda", dtype=torch.float16) / (3 * Cin ** 0.5)).to(
            memory_format=torch.channels_last)
        expected = F.conv2d(x, w, padding=1)
        xp = cp.gn_silu_bordered(x)
        out = torch.empty_like(expected)
        flops = 2 * N * H * W * Cout * 9 * Cin
        cudnn_us = graph_us(lambda: F.conv2d(x, w, padding=1))
        ours_us, note = checked_us(lambda: cp.conv3x3_padded(xp, w, None, None, None, 1.0, out), out, expected,
                                   graph_us)
        print(f"{spec}: cuDNN {cudnn_us:.1f} us ({flops / cudnn_us / 1e6:.0f} TFLOP/s); shipped kernel "
              f"{cp.launch_config(N, Cin, Cout, H, W)} {ours_us:.1f} us ({cudnn_us / ours_us:.2f}x cuDNN) {note}",
              flush=True)
        out_nhwc = torch.empty(N, H, W, Cout, device="cuda", dtype=torch.float16)
        out_view = out_nhwc.permute(0, 3, 1, 2)
        results = []
        for config in CONFIGS:
            bm, bn, bk, warps, stages = config
            if Cin % bk:
                continue
            tiles_m, tiles_n = triton.cdiv((H - 1) * (W + 2) + W + 1, bm), triton.cdiv(Cout, bn)
            for ws in (False, True):
                def run():
                    return _conv_ws[(tiles_m * tiles_n, N)](xp, w, out_nhwc, H, W, Cin, Cout, tiles_n,
                                                           N * (H + 2) * (W + 2), BLOCK_M=bm, BLOCK_N=bn, BK=bk,
                                                           WS=ws, num_warps=warps, num_stages=stages)
                us, note = checked_us(run, out_view, expected, graph_us)
                specialized = "warp_specialize" in run().asm["ttgir"] if us != float("inf") else "?"
                results.append((us, config, ws, specialized, note))
        for us, config, ws, specialized, note in sorted(results, key=lambda r: r[0])[:8]:
            print(f"  {config} WS={ws!s:5} specialized={specialized!s:5}: {us:7.1f} us ({cudnn_us / us:.2f}x cuDNN, "
                  f"{flops / us / 1e6:.0f} TFLOP/s) {note}", flush=True)


if __name__ == "__main__":
    main()
