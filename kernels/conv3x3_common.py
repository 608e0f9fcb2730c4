"""What the two copy-engine (TMA) 3x3 convolutions share (kernels/conv3x3_tma.py, 4-D boxes of the input;
kernels/conv3x3_padded.py, 2-D boxes of a zero-bordered input): the walk of the K steps (9 taps x channel chunks)
split into ranges, the dot, the epilogue and the split-K reduce.

    out[n, :, h, w] = (acc + bias + add[n] + residual[n, :, h, w]) * scale      (each term optional)

With K split, the programs store fp32 partial sums, (SPLIT, N, H, W, Cout) contiguous, and the reduce kernel adds
them in split order, then runs the same epilogue.
"""
import torch
import triton
import triton.language as tl

from .group_norm import store_partials
from .utils import cdiv, fix_cache_keys, interpreting, multiprocessor_count
from .launch import cached_launch

# Tensor descriptors (TMA) need Hopper or newer: both convs, and so these kernels, run there only.
MIN_COMPUTE_CAPABILITY = 90
# Split K until the grid has about this many programs per SM, keeping at least MIN_STEPS_PER_SPLIT steps each.
PROGRAMS_PER_SM = 1
MIN_STEPS_PER_SPLIT = 8
REDUCE_BLOCK = (64, 128)        # (rows, channels) of a reduce program
INTERPRETER_REDUCE_BLOCK = (16, 16)


@triton.jit
def k_range(split, steps_per_split, chunks):
    """The K steps (9 taps x chunks channel chunks) that K range ``split`` walks: [first, last)."""
    first = split * steps_per_split
    return first, tl.minimum(first + steps_per_split, 9 * chunks)


@triton.jit
def dot_bt(a, b, acc, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b.T on the tensor cores, or with DOT_IN_FP32 as exact fp32 products (the interpreter's bf16 dot is
    wrong, triton 3.9; bf16 products are exact in fp32)."""
    if DOT_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.T.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.T, acc)
    return acc


@triton.jit
def store_epilogue(acc, n, h, w, co, co_ok, rows_ok, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr, scale, saN, saC,
                   srN, srC, srH, srW, soN, soC, soH, soW, tile, row_tiles, G_out, Cg_out, K_total,
                   HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr):
    """(acc + bias + add[n] + residual) * scale in fp32, stored in out's dtype at pixels (n, h, w) where rows_ok,
    channels co (n a vector of the rows' samples, or a scalar: HAS_ADD and STATS need a scalar); with STATS the
    per-channel partials of the stored values as tile ``tile`` (of row_tiles) of sample n."""
    mask = rows_ok[:, None] & co_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + n.to(tl.int64) * saN + co * saC, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_pix = n.to(tl.int64) * srN + h.to(tl.int64) * srH + w.to(tl.int64) * srW
        acc += tl.load(res_ptr + res_pix[:, None] + co[None, :] * srC, mask=mask, other=0.0).to(tl.float32)
    y = (acc * scale).to(out_ptr.dtype.element_ty)
    pix = n.to(tl.int64) * soN + h.to(tl.int64) * soH + w.to(tl.int64) * soW
    tl.store(out_ptr + pix[:, None] + co[None, :] * soC, y, mask=mask)
    if STATS:
        # Per-channel (count, mean, M2) of the stored (rounded) values (store_partials' layout), from one sum
        # and one sum of squares: within a tile of at most a few hundred rows, M2 = sum(y^2) - sum(y) * mean loses
        # about (mean^2 / var) * 2^-24 of its digits; the merge across tiles (Chan's formula) cancels nothing.
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        cnt = tl.sum(rows_ok.to(tl.float32), axis=0)
        s1 = tl.sum(yf, axis=0)
        mean = s1 / tl.maximum(cnt, 1.0)
        m2 = tl.maximum(tl.sum(yf * yf, axis=0) - s1 * mean, 0.0)
        store_partials(part_ptr, tl.zeros_like(mean) + cnt, mean, m2, co, co_ok, n, tile, G_out, Cg_out, row_tiles,
                       K_total)


@cached_launch
@triton.jit
def _reduce_splits_kernel(sum_ptr, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr, N, H, W, Cout, scale,
                          row_tiles, G_out, Cg_out, K_total, saN, saC, srN, srC, srH, srW, soN, soC, soH, soW,
                          SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                          STATS: tl.constexpr):
    """Program (t, c, n): rows t*BLOCK_R.. of sample n's H*W pixels, channels c*BLOCK_C..: the SPLIT partial sums
    added in split order, then the epilogue (and the statistics partials as row tile t)."""
    t = tl.program_id(0)
    n = tl.program_id(2)
    p = t * BLOCK_R + tl.arange(0, BLOCK_R)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    co_ok = co < Cout
    HW = H * W
    rows_ok = p < HW
    mask = rows_ok[:, None] & co_ok[None, :]
    offs = (n * HW + p).to(tl.int64)[:, None] * Cout + co[None, :]
    acc = tl.load(sum_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(sum_ptr + (s * N * HW).to(tl.int64) * Cout + offs, mask=mask, other=0.0)
    store_epilogue(acc, n, p // W, p % W, co, co_ok, rows_ok, bias_ptr, add_ptr, res_ptr, out_ptr, part_ptr, scale,
                   saN, saC, srN, srC, srH, srW, soN, soC, soH, soW, t, row_tiles, G_out, Cg_out, K_total,
                   HAS_BIAS, HAS_ADD, HAS_RESIDUAL, STATS)


def split_count(tiles: int, k_steps: int, device, whole_wave: bool = False) -> int:
    """How many K ranges to split into: enough programs to fill the GPU (``whole_wave``: as many as fit in one wave,
    so 67-131 tiles on 132 SMs stay unsplit), each range at least MIN_STEPS_PER_SPLIT steps."""
    slots = PROGRAMS_PER_SM * multiprocessor_count(device)
    want = slots // tiles if whole_wave else cdiv(slots, tiles)
    return max(1, min(want, k_steps // MIN_STEPS_PER_SPLIT))


def reduce_row_tiles(H: int, W: int) -> int:
    """Row tiles of one sample in the reduce kernel (the statistics partials' tile count under split-K)."""
    return cdiv(H * W, (INTERPRETER_REDUCE_BLOCK if interpreting() else REDUCE_BLOCK)[0])


def epilogue_operands(out, bias=None, add=None, residual=None, partials=None) -> tuple:
    """(pointers (bias, add, residual, out, partials), strides (add's 2, residual's 4, out's 4), flags): out stands
    in for the absent tensors, which the flags keep the kernels from reading."""
    pointers = tuple(t if t is not None else out for t in (bias, add, residual, out, partials))
    strides = (*(add.stride() if add is not None else (0, 0)),
               *(residual.stride() if residual is not None else (0, 0, 0, 0)), *out.stride())
    flags = dict(HAS_BIAS=bias is not None, HAS_ADD=add is not None, HAS_RESIDUAL=residual is not None,
                 STATS=partials is not None)
    return pointers, strides, flags


def reduce_splits(sums, split, out, scale, operands, G_out=1, K_total=0):
    """out (N, Cout, H, W) = the epilogue of the split partial sums ``sums`` (split, N*H*W, Cout) fp32; operands
    from epilogue_operands (with partials: the statistics as reduce_row_tiles(H, W) tiles a sample)."""
    N, Cout, H, W = out.shape
    pointers, strides, flags = operands
    block_r, block_c = INTERPRETER_REDUCE_BLOCK if interpreting() else REDUCE_BLOCK
    row_tiles = reduce_row_tiles(H, W)
    _reduce_splits_kernel[(row_tiles, cdiv(Cout, block_c), N)](
        sums, *pointers, N, H, W, Cout, float(scale), row_tiles, G_out, Cout // G_out, K_total, *strides,
        SPLIT=split, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4, **flags)


def split_sums(split, N, H, W, Cout, device):
    """The fp32 partial sums buffer of a K split."""
    return torch.empty((split, N * H * W, Cout), device=device, dtype=torch.float32)


fix_cache_keys(globals())  # last: see its docstring
