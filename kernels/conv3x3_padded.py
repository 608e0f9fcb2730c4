"""3x3 convolution (stride 1, zero padding 1) of an input stored with its zero border, as nine shifted 2-D GEMMs
whose operands Hopper's copy engine (TMA) loads straight into the tensor cores' shared-memory layout.

    out[n, :, h, w] = ( bias + add[n] + sum_{kh, kw, ci} W[:, ci, kh, kw] * xp[n, h+kh, w+kw, ci]
                        [+ residual[n, :, h, w]] ) * scale
    xp = x with a one-pixel zero border, (N, H+2, W+2, Cin) contiguous (NHWC)

Why the border is stored: flatten xp to a (N*(H+2)*(W+2), Cin) matrix. Output pixel (h, w) sits at padded row
q = (h+1)*(W+2) + (w+1) of its image, and its tap (kh, kw) reads row q + (kh-1)*(W+2) + (kw-1): a constant shift per
tap. So a tile of BLOCK_M consecutive padded rows is, for each tap, one (BLOCK_M, BK) box of the flat matrix at a
shifted origin, a plain 2-D descriptor load that feeds the dot from shared memory. (kernels/conv3x3_tma.py loads a
4-D (1, BH, BW, BK) box, which Triton 3.6 turns into the dot's operand through registers.) The tile's rows that fall
on the border columns compute values nobody stores: 2 of every W+2 rows. The border must hold zeros:
gn_silu_bordered, which writes a ResNet block conv's normalized input, writes it with the interior, so the
bordered layout costs no pass of its own there.

Tiles never straddle two samples: tile t of sample n covers its padded rows from (1, 0) on, so per-sample values
(the time-embedding term, the output statistics) are vectors per program. The epilogue stores the output's
(count, mean, M2) partials per (sample, channel, tile) for the next GroupNorm (kernels/group_norm.store_partials).
With SPLIT > 1 each program walks one of SPLIT ranges of the K steps and stores fp32 partial sums; the reduce kernel
adds them in split order with the epilogue. The weight, channels_last (Cout, 3, 3, Cin), is the (Cout, 9*Cin)
matrix whose K index is tap*Cin + c; a chunk past Cin reads the next tap's weights against x's zero-filled columns.
"""
import torch
import triton
import triton.language as tl

from .conv3x3 import _gn_silu
from .conv3x3_common import (dot_bt, epilogue_operands, k_range, reduce_row_tiles, reduce_splits, split_count,
                             split_sums, store_epilogue)
from .group_norm import finalize_partials
from .utils import cdiv, interpreting, fix_cache_keys

# Tensor descriptors (TMA) need Hopper or newer.
MIN_COMPUTE_CAPABILITY = 90

# (BLOCK_M, BLOCK_N, BK, num_warps, num_stages), chosen by launch_config from the best of 11 configs per shape
# (scripts/probe_conv3x3_padded.py, H200, session 22).
SMALL_IMAGE_CONFIG = (64, 128, 128, 4, 3)    # <= 256 pixels an image (SD1.5's 16x16, 8x8), <= 4096 in all
WIDE_CONFIG = (128, 128, 128, 8, 3)          # >= 640 channels in and out (SD1.5's 32x32, SDXL's 64x64 and 32x32)
LARGE_CONFIG = (256, 128, 64, 8, 3)          # >= 16384 pixels (the VAE's and SDXL's high resolutions)
CONFIG = (128, 128, 64, 4, 3)
INTERPRETER_CONFIG = (32, 16, 16, 1, 1)
BORDERED_BLOCK = (64, 64)       # (padded pixels, channels) of a gn_silu_bordered program
INTERPRETER_BORDERED_BLOCK = (16, 16)


@triton.jit
def _gn_silu_bordered_kernel(x_ptr, stats_ptr, nw_ptr, nb_ptr, out_ptr, H, W, C, G, Cg, sxN, sxC, sxH, sxW,
                             NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, NORM_BIAS: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (t, c, n): padded pixels t*BLOCK_P.. of sample n, channels c*BLOCK_C..: silu(group_norm(x)) (or x
    itself without NORM) inside the image, zero on the border, in x's dtype."""
    n = tl.program_id(2)
    Wp = W + 2
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // Wp - 1
    w = p % Wp - 1
    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    load_mask = inside[:, None] & c_ok[None, :]
    pix = n.to(tl.int64) * sxN + h.to(tl.int64) * sxH + w.to(tl.int64) * sxW
    a = tl.load(x_ptr + pix[:, None] + c[None, :] * sxC, mask=load_mask, other=0.0)
    if NORM:
        a = _gn_silu(a, n, c, c_ok, stats_ptr, nw_ptr, nb_ptr, G, Cg, C, NORM_WEIGHT, NORM_BIAS, False, True,
                     False)  # the exact SiLU: this pass is memory-bound
        a = tl.where(load_mask, a, 0.0)  # the zero padding is of the normalized activation
    row = n.to(tl.int64) * (H + 2) * Wp + p
    tl.store(out_ptr + row[:, None] * C + c[None, :], a.to(out_ptr.dtype.element_ty),
             mask=(p < (H + 2) * Wp)[:, None] & c_ok[None, :])


@triton.jit
def _conv3x3_padded_kernel(x_desc, w_desc, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr,
                           H, W, Cin, Cout, tiles_m, tiles_n, chunks, steps_per_split, scale, G_out, Cg_out, K_total,
                           saN, saC, srN, srC, srH, srW, soN, soC, soH, soW,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           STATS: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # Neighbouring programs take the channel blocks of one pixel tile: its input rows are read once into L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.program_id(2)
    tile_n = pid % tiles_n
    tile_m = pid // tiles_n
    Wp = W + 2
    q0 = n * (H + 2) * Wp + Wp + tile_m * BLOCK_M   # the tile's first padded row: (1, 0) of sample n, then on
    co0 = tile_n * BLOCK_N

    first, last = k_range(split, steps_per_split, chunks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, last):
        tap = step // chunks
        c0 = (step - tap * chunks) * BK
        a = x_desc.load([q0 + (tap // 3 - 1) * Wp + (tap % 3 - 1), c0])
        b = w_desc.load([co0, tap * Cin + c0])
        acc = dot_bt(a, b, acc, DOT_IN_FP32)

    i = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)   # padded position from (1, 0): h * Wp + w + 1
    h = i // Wp
    w = i % Wp - 1
    co = co0 + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    rows_ok = (h < H) & (w >= 0) & (w < W)
    if SPLIT > 1:
        # fp32 partials, (SPLIT, N, H, W, Cout) contiguous: the reduce kernel adds them in split order.
        row = ((split * tl.num_programs(2) + n) * H + h) * W + w
        tl.store(part_ptr + row.to(tl.int64)[:, None] * Cout + co[None, :], acc,
                 mask=rows_ok[:, None] & co_ok[None, :])
    else:
        store_epilogue(acc, n, h, w, co, co_ok, rows_ok, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr, scale, saN,
                       saC, srN, srC, srH, srW, soN, soC, soH, soW, tile_m, tiles_m, G_out, Cg_out, K_total,
                       HAS_BIAS, HAS_ADD, HAS_RESIDUAL, STATS)


def launch_config(N: int, Cin: int, Cout: int, H: int, W: int):
    """(BLOCK_M, BLOCK_N, BK, num_warps, num_stages) for this conv: the probe's best, or within 5% of it, at the
    SD1.5, SDXL and VAE shapes (2x320x320x64x64 38.7 us, 2x640x640x32x32 39.9, 2x1280x1280x16x16 63.7,
    1x512x512x64x64 47.0, 1x256x256x512x512 543.5, H200)."""
    if interpreting():
        return INTERPRETER_CONFIG
    if H * W <= 256:
        return SMALL_IMAGE_CONFIG
    if Cin >= 640 and Cout >= 640:
        return WIDE_CONFIG
    if N * H * W <= 4096:
        return SMALL_IMAGE_CONFIG
    return LARGE_CONFIG if N * H * W >= 16384 else CONFIG


def gn_silu_bordered(x, norm=None, out=None):
    """The (N, H+2, W+2, C) contiguous buffer holding silu(group_norm(x)) (x itself when ``norm`` is None) inside a
    zero border, in x's dtype: what conv3x3_padded reads. x (N, C, H, W) any strides; norm (stats (N, G, 2) fp32
    contiguous (mean, rstd), weight or None, bias or None); ``out`` the buffer to write (every element of it), else
    a new one."""
    N, C, H, W = x.shape
    if out is None:
        out = torch.empty((N, H + 2, W + 2, C), device=x.device, dtype=x.dtype)
    stats, nw, nb = norm if norm is not None else (None, None, None)
    G = stats.shape[1] if stats is not None else 1
    bp, bc = INTERPRETER_BORDERED_BLOCK if interpreting() else BORDERED_BLOCK
    _gn_silu_bordered_kernel[(cdiv((H + 2) * (W + 2), bp), cdiv(C, bc), N)](
        x, stats if stats is not None else x, nw if nw is not None else x, nb if nb is not None else x, out,
        H, W, C, G, C // G, *x.stride(), NORM=norm is not None, NORM_WEIGHT=nw is not None,
        NORM_BIAS=nb is not None, BLOCK_P=bp, BLOCK_C=bc, num_warps=4)
    return out


def conv3x3_padded(xp, weight, bias, add, residual, scale, out, stats_groups=0, stats_eps=1e-6, config=None,
                   split=None):
    """out (N, Cout, H, W), any strides, = the conv of the bordered input xp (N, H+2, W+2, Cin) contiguous, whose
    border holds zeros; weight channels_last (Cout, Cin, 3, 3) of xp's 16-bit dtype, Cin a multiple of 8; add
    (N, Cout) or None; residual (N, Cout, H, W) any strides or None. Returns the (N*G', 2) fp32 (mean, rstd) of
    out's stats_groups = G' groups, or None when 0. ``config`` and ``split`` override the defaults."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    N, Hp, Wp, Cin = xp.shape
    H, W = Hp - 2, Wp - 2
    Cout = weight.shape[0]
    bm, bn, bk, warps, stages = config or launch_config(N, Cin, Cout, H, W)
    x_desc = TensorDescriptor(xp, [N * Hp * Wp, Cin], [Cin, 1], [bm, bk])
    w_desc = TensorDescriptor(weight, [Cout, 9 * Cin], [9 * Cin, 1], [bn, bk])
    # Sample n's positions from padded (1, 0) through its last interior pixel (H, W).
    tiles_m, tiles_n, chunks = cdiv((H - 1) * Wp + W + 1, bm), cdiv(Cout, bn), cdiv(Cin, bk)
    k_steps = 9 * chunks
    split = split or split_count(tiles_m * tiles_n * N, k_steps, xp.device)
    steps_per_split = cdiv(k_steps, split)
    split = cdiv(k_steps, steps_per_split)  # no empty range
    row_tiles = tiles_m if split == 1 else reduce_row_tiles(H, W)
    G_out = max(stats_groups, 1)
    K_total = N * row_tiles * Cout
    partials = torch.empty((3, K_total), device=xp.device, dtype=torch.float32) if stats_groups else None
    operands = epilogue_operands(out, bias, add, residual, partials)
    pointers, strides, flags = operands
    sums = split_sums(split, N, H, W, Cout, xp.device) if split > 1 else None
    _conv3x3_padded_kernel[(tiles_m * tiles_n, split, N)](
        x_desc, w_desc, *pointers[:4], sums if sums is not None else pointers[4],
        H, W, Cin, Cout, tiles_m, tiles_n, chunks, steps_per_split, float(scale), G_out, Cout // G_out, K_total,
        *strides, BLOCK_M=bm, BLOCK_N=bn, BK=bk, SPLIT=split,
        # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
        DOT_IN_FP32=interpreting() and xp.dtype == torch.bfloat16, num_warps=warps, num_stages=stages,
        **dict(flags, STATS=flags["STATS"] and split == 1))
    if sums is not None:
        reduce_splits(sums, split, out, scale, operands, G_out, K_total)
    if not stats_groups:
        return None
    return finalize_partials(partials, row_tiles * (Cout // G_out), stats_eps)


fix_cache_keys(globals())  # last: see its docstring
