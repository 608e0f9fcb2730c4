"""GroupNorm (+SiLU) (+residual) in Triton, for NCHW-like and channels_last tensors without layout copies.

The tensor is seen as (N, C, S) with S the flattened spatial size and strides (sN, sC, sS). A group of batch n
is the flat range i in [0, Cg*S); ``CHANNELS_LAST`` picks which of (channel, spatial) varies fastest with i, so
that consecutive i are consecutive addresses in both layouts.

Two plans:
  * one pass: one program per (n, g) holds the whole group in registers (small groups);
  * split: a statistics kernel where each of SPLIT programs per group folds its tiles into (count, mean, M2),
    then an apply kernel that merges the SPLIT partials (Chan's formula) and normalizes one tile per program.
Statistics are fp32 and two-pass within each tile, merged with Chan's formula, so large groups (4 M elements in
the VAE decoder) keep their precision.
"""
import torch
import triton
import triton.language as tl

from .utils import multiprocessor_count, next_power_of_2

ONE_PASS_MAX = 8192      # largest group held in one program's registers
TILE = 4096              # elements per tile in the split plan
MAX_SPLIT = 64           # partials per group (the apply kernel reads them all)


@triton.jit
def _addresses(n, g, i, Cg, S, sN, sC, sS, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr = False):
    if FLAT:
        # Contiguous NCHW: a group is one contiguous run, so the address is an affine function of i that Triton
        # can see is contiguous (16-byte vector loads); the channel only matters for the affine weights.
        ch = g * Cg + i // S
        return n.to(tl.int64) * sN + (g * Cg).to(tl.int64) * sC + i, ch
    if CHANNELS_LAST:
        s = i // Cg
        c = i - s * Cg
    else:
        c = i // S
        s = i - c * S
    ch = g * Cg + c
    return n.to(tl.int64) * sN + ch.to(tl.int64) * sC + s.to(tl.int64) * sS, ch


@triton.jit
def _normalize_store(x, mean, rstd, ch, mask, offs_out, offs_res, w_ptr, b_ptr, res_ptr, out_ptr,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + ch, mask=mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    if HAS_RESIDUAL:
        y = y + tl.load(res_ptr + offs_res, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_one_pass(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, G, Cg, S, eps,
                         sxN, sxC, sxS, srN, srC, srS, soN, soC, soS,
                         BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    size = Cg * S
    i = tl.arange(0, BLOCK)
    mask = i < size
    offs_x, ch = _addresses(n, g, i, Cg, S, sxN, sxC, sxS, CHANNELS_LAST, FLAT)
    x = tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / size
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / size + eps)
    offs_o, _ = _addresses(n, g, i, Cg, S, soN, soC, soS, CHANNELS_LAST, FLAT)
    offs_r, _ = _addresses(n, g, i, Cg, S, srN, srC, srS, CHANNELS_LAST, FLAT)
    _normalize_store(x, mean, rstd, ch, mask, offs_o, offs_r, w_ptr, b_ptr, res_ptr, out_ptr,
                     HAS_WEIGHT, HAS_BIAS, SILU, HAS_RESIDUAL)


@triton.jit
def _group_norm_partial_stats(x_ptr, part_ptr, G, Cg, S, sxN, sxC, sxS, tiles_per_program,
                              SPLIT: tl.constexpr, TILE_SIZE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                              FLAT: tl.constexpr):
    """Program (ng, p) folds tiles p*tiles_per_program ... of group ng into (count, mean, M2) at part[ng, p]."""
    ng = tl.program_id(0)
    p = tl.program_id(1)
    n = ng // G
    g = ng - n * G
    size = Cg * S
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(tiles_per_program):
        i = (p * tiles_per_program + t) * TILE_SIZE + tl.arange(0, TILE_SIZE)
        mask = i < size
        offs, _ = _addresses(n, g, i, Cg, S, sxN, sxC, sxS, CHANNELS_LAST, FLAT)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cnt = tl.sum(mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(cnt, 1.0)
        d = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = count + cnt
        delta = tile_mean - mean
        frac = cnt / tl.maximum(total, 1.0)
        mean = mean + delta * frac
        m2 = m2 + tile_m2 + delta * delta * count * frac
        count = total
    base = part_ptr + (ng * SPLIT + p) * 3
    tl.store(base + 0, count)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit
def _group_norm_apply(x_ptr, part_ptr, w_ptr, b_ptr, res_ptr, out_ptr, G, Cg, S, eps,
                      sxN, sxC, sxS, srN, srC, srS, soN, soC, soS,
                      SPLIT: tl.constexpr, TILE_SIZE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      FLAT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr):
    ng = tl.program_id(0)
    tile = tl.program_id(1)
    n = ng // G
    g = ng - n * G
    # Merge the SPLIT partials of this group (Chan et al.): mean = sum(c*m)/sum(c), M2 = sum(M2 + c*(m-mean)^2).
    k = tl.arange(0, SPLIT)
    base = part_ptr + (ng * SPLIT + k) * 3
    cnt = tl.load(base + 0)
    means = tl.load(base + 1)
    m2s = tl.load(base + 2)
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * means, axis=0) / total
    dm = means - mean
    var = (tl.sum(m2s, axis=0) + tl.sum(cnt * dm * dm, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)

    i = tile * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = i < Cg * S
    offs_x, ch = _addresses(n, g, i, Cg, S, sxN, sxC, sxS, CHANNELS_LAST, FLAT)
    x = tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32)
    offs_o, _ = _addresses(n, g, i, Cg, S, soN, soC, soS, CHANNELS_LAST, FLAT)
    offs_r, _ = _addresses(n, g, i, Cg, S, srN, srC, srS, CHANNELS_LAST, FLAT)
    _normalize_store(x, mean, rstd, ch, mask, offs_o, offs_r, w_ptr, b_ptr, res_ptr, out_ptr,
                     HAS_WEIGHT, HAS_BIAS, SILU, HAS_RESIDUAL)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def group_norm_triton(x, num_groups, weight, bias, eps, silu, residual, out, strides, plan=None):
    """Launch on x seen as (N, C, S). ``strides`` gives (x, residual, out) strides as (sN, sC, sS) triples and
    whether channels vary fastest (channels_last); the caller checked shapes, dtypes and layouts."""
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // max(N * C, 1)
    G = num_groups
    Cg = C // G
    size = Cg * S
    (sx, sr, so), channels_last = strides
    flat = all(t is None or t.is_contiguous() for t in (x, residual, out))
    flags = dict(CHANNELS_LAST=channels_last, FLAT=flat, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 SILU=bool(silu), HAS_RESIDUAL=residual is not None)
    # Unused pointers still need a tensor; x is never read through them because the flags are off.
    w, b, r = (weight if weight is not None else x, bias if bias is not None else x,
               residual if residual is not None else x)
    if plan is None:
        plan = "one_pass" if size <= ONE_PASS_MAX else "split"
    if plan == "one_pass":
        block = next_power_of_2(size)
        _group_norm_one_pass[(N * G,)](x, w, b, r, out, G, Cg, S, eps, *sx, *sr, *so, BLOCK=block,
                                       num_warps=_warps(block), **flags)
        return out
    tiles = triton.cdiv(size, TILE)
    # Enough statistics programs to fill the GPU a few times over, at most MAX_SPLIT per group.
    want = max(1, 4 * multiprocessor_count(x.device) // max(N * G, 1))
    split = min(MAX_SPLIT, next_power_of_2(min(want, tiles)))
    tiles_per_program = triton.cdiv(tiles, split)
    partials = torch.empty((N * G, split, 3), device=x.device, dtype=torch.float32)
    _group_norm_partial_stats[(N * G, split)](x, partials, G, Cg, S, *sx, tiles_per_program, SPLIT=split,
                                              TILE_SIZE=TILE, CHANNELS_LAST=channels_last,
                                              FLAT=flat, num_warps=_warps(TILE))
    _group_norm_apply[(N * G, tiles)](x, partials, w, b, r, out, G, Cg, S, eps, *sx, *sr, *so, SPLIT=split,
                                      TILE_SIZE=TILE, num_warps=_warps(TILE), **flags)
    return out
