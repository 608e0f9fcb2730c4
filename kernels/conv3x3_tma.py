"""3x3 convolution (stride 1, zero padding 1) as an implicit GEMM whose operands Hopper's copy engine (TMA) loads,
with split-K for the small images where one tile per (sample, pixel block, channel block) leaves most SMs idle.

    out[n, :, h, w] = (bias + sum_{kh, kw, ci} W[:, ci, kh, kw] * x[n, ci, h+kh-1, w+kw-1] [+ residual]) * scale

x is read through a 4-D tensor descriptor over its (N, H, W, C) channels_last view, one (1, BH, BW, BK) box per
(tap, channel chunk) at the tap's shifted origin (n, h0 + kh - 1, w0 + kw - 1, c0): the copy engine fills the box's
rows and columns outside the image (the zero padding, negative coordinates included) and channels past C with
zeros, so the K walk has no masks and no address arithmetic, and the box lands in shared memory in the layout the
tensor cores read. The weight, channels_last (Cout, 3, 3, Cin), is the (Cout, 9 * Cin) matrix whose K index is
tap * Cin + c; a chunk that runs past Cin reads the next tap's weights, which meet x's zero-filled channels.

A program owns BH x BW pixels of one sample by BLOCK_N output channels and walks K_STEPS = 9 * cdiv(Cin, BK) steps,
or with SPLIT > 1 one of SPLIT contiguous ranges of them: it then stores its fp32 partial sums, and the reduce
kernel adds the SPLIT partials with the epilogue (bias, residual, scale) in fp32 and rounds once.
"""
import torch
import triton
import triton.language as tl

from .conv3x3_common import (dot_bt, epilogue_operands, k_range, reduce_splits, split_count, split_sums,
                             store_epilogue)
from .utils import cdiv, interpreting, fix_cache_keys

# Tensor descriptors (TMA) need Hopper or newer: sdkernels::conv3x3 offers this backend there only.
MIN_COMPUTE_CAPABILITY = 90

# (BNI, BH, BW, BLOCK_N, BK, num_warps, num_stages): a tile of BNI samples x BH x BW pixels by BLOCK_N output
# channels. One warpgroup (4 warps) per program: on an H100 with Triton 3.6, 8-warp configs with 128-pixel tiles
# computed wrong sums at grids of more than one wave (relative error 0.03-0.1; scripts/sweep_conv3x3_tma.py), the
# 4-warp ones never did. 8 x 8 images (SD1.5's deepest level) take both samples of a CFG batch in one tile, so each
# weight box is read once for both.
SMALL_IMAGE_CONFIG = (2, 8, 8, 128, 64, 4, 4)
CONFIG = (1, 8, 16, 128, 64, 4, 4)
INTERPRETER_CONFIG = (1, 4, 4, 16, 16, 1, 1)


@triton.jit
def _conv3x3_tma_kernel(x_desc, w_desc, bias_ptr, res_ptr, out_ptr, part_ptr,
                        N, H, W, Cin, Cout, tiles_h, tiles_w, tiles_n, chunks, steps_per_split, scale,
                        srN, srC, srH, srW, soN, soC, soH, soW,
                        BNI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
                        BK: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        DOT_IN_FP32: tl.constexpr):
    # Neighbouring programs take the channel blocks of one pixel block: its input boxes are read once into L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tile_n = pid % tiles_n
    t = pid // tiles_n
    tile_w = t % tiles_w
    t = t // tiles_w
    tile_h = t % tiles_h
    n0 = (t // tiles_h) * BNI
    h0 = tile_h * BH
    w0 = tile_w * BW
    co0 = tile_n * BLOCK_N
    BLOCK_M: tl.constexpr = BNI * BH * BW

    first, last = k_range(split, steps_per_split, chunks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, last):
        tap = step // chunks
        c0 = (step - tap * chunks) * BK
        a = x_desc.load([n0, h0 + tap // 3 - 1, w0 + tap % 3 - 1, c0]).reshape(BLOCK_M, BK)
        b = w_desc.load([co0, tap * Cin + c0])
        acc = dot_bt(a, b, acc, DOT_IN_FP32)

    i = tl.arange(0, BLOCK_M)
    n = n0 + i // (BH * BW)
    h = h0 + (i // BW) % BH
    w = w0 + i % BW
    co = co0 + tl.arange(0, BLOCK_N)
    mask = ((n < N) & (h < H) & (w < W))[:, None] & (co < Cout)[None, :]
    if SPLIT > 1:
        # fp32 partials, (SPLIT, N, H, W, Cout) contiguous: the reduce kernel adds them in split order.
        row = ((split * N + n) * H + h) * W + w
        tl.store(part_ptr + row.to(tl.int64)[:, None] * Cout + co[None, :], acc, mask=mask)
    else:  # no time-embedding add, no statistics: their pointers and sizes stand unused
        store_epilogue(acc, n, h, w, co, co < Cout, (n < N) & (h < H) & (w < W), bias_ptr, bias_ptr, res_ptr,
                       out_ptr, out_ptr, scale, 0, 0, srN, srC, srH, srW, soN, soC, soH, soW, 0, 1, 1, 1, 0,
                       HAS_BIAS, False, HAS_RESIDUAL, False)


def launch_config(H: int, W: int):
    """(BNI, BH, BW, BLOCK_N, BK, num_warps, num_stages) for images of H x W."""
    if interpreting():
        return INTERPRETER_CONFIG
    return SMALL_IMAGE_CONFIG if H * W <= 64 else CONFIG


def conv3x3_tma(x, weight, bias, residual, scale, out, config=None, split=None):
    """out = (conv(x, weight) + bias + residual) * scale, out and residual (N, Cout, H, W) in any strides; x and
    weight channels_last, of one 16-bit dtype, Cin a multiple of 8, 16-byte aligned (sdkernels::conv3x3's
    triton_tma backend checks). ``config`` and ``split`` override launch_config and split_count."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    bni, bh, bw, bn, bk, warps, stages = config or launch_config(H, W)
    # Dense NHWC strides written out: torch may give a size-1 dim any stride, which a descriptor would reject.
    x_desc = TensorDescriptor(x, [N, H, W, Cin], [H * W * Cin, W * Cin, Cin, 1], [bni, bh, bw, bk])
    w_desc = TensorDescriptor(weight, [Cout, 9 * Cin], [9 * Cin, 1], [bn, bk])
    tiles_h, tiles_w, tiles_n, chunks = cdiv(H, bh), cdiv(W, bw), cdiv(Cout, bn), cdiv(Cin, bk)
    tiles = cdiv(N, bni) * tiles_h * tiles_w * tiles_n
    k_steps = 9 * chunks
    split = split or split_count(tiles, k_steps, x.device)
    steps_per_split = cdiv(k_steps, split)
    split = cdiv(k_steps, steps_per_split)  # no empty range
    part = split_sums(split, N, H, W, Cout, x.device) if split > 1 else out
    operands = epilogue_operands(out, bias, None, residual)
    (bias_arg, _, res_arg, _, _), strides, flags = operands
    _conv3x3_tma_kernel[(tiles, split)](
        x_desc, w_desc, bias_arg, res_arg, out, part, N, H, W, Cin, Cout, tiles_h, tiles_w, tiles_n, chunks,
        steps_per_split, float(scale), *strides[2:], BNI=bni, BH=bh, BW=bw, BLOCK_N=bn, BK=bk, SPLIT=split,
        # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
        DOT_IN_FP32=interpreting() and x.dtype == torch.bfloat16, num_warps=warps, num_stages=stages,
        HAS_BIAS=flags["HAS_BIAS"], HAS_RESIDUAL=flags["HAS_RESIDUAL"])
    if split > 1:
        reduce_splits(part, split, out, scale, operands)
    return out


fix_cache_keys(globals())  # last: see its docstring
