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
With K split into S > 1 ranges, each program walks one of them and stores fp32 partial sums; the reduce kernel
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
from .launch import cached_launch

# Tensor descriptors (TMA) need Hopper or newer.
MIN_COMPUTE_CAPABILITY = 90

# (BLOCK_M, BLOCK_N, BK, num_warps, num_stages), chosen by launch_config from the best of 11-17 configs and 3-5 K
# splits per shape (scripts/probe_conv3x3_padded.py, H200; sessions 22 and 23: CUDA-graph replays at 16x16, 8x8).
SMALL_IMAGE_CONFIG = (64, 128, 128, 4, 4)      # SD1.5's 16 x 16 (4 stages: 16% faster than 3 there)
FEW_PIXELS_CONFIG = (64, 128, 128, 4, 3)       # <= 4096 pixels in all
WIDE_CONFIG = (128, 128, 128, 8, 3)          # >= 640 channels in and out (SD1.5's 32x32, SDXL's 64x64 and 32x32),
                                             # and SD1.5's 8 x 8 with K split 6 ways
LARGE_CONFIG = (256, 128, 64, 8, 3)          # >= 8192 pixels (SD1.5's 64 x 64, the VAE's and SDXL's high resolutions)
CONFIG = (128, 128, 64, 4, 3)                # 4097-8191 pixels
INTERPRETER_CONFIG = (32, 16, 16, 1, 1)
BORDERED_BLOCK = (64, 64)       # (padded pixels, channels) of a gn_silu_bordered program
INTERPRETER_BORDERED_BLOCK = (16, 16)


@cached_launch
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
def _tile_sum(x_desc, w_desc, n, tile_m, tile_n, H, Wp, Cin, chunks, first, last, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BK: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """The fp32 sum over K steps [first, last) of tile (tile_m, tile_n) of sample n: BLOCK_M padded rows from
    (1, 0) + tile_m * BLOCK_M by BLOCK_N output channels."""
    q0 = n * (H + 2) * Wp + Wp + tile_m * BLOCK_M   # the tile's first padded row: (1, 0) of sample n, then on
    co0 = tile_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, last):
        tap = step // chunks
        c0 = (step - tap * chunks) * BK
        a = x_desc.load([q0 + (tap // 3 - 1) * Wp + (tap % 3 - 1), c0])
        b = w_desc.load([co0, tap * Cin + c0])
        acc = dot_bt(a, b, acc, DOT_IN_FP32)
    return acc


@triton.jit
def _tile_pixels(tile_m, tile_n, H, W, Cout, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(h, w, rows_ok, co, co_ok) of a tile's rows and channels: which rows are image pixels, not border."""
    Wp = W + 2
    i = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)   # padded position from (1, 0): h * Wp + w + 1
    h = i // Wp
    w = i % Wp - 1
    co = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return h, w, (h < H) & (w >= 0) & (w < W), co, co < Cout


@triton.jit
def _finish_tile(acc, n, tile_m, tile_n, tiles_m, H, W, Cout, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr, scale,
                 saN, saC, srN, srC, srH, srW, soN, soC, soH, soW, G_out, Cg_out, K_total,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr):
    """The epilogue of a whole tile's sum: stored at its image pixels, its statistics as row tile tile_m."""
    h, w, rows_ok, co, co_ok = _tile_pixels(tile_m, tile_n, H, W, Cout, BLOCK_M, BLOCK_N)
    store_epilogue(acc, n, h, w, co, co_ok, rows_ok, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr, scale, saN, saC,
                   srN, srC, srH, srW, soN, soC, soH, soW, tile_m, tiles_m, G_out, Cg_out, K_total,
                   HAS_BIAS, HAS_ADD, HAS_RESIDUAL, STATS)


@triton.jit
def _conv3x3_padded_kernel(x_desc, w_desc, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr,
                           H, W, Cin, Cout, tiles_m, tiles_n, chunks, steps_per_split, scale, G_out, Cg_out, K_total,
                           saN, saC, srN, srC, srH, srW, soN, soC, soH, soW,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # Neighbouring programs take the channel blocks of one pixel tile: its input rows are read once into L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.program_id(2)
    tile_n = pid % tiles_n
    tile_m = pid // tiles_n
    first, last = k_range(split, steps_per_split, chunks)
    acc = _tile_sum(x_desc, w_desc, n, tile_m, tile_n, H, W + 2, Cin, chunks, first, last, BLOCK_M, BLOCK_N, BK,
                    DOT_IN_FP32)
    if SPLIT_K:  # a flag, not the count: split counts share one compiled kernel
        # fp32 partials, (split count, N, H, W, Cout) contiguous: the reduce kernel adds them in split order.
        h, w, rows_ok, co, co_ok = _tile_pixels(tile_m, tile_n, H, W, Cout, BLOCK_M, BLOCK_N)
        row = ((split * tl.num_programs(2) + n) * H + h) * W + w
        tl.store(part_ptr + row.to(tl.int64)[:, None] * Cout + co[None, :], acc,
                 mask=rows_ok[:, None] & co_ok[None, :])
    else:
        _finish_tile(acc, n, tile_m, tile_n, tiles_m, H, W, Cout, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr,
                     scale, saN, saC, srN, srC, srH, srW, soN, soC, soH, soW, G_out, Cg_out, K_total, BLOCK_M,
                     BLOCK_N, HAS_BIAS, HAS_ADD, HAS_RESIDUAL, STATS)


def launch_config(N: int, Cin: int, Cout: int, H: int, W: int):
    """((BLOCK_M, BLOCK_N, BK, num_warps, num_stages), K split or None for split_count's) for this conv: the probe's
    best, or within 5% of it, at the SD1.5, SDXL and VAE shapes, H200. From do_bench (session 22): 1x512x512x64x64
    47.0 us, 1x256x256x512x512 543.5; from CUDA-graph replays (session 23): 2x640x640x32x32 33.3,
    2x1280x1280x16x16 40.6-42.0 (48.3 with 3 stages and the automatic split), 2x2560x1280x16x16 84.7-85.4; session
    24: 2x1280x1280x8x8 21.7 (CONFIG split 6 23.5, split 10 23.1), 2x2560x1280x8x8 36.3 (CONFIG split 10 38.3); the
    64 x 64 convs of SD1.5's blocks with their epilogues (temb + output statistics; residual) 2-7% faster on the
    256-row tile than CONFIG, unsplit (2x320x320x64x64 40.1 and 36.7 us against 41.6 and 37.4; session 23's block
    slowdown on it came from a K split of 2, which split_count's whole-wave rule no longer makes)."""
    if interpreting():
        return INTERPRETER_CONFIG, None
    if H * W <= 64:
        return WIDE_CONFIG, 6  # 80 of each sample's 128 rows: split K to fill the SMs
    if H * W <= 256:
        return SMALL_IMAGE_CONFIG, None
    if Cin >= 640 and Cout >= 640:
        return WIDE_CONFIG, None
    if N * H * W <= 4096:
        return FEW_PIXELS_CONFIG, None
    return (LARGE_CONFIG if N * H * W >= 8192 else CONFIG), None


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
    default_config, default_split = launch_config(N, Cin, Cout, H, W)
    bm, bn, bk, warps, stages = config or default_config
    x_desc = TensorDescriptor(xp, [N * Hp * Wp, Cin], [Cin, 1], [bm, bk])
    w_desc = TensorDescriptor(weight, [Cout, 9 * Cin], [9 * Cin, 1], [bn, bk])
    # Sample n's positions from padded (1, 0) through its last interior pixel (H, W).
    tiles_m, tiles_n, chunks = cdiv((H - 1) * Wp + W + 1, bm), cdiv(Cout, bn), cdiv(Cin, bk)
    k_steps = 9 * chunks
    # One wave at most: the reduce kernel's fp32 partials cost more than a third of the SMs idle (2x640x640x32x32,
    # 90 tiles: 33.3 us unsplit, over 37.2 split in 2; 2x1280x1280x16x16, 100 tiles: 41.7 against 58.3 in 6).
    split = split or (default_split if config is None else None) or split_count(tiles_m * tiles_n * N, k_steps,
                                                                                 xp.device, whole_wave=True)
    steps_per_split = cdiv(k_steps, split)
    split = cdiv(k_steps, steps_per_split)  # no empty range
    row_tiles = tiles_m if split == 1 else reduce_row_tiles(H, W)
    G_out = max(stats_groups, 1)
    K_total = N * row_tiles * Cout
    partials = torch.empty((3, K_total), device=xp.device, dtype=torch.float32) if stats_groups else None
    operands = epilogue_operands(out, bias, add, residual, partials)
    pointers, strides, flags = operands
    # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
    dot_in_fp32 = interpreting() and xp.dtype == torch.bfloat16
    sums = split_sums(split, N, H, W, Cout, xp.device) if split > 1 else None
    _conv3x3_padded_kernel[(tiles_m * tiles_n, split, N)](
        x_desc, w_desc, *pointers[:4], sums if sums is not None else pointers[4],
        H, W, Cin, Cout, tiles_m, tiles_n, chunks, steps_per_split, float(scale), G_out, Cout // G_out, K_total,
        *strides, BLOCK_M=bm, BLOCK_N=bn, BK=bk, SPLIT_K=split > 1, DOT_IN_FP32=dot_in_fp32,
        num_warps=warps, num_stages=stages, **dict(flags, STATS=flags["STATS"] and split == 1))
    if sums is not None:
        reduce_splits(sums, split, out, scale, operands, G_out, K_total)
    if not stats_groups:
        return None
    return finalize_partials(partials, row_tiles * (Cout // G_out), stats_eps)


fix_cache_keys(globals())  # last: see its docstring
