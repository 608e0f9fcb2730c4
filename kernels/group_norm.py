"""GroupNorm (+SiLU) (+residual) in Triton, for NCHW-like and channels_last tensors without layout copies.

x is seen as (N, C, S), S the flattened spatial size, with strides (sN, sC, sS). Four plans (choose_plan):

  * one_pass: one program per (n, g) loads the whole group into registers at once (all loads in flight together),
    reduces, normalizes and stores: one launch, one read. For small groups; where x is contiguous and groups are
    tiny (a LayerNorm's rows), one program takes several groups at once.
  * tile: one_pass over the group as a 2-D tile of channels and positions, its contiguous axis (channels in
    channels_last, positions in NCHW) read as vectors, per-channel weights folded into one scale and offset.
  * flat (large groups, any flat layout): a group is the index range i in [0, Cg*S); tile partials
    (count, mean, M2) -> a finalize kernel merging them per group into (mean, rstd) -> an apply kernel; with few
    tiles a group, the apply kernel merges its group's partials itself (one launch fewer).
  * rows (large groups, channels_last): programs take whole contiguous NHWC rows (every channel), so loads are
    16-byte vectors; partials are per channel and the finalize kernel merges the Cg channels of each group.

Statistics are fp32: each tile's mean and M2 are computed two-pass from registers and tiles are merged with Chan's
formula, so groups of 4 M elements with a large mean (the VAE decoder at 1024 px) keep their precision.
"""
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._env import ENVIRON, env_key, getenv
from .utils import cdiv, multiprocessor_count, next_power_of_2, poisoned, programmatic_dependent, fix_cache_keys
from .launch import cached_launch

ONE_PASS_MAX = 65536     # largest group held in one program's registers; above it channels_last takes rows
ONE_PASS_SMALL = 8192    # largest group one_pass is chosen for (larger ones ran faster split: choose_plan)
TILE_MAX = 65536         # largest padded (channels x positions) group the tile plan holds, positions contiguous
TILE_GROUP_MAX = 40960   # largest such group it is chosen for (a 61440-element one ran faster split)
TILE_MAX_CHANNELS_FAST = 32768  # the same bound where channels are contiguous (channels_last)
ONE_PROGRAM_PLANS = ("tile", "one_pass")  # one launch, no partials: the plans that beat the CUDA kernel
FUSE_MAX_TILES = 64      # the flat plan's apply pass merges up to this many partials per group itself
GROUPS_TILE = 4096       # elements per program when a program takes several small contiguous groups
TILE = 4096              # elements per program in the flat plan
ROW_TILE = 8192          # elements per program in the rows plan (rows x all channels)
MERGE_CHUNK = 1024       # partials merged per step in the finalize kernel
FLAT_STATS_MAX = 524288  # largest group group_norm_stats takes through the flat plan where choose_plan says rows
# Probe knobs read per launch, asked `in ENVIRON` before getenv: no call where they are unset (sdkernels._env).
_PLAN_KNOB, _TILE_WARPS_KNOB, _TILE_SUMS_KNOB = (env_key("SDKERNELS_GN_PLAN"), env_key("SDKERNELS_GN_TILE_WARPS"),
                                                 env_key("SDKERNELS_GN_TILE_SUMS"))


@triton.jit
def _addresses(n, g, i, Cg, S, sN, sC, sS, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr):
    """Offsets of the flat in-group indices i of group (n, g), and their channels."""
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
def _finish(y, ch, mask, offs_out, offs_res, w_ptr, b_ptr, res_ptr, out_ptr, HAS_WEIGHT: tl.constexpr,
            HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Affine, SiLU, residual and store of the normalized values y."""
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
def _merge(count, mean, m2, cnt_b, mean_b, m2_b):
    """Chan et al.: the (count, mean, M2) of two disjoint sets from each one's."""
    total = count + cnt_b
    delta = mean_b - mean
    frac = cnt_b / tl.maximum(total, 1.0)
    return total, mean + delta * frac, m2 + m2_b + delta * delta * count * frac


@triton.jit
def _shifted(x, n, ch, mask, sh_ptr, shN, shC, HAS_SHIFT: tl.constexpr):
    """x + shift[n, ch] (fp32; 0 where masked), or x without a shift."""
    if HAS_SHIFT:
        x += tl.load(sh_ptr + n * shN + ch * shC, mask=mask, other=0.0).to(tl.float32)
    return x


# ---- one pass ---------------------------------------------------------------------------------------------------

@triton.jit
def _programmatic_start(PDL: tl.constexpr):
    """First in a one-program plan's kernel launched as a programmatic dependent (programmatic_launch): wait until
    the kernels before it have finished and their writes are visible, before any load or store, then let the next
    kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@cached_launch
@triton.jit
def _one_pass_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, sh_ptr, G, Cg, S, eps,
                     sxN, sxC, sxS, srN, srC, srS, soN, soC, soS, shN, shC,
                     BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_SHIFT: tl.constexpr, PDL: tl.constexpr = False):
    _programmatic_start(PDL)
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    size = Cg * S
    i = tl.arange(0, BLOCK)
    mask = i < size
    offs_x, ch = _addresses(n, g, i, Cg, S, sxN, sxC, sxS, CHANNELS_LAST, FLAT)
    x = _shifted(tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32), n, ch, mask, sh_ptr, shN, shC,
                 HAS_SHIFT)
    mean = tl.sum(x, axis=0) / size
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / size + eps)
    offs_o, _ = _addresses(n, g, i, Cg, S, soN, soC, soS, CHANNELS_LAST, FLAT)
    offs_r, _ = _addresses(n, g, i, Cg, S, srN, srC, srS, CHANNELS_LAST, FLAT)
    _finish(d * rstd, ch, mask, offs_o, offs_r, w_ptr, b_ptr, res_ptr, out_ptr,
            HAS_WEIGHT, HAS_BIAS, SILU, HAS_RESIDUAL)


@cached_launch
@triton.jit
def _one_pass_groups_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, sh_ptr, groups, G, Cg, S, eps, shN, shC,
                            GP: tl.constexpr, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                            SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SHIFT: tl.constexpr,
                            PDL: tl.constexpr = False):
    """one_pass for GP small groups per program, x (and residual, out) contiguous: group ng = n * G + g is the run
    [ng * size, (ng + 1) * size). A LayerNorm seen as (rows, C, 1) has thousands of groups of a few hundred
    elements: one program each spent more time being scheduled than loading."""
    _programmatic_start(PDL)
    ng = tl.program_id(0) * GP + tl.arange(0, GP)
    size = Cg * S
    i = tl.arange(0, BLOCK)
    mask = (ng < groups)[:, None] & (i < size)[None, :]
    offs = ng.to(tl.int64)[:, None] * size + i[None, :]
    n = ng // G
    ch = (ng - n * G)[:, None] * Cg + (i // S)[None, :]
    x = _shifted(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), n[:, None], ch, mask, sh_ptr, shN, shC,
                 HAS_SHIFT)
    mean = tl.sum(x, axis=1) / size
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / size + eps)
    _finish(d * rstd[:, None], ch, mask, offs, offs, w_ptr, b_ptr, res_ptr, out_ptr,
            HAS_WEIGHT, HAS_BIAS, SILU, HAS_RESIDUAL)


@triton.jit
def _tile_offsets(n64, ch, s, sN, sC, sS, CHANNELS_FAST: tl.constexpr):
    """Offsets of a group's tile: (positions, channels) where channels have stride 1 (not multiplied, so Triton
    sees them contiguous and loads 16-byte vectors along them), else (channels, positions)."""
    if CHANNELS_FAST:  # one return: Triton checks every return statement's type, the pruned branch's too
        offsets = n64 * sN + s[:, None] * sS + ch[None, :]
    else:
        offsets = n64 * sN + ch[:, None] * sC + s[None, :] * sS
    return offsets


@triton.jit
def _per_channel(v, CHANNELS_FAST: tl.constexpr):
    """A per-channel vector broadcast over the tile's positions."""
    if CHANNELS_FAST:
        v2 = v[None, :]
    else:
        v2 = v[:, None]
    return v2


# The tile kernel's reductions (_tile_variant); constexpr objects, which a kernel may read as globals.
SUMS_PER_STATISTIC, SUMS_PER_AXIS, SUMS_PIVOTED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# How far (squared, in variances) the pivot may sit from the mean before the pivoted sums are not trusted: within it,
# fp32 keeps the variance to ~16 * 2^-24 * log2(group size) and the mean to a quarter of that in standard deviations.
PIVOT_REACH = tl.constexpr(16.0)


@triton.jit
def _add_pairs(a1, a2, b1, b2):
    return a1 + b1, a2 + b2


@cached_launch
@triton.jit
def _tile_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, sh_ptr, G, S, eps,
                 sxN, sxC, sxS, srN, srC, srS, soN, soC, soS, shN, shC,
                 CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CHANNELS_FAST: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, HAS_SHIFT: tl.constexpr, SUMS: tl.constexpr = 0,
                 STATS_ONLY: tl.constexpr = False, PDL: tl.constexpr = False):
    """one_pass with the group as a 2-D tile of channels and positions: no per-element division, per-channel values
    (weights, shift) loaded once per channel and folded into one scale and offset, and the contiguous axis read as
    vectors (channels with CHANNELS_FAST, where x, residual and out have channel stride 1; else positions, as in
    NCHW). CG is a constexpr so that the channel mask is uniform over 16-byte vectors. STATS_ONLY: the group's fp32
    (mean, rstd) stored at out_ptr[2 ng], nothing normalized (sdkernels::group_norm_stats)."""
    _programmatic_start(PDL)
    ng = tl.program_id(0)
    n = ng // G
    g = ng - n * G
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_ok = c < CG
    ch = g * CG + c
    if CHANNELS_FAST:
        mask = (s < S)[:, None] & c_ok[None, :]
    else:
        mask = c_ok[:, None] & (s < S)[None, :]
    n64 = n.to(tl.int64)
    x = tl.load(x_ptr + _tile_offsets(n64, ch, s, sxN, sxC, sxS, CHANNELS_FAST), mask=mask, other=0.0)
    shift = _shifted(tl.zeros([BLOCK_C], dtype=tl.float32), n, ch, c_ok, sh_ptr, shN, shC, HAS_SHIFT)
    x = tl.where(mask, x.to(tl.float32) + _per_channel(shift, CHANNELS_FAST), 0.0)
    size = CG * S
    if SUMS == SUMS_PER_AXIS:  # one reduction per axis (a probe variant, _tile_variant): slower by up to 15%
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / size
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / size + eps)
    elif SUMS == SUMS_PIVOTED:  # a probe variant: both sums in one reduction, of x less one of the group's values
        # E[(x - k)^2] - E[x - k]^2 with k a value of the group: no cancellation while k lies within a few standard
        # deviations of the mean (fp32 loses (mean - k)^2 / var of the variance's digits, and |mean - k| / std of
        # the mean's). A k further out (an outlier of the group) takes the default's two reductions instead.
        k = tl.load(x_ptr + n64 * sxN + (g * CG) * sxC).to(tl.float32)
        if HAS_SHIFT:
            k += tl.load(sh_ptr + n * shN + (g * CG) * shC).to(tl.float32)
        e = tl.reshape(tl.where(mask, x - k, 0.0), [BLOCK_C * BLOCK_S], can_reorder=True)  # order is free: sums
        s1, s2 = tl.reduce((e, e * e), 0, _add_pairs)
        offset_mean = s1 / size
        var = tl.maximum(s2 / size - offset_mean * offset_mean, 0.0)
        mean = k + offset_mean
        d = tl.where(mask, x - mean, 0.0)
        if offset_mean * offset_mean > PIVOT_REACH * var:
            mean = tl.sum(x) / size
            d = tl.where(mask, x - mean, 0.0)
            var = tl.sum(d * d) / size
        rstd = 1.0 / tl.sqrt(var + eps)
    else:  # one reduction over the whole tile per statistic
        mean = tl.sum(x) / size
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d) / size + eps)
    if STATS_ONLY:
        tl.store(out_ptr + 2 * ng, mean)
        tl.store(out_ptr + 2 * ng + 1, rstd)
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
        offset = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_WEIGHT:
            scale *= tl.load(w_ptr + ch, mask=c_ok, other=1.0).to(tl.float32)
        if HAS_BIAS:
            offset = tl.load(b_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
        y = d * _per_channel(scale, CHANNELS_FAST) + _per_channel(offset, CHANNELS_FAST)
        if SILU:
            y = y * tl.sigmoid(y)
        if HAS_RESIDUAL:
            y += tl.load(res_ptr + _tile_offsets(n64, ch, s, srN, srC, srS, CHANNELS_FAST), mask=mask,
                         other=0.0).to(tl.float32)
        tl.store(out_ptr + _tile_offsets(n64, ch, s, soN, soC, soS, CHANNELS_FAST), y.to(out_ptr.dtype.element_ty),
                 mask=mask)


# ---- partials -> finalize -> apply --------------------------------------------------------------------------------

@cached_launch
@triton.jit
def _flat_partials_kernel(x_ptr, part_ptr, sh_ptr, G, Cg, S, sxN, sxC, sxS, shN, shC, tiles, K_total,
                          TILE_SIZE: tl.constexpr, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr,
                          HAS_SHIFT: tl.constexpr, PDL: tl.constexpr = False):
    """Program (ng, t): (count, mean, M2) of tile t of group ng, stored at partials[:, ng, t]. PDL: launched as a
    programmatic dependent, and lets the apply pass launch at once (it waits for these partials itself)."""
    _programmatic_start(PDL)
    pid = tl.program_id(0)
    ng = pid // tiles
    t = pid - ng * tiles
    n = ng // G
    g = ng - n * G
    size = Cg * S
    i = t * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = i < size
    offs, ch = _addresses(n, g, i, Cg, S, sxN, sxC, sxS, CHANNELS_LAST, FLAT)
    x = _shifted(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), n, ch, mask, sh_ptr, shN, shC, HAS_SHIFT)
    cnt = tl.minimum(size - t * TILE_SIZE, TILE_SIZE).to(tl.float32)
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(mask, x - mean, 0.0)
    tl.store(part_ptr + pid, cnt)
    tl.store(part_ptr + K_total + pid, mean)
    tl.store(part_ptr + 2 * K_total + pid, tl.sum(d * d, axis=0))


@cached_launch
@triton.jit
def _rows_partials_kernel(x_ptr, part_ptr, sh_ptr, G, Cg, C, S, sxN, sxS, shN, shC, programs, tiles_per_program,
                          K_total, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Program (p, n): per-channel (count, mean, M2) over row tiles [p*tiles_per_program, ...) of sample n, stored
    as partial p (channel_partials' layout). Few programs loop over many tiles, each element position of the tile
    keeping its own Welford (count, mean, M2) elementwise, merged across the tile's rows once at the end (Chan's
    formula): one partial per tile made the partials and their merge cost more than the read itself at the VAE's
    512 MiB activations, and a reduction per tile stalls the loop on barriers."""
    n = tl.program_id(1)
    p = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    cnt = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        s = (p * tiles_per_program + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_ok[None, :]
        offs = n.to(tl.int64) * sxN + s.to(tl.int64)[:, None] * sxS + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cnt += mask.to(tl.float32)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(cnt, 1.0), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    count = tl.sum(cnt, axis=0)
    col_mean = tl.sum(cnt * mean, axis=0) / tl.maximum(count, 1.0)
    dm = mean - col_mean[None, :]
    col_m2 = tl.sum(m2, axis=0) + tl.sum(cnt * dm * dm, axis=0)
    # A per-channel shift moves the channel's mean and leaves its M2.
    col_mean = _shifted(col_mean, n, c, c_ok, sh_ptr, shN, shC, HAS_SHIFT)
    store_partials(part_ptr, count, col_mean, col_m2, c, c_ok, n, p, G, Cg, programs, K_total)


@triton.jit
def channel_partials(x, mask, cnt, c, c_ok, part_ptr, n, t, G, Cg, row_tiles, K_total):
    """Per-channel (count, mean, M2) of the cnt valid rows of the fp32 tile x (rows, channels c), zero where
    ``mask`` is off, stored as row tile t of sample n (store_partials). The conv epilogue (kernels/conv3x3.py)
    stores its output's statistics through this too."""
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(mask, x - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    store_partials(part_ptr, tl.zeros_like(mean) + cnt, mean, m2, c, c_ok, n, t, G, Cg, row_tiles, K_total)


@triton.jit
def store_partials(part_ptr, count, mean, m2, c, c_ok, n, t, G, Cg, row_tiles, K_total):
    """Per-channel (count, mean, M2) vectors of channels c stored as partial t (of row_tiles) of sample n: channel
    c of group g at partials[:, n*G + g, t*Cg + c%Cg], each group's partials contiguous for the finalize kernel."""
    g = c // Cg
    k = (n * G + g) * (row_tiles * Cg) + t * Cg + (c - g * Cg)
    tl.store(part_ptr + k, count, mask=c_ok)
    tl.store(part_ptr + K_total + k, mean, mask=c_ok)
    tl.store(part_ptr + 2 * K_total + k, m2, mask=c_ok)


@cached_launch
@triton.jit
def _finalize_kernel(part_ptr, stats_ptr, K, K_total, eps, CHUNK: tl.constexpr):
    """Program ng merges its K partials into (mean, rstd) at stats[ng]."""
    ng = tl.program_id(0)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for k0 in range(0, K, CHUNK):
        k = k0 + tl.arange(0, CHUNK)
        mask = k < K
        base = part_ptr + ng * K + k
        cnt = tl.load(base, mask=mask, other=0.0)
        means = tl.load(base + K_total, mask=mask, other=0.0)
        m2s = tl.load(base + 2 * K_total, mask=mask, other=0.0)
        chunk_count = tl.sum(cnt, axis=0)
        chunk_mean = tl.sum(cnt * means, axis=0) / tl.maximum(chunk_count, 1.0)
        dm = tl.where(mask, means - chunk_mean, 0.0)
        chunk_m2 = tl.sum(m2s, axis=0) + tl.sum(cnt * dm * dm, axis=0)
        count, mean, m2 = _merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    tl.store(stats_ptr + 2 * ng, mean)
    tl.store(stats_ptr + 2 * ng + 1, 1.0 / tl.sqrt(m2 / count + eps))


@triton.jit
def _few_partials_stats(part_ptr, ng, K, K_total, eps, KB: tl.constexpr):
    """(mean, rstd) of group ng from its K <= KB partials: the finalize kernel's merge inlined into the apply pass,
    one launch fewer where groups have few tiles."""
    k = tl.arange(0, KB)
    mask = k < K
    base = part_ptr + ng * K + k
    cnt = tl.load(base, mask=mask, other=0.0)
    means = tl.load(base + K_total, mask=mask, other=0.0)
    count = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * means, axis=0) / count
    dm = tl.where(mask, means - mean, 0.0)
    m2 = tl.sum(tl.load(base + 2 * K_total, mask=mask, other=0.0), axis=0) + tl.sum(cnt * dm * dm, axis=0)
    return mean, 1.0 / tl.sqrt(m2 / count + eps)


@cached_launch
@triton.jit
def _flat_apply_kernel(x_ptr, stats_ptr, w_ptr, b_ptr, res_ptr, out_ptr, sh_ptr, G, Cg, S, tiles,
                       sxN, sxC, sxS, srN, srC, srS, soN, soC, soS, shN, shC, eps,
                       TILE_SIZE: tl.constexpr, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, HAS_SHIFT: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
                       PDL: tl.constexpr = False):
    """PARTIALS_BLOCK > 0: stats_ptr holds the partials of _flat_partials_kernel (tiles per group), merged here.
    PDL: launched as a programmatic dependent of the partials kernel: waits for it to finish before any load, and
    does not let the next kernel launch early (as the CUDA plan's apply kernel, whose early-placed successors slowed
    the larger shapes: kernels/group_norm.py programmatic_launch, bench/NOTES.md session 25)."""
    if PDL:
        gdc_wait()
    pid = tl.program_id(0)
    ng = pid // tiles
    t = pid - ng * tiles
    n = ng // G
    g = ng - n * G
    if PARTIALS_BLOCK > 0:
        mean, rstd = _few_partials_stats(stats_ptr, ng, tiles, tl.num_programs(0), eps, PARTIALS_BLOCK)
    else:
        mean = tl.load(stats_ptr + 2 * ng)
        rstd = tl.load(stats_ptr + 2 * ng + 1)
    i = t * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = i < Cg * S
    offs_x, ch = _addresses(n, g, i, Cg, S, sxN, sxC, sxS, CHANNELS_LAST, FLAT)
    x = _shifted(tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32), n, ch, mask, sh_ptr, shN, shC,
                 HAS_SHIFT)
    offs_o, _ = _addresses(n, g, i, Cg, S, soN, soC, soS, CHANNELS_LAST, FLAT)
    offs_r, _ = _addresses(n, g, i, Cg, S, srN, srC, srS, CHANNELS_LAST, FLAT)
    _finish((x - mean) * rstd, ch, mask, offs_o, offs_r, w_ptr, b_ptr, res_ptr, out_ptr,
            HAS_WEIGHT, HAS_BIAS, SILU, HAS_RESIDUAL)


@cached_launch
@triton.jit
def _rows_apply_kernel(x_ptr, stats_ptr, w_ptr, b_ptr, res_ptr, out_ptr, sh_ptr, G, Cg, C, S,
                       sxN, sxS, srN, srS, soN, soS, shN, shC,
                       BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       HAS_SHIFT: tl.constexpr):
    n = tl.program_id(1)
    t = tl.program_id(0)
    s = (t * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (s < S)[:, None] & cmask[None, :]
    ng = n * G + c // Cg
    mean = tl.load(stats_ptr + 2 * ng, mask=cmask, other=0.0)
    rstd = tl.load(stats_ptr + 2 * ng + 1, mask=cmask, other=0.0)
    mean -= _shifted(tl.zeros_like(mean), n, c, cmask, sh_ptr, shN, shC, HAS_SHIFT)  # x + shift - mean
    x = tl.load(x_ptr + n.to(tl.int64) * sxN + s[:, None] * sxS + c[None, :], mask=mask, other=0.0)
    y = (x.to(tl.float32) - mean[None, :]) * rstd[None, :]
    ch = c[None, :] + tl.zeros_like(s)[:, None].to(tl.int32)
    _finish(y, ch, mask, n.to(tl.int64) * soN + s[:, None] * soS + c[None, :],
            n.to(tl.int64) * srN + s[:, None] * srS + c[None, :], w_ptr, b_ptr, res_ptr, out_ptr,
            HAS_WEIGHT, HAS_BIAS, SILU, HAS_RESIDUAL)


# ---- launcher ---------------------------------------------------------------------------------------------------

def _warps(block: int, most: int = 16) -> int:
    return max(4, min(most, block // 256))


TILE_SUMS = {"stat": SUMS_PER_STATISTIC.value, "axes": SUMS_PER_AXIS.value, "pivot": SUMS_PIVOTED.value}


def _tile_variant(block: int, S: int, channels_fast: bool) -> dict:
    """The tile kernel's warps and reductions for a block-element tile of S positions. Probe knobs
    (scripts/probe_gn_plans.py --tile-warps, --tile-sums): SDKERNELS_GN_TILE_WARPS=n and
    SDKERNELS_GN_TILE_SUMS=axes|pivot|stat. The small SD1.5 groups are latency-bound, where fewer warps or fewer
    reductions shorten the chain between the load and the store. One reduction over the tile per statistic against one
    per axis: 7.3 against 7.7 us at channels_last 2x320x32x32, 14.7 against 16.4 at 2x1920x32x32 (H200, session 16).
    Channels_last tiles, programmatic launch on (H200, session 25, same call): 8 warps up to 4096 elements and 16 up
    to 16384 (2x2560x8x8 3.49 -> 3.17 us, 2x320x32x32 6.63 -> 5.92, 2x1280x16x16 4.64 -> 4.48; 2x1280x8x8 2.69 ->
    2.61), block / 256 above (2x2560x16x16: 6.43 us at 32 warps, 6.84 at 16); both sums in one reduction ("pivot")
    where S <= 256 (2x1280x8x8 2.61 -> 2.49, 2x2560x8x8 3.17 -> 3.04, 2x1920x16x16 5.27 -> 4.97) but not at 1024
    positions (2x320x32x32 5.92 -> 6.12) nor 32768-element tiles (2x2560x16x16 6.43 -> 7.38). NCHW tiles from
    4096 elements (H200, session 26, each column in one call): where S <= 256, pivot sums with 8 warps up to 8192
    elements (2x640x16x16 3.26 -> 2.78 us, 2x2560x8x8 3.24 -> 2.81, 2x1280x8x8 2.49 -> 2.36), 16 above
    (2x1920x16x16 4.62 -> 4.52, 2x2560x16x16 5.78 -> 5.30); else 16 warps up to 16384 elements (2x320x32x32 4.57 ->
    3.81, 2x1280x16x16 4.58 -> 3.81)."""
    if channels_fast and block <= 16384:
        warps = 8 if block <= 4096 else 16
        sums = SUMS_PIVOTED.value if S <= 256 else SUMS_PER_STATISTIC.value
    elif not channels_fast and block >= 4096 and S <= 256:
        warps, sums = (8 if block <= 8192 else 16), SUMS_PIVOTED.value
    elif not channels_fast and 4096 <= block <= 16384:
        warps, sums = 16, SUMS_PER_STATISTIC.value
    else:
        warps, sums = _warps(block, 32), SUMS_PER_STATISTIC.value
    knob_warps = getenv("SDKERNELS_GN_TILE_WARPS") if _TILE_WARPS_KNOB in ENVIRON else None
    knob_sums = getenv("SDKERNELS_GN_TILE_SUMS") if _TILE_SUMS_KNOB in ENVIRON else None
    return dict(num_warps=int(knob_warps) if knob_warps else warps,
                SUMS=TILE_SUMS[knob_sums] if knob_sums else sums)


def programmatic_launch(x) -> dict:
    """Launch options of the one-program plans' kernels and the flat plan's two (partials, then apply): a
    programmatic dependent of the kernel before it (Hopper's griddepcontrol) on sm_90+, so that its launch and
    scheduling overlap that kernel's end, a good part of a call at the small SD shapes (H200, bench_group_norm, same
    call, on against off: 2x1280x8x8 3.4 -> 2.7 us, 2x320x32x32 7.3 -> 6.7, 2x2560x16x16 7.1 -> 6.4; the flat
    plan at NCHW 2x640x64x64 18.6 -> 17.8, 2x1920x32x32 15.1 -> 14.2). Not in the interpreter. SDKERNELS_GN_PDL=0
    off, =1 on whatever the device (compile_check's sm_90 scenario; the same knob turns off the CUDA kernels'
    programmatic launches)."""
    return dict(PDL=True, launch_pdl=True) if programmatic_dependent("SDKERNELS_GN_PDL", x.device) else {}


@functools.lru_cache(maxsize=4096)  # a pure function of two sizes, asked on every launch
def _tile_block(Cg: int, S: int) -> tuple:
    return next_power_of_2(Cg), next_power_of_2(S)


def choose_plan(Cg: int, S: int, C: int, channels_last: bool, dense_rows: bool) -> str:
    """Measured on an H200 at SD1.5's shapes (scripts/probe_gn_plans.py, bench/NOTES.md session 15; fp16, per call in
    a CUDA graph). The tile plan, where its contiguous axis is known: NCHW 2x320x64x64 10.0 us (one_pass 40.2, flat
    11.3), but flat at a 61440-element group (15.1 against 18.3); channels_last 2x1280x16x16 5.4 us (one_pass 10.1,
    the CUDA kernel 7.3), 2x960x32x32 9.9 (CUDA 11.4), but behind the CUDA kernel from 40960-element groups
    (2x1280x32x32 14.6 against 12.2). one_pass only for small groups (2x640x32x32 channels_last: 39.4 us, flat 12.5);
    flat for the rest but the largest channels_last groups, which the rows plan was built for (the VAE's)."""
    forced = _PLAN_KNOB in ENVIRON and getenv("SDKERNELS_GN_PLAN")  # a knob for benchmarks comparing plans
    if forced:
        return forced
    size = Cg * S
    block_c, block_s = _tile_block(Cg, S)
    if channels_last and dense_rows:
        tile = block_c * block_s <= TILE_MAX_CHANNELS_FAST
    else:
        tile = not channels_last and size <= TILE_GROUP_MAX and block_c * block_s <= TILE_MAX
    if tile and S >= 16:
        return "tile"
    if size <= ONE_PASS_SMALL:
        return "one_pass"
    if size > ONE_PASS_MAX and channels_last and dense_rows and C <= ROW_TILE:
        return "rows"
    return "flat"


def _channels_dense(*strides) -> bool:
    """Whether every one of these (sN, sC, sS) triples has channel stride 1."""
    for st in strides:  # a plain loop: this runs on every launch, and a generator costs a call per item
        if st[1] != 1:
            return False
    return True


def plan_for(shape, num_groups: int, strides, channels_last: bool) -> str:
    """choose_plan for an x of ``shape`` whose x, residual and out strides, as (sN, sC, sS) triples, are ``strides``:
    the rows plan and channels_last tiles need channel stride 1 in all three."""
    C = shape[1]
    S = 1
    for d in shape[2:]:
        S *= d
    return choose_plan(C // num_groups, S, C, channels_last, channels_last and _channels_dense(*strides))


def finalize_partials(partials, K: int, eps: float) -> torch.Tensor:
    """(N*G, 2) fp32 (mean, rstd) per group from partials (3, N*G*K), K per group (see channel_partials)."""
    groups = partials.shape[1] // K
    stats = poisoned(torch.empty((groups, 2), device=partials.device, dtype=torch.float32))
    _finalize_kernel[(groups,)](partials, stats, K, partials.shape[1], eps, CHUNK=MERGE_CHUNK, num_warps=4)
    return stats


def _rows_geometry(C, S):
    block_c = next_power_of_2(C)
    block_s = max(1, ROW_TILE // block_c)
    return block_s, block_c, cdiv(S, block_s)


def _shift_args(x, shift):
    """(pointer, sN, sC, flags) for an optional (N, C) shift: x stands in for an absent one (never read)."""
    if shift is None:
        return x, 0, 0, dict(HAS_SHIFT=False)
    return shift, shift.stride(0), shift.stride(1), dict(HAS_SHIFT=True)


def _split_stats(x, G, eps, plan, sx, layout, shift=None):
    """The statistics passes of the split plans (partials, then finalize): (N*G, 2) fp32 (mean, rstd) of x + shift."""
    sh, shN, shC, shift_flag = _shift_args(x, shift)
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    Cg = C // G
    if plan == "rows":
        block_s, block_c, row_tiles = _rows_geometry(C, S)
        # About 4 programs per SM over all samples, each looping over its share of the row tiles.
        per_program = cdiv(row_tiles, max(1, cdiv(4 * multiprocessor_count(x.device), N)))
        programs = cdiv(row_tiles, per_program)
        K = programs * Cg
        partials = poisoned(torch.empty((3, N * G * K), device=x.device, dtype=torch.float32))
        _rows_partials_kernel[(programs, N)](x, partials, sh, G, Cg, C, S, sx[0], sx[2], shN, shC, programs,
                                             per_program, N * G * K, BLOCK_S=block_s, BLOCK_C=block_c,
                                             num_warps=_warps(ROW_TILE), **shift_flag)
        return finalize_partials(partials, K, eps)
    partials, tiles = _flat_partials(x, G, sx, layout, shift)
    return finalize_partials(partials, tiles, eps)


def _flat_partials(x, G, sx, layout, shift=None, pdl=None):
    """The flat plan's first pass: partials (3, N*G*tiles), tiles per group. ``pdl``: programmatic_launch's
    options, where the apply pass follows as its programmatic dependent."""
    sh, shN, shC, shift_flag = _shift_args(x, shift)
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    Cg = C // G
    tiles = cdiv(Cg * S, TILE)
    partials = poisoned(torch.empty((3, N * G * tiles), device=x.device, dtype=torch.float32))
    _flat_partials_kernel[(N * G * tiles,)](x, partials, sh, G, Cg, S, *sx, shN, shC, tiles, N * G * tiles,
                                            TILE_SIZE=TILE, num_warps=_warps(TILE), **layout, **shift_flag,
                                            **(pdl or {}))
    return partials, tiles


def _layout_flags(channels_last, *tensors):
    flat = True
    for t in tensors:  # a plain loop, as in _channels_dense
        if t is not None and not t.is_contiguous():
            flat = False
            break
    return dict(CHANNELS_LAST=channels_last, FLAT=flat)


def group_norm_stats_triton(x, num_groups, eps, strides):
    """(N*G, 2) fp32 (mean, rstd) of x seen as (N, C, S): where group_norm would take the tile plan (choose_plan),
    its kernel with the statistics stored and nothing normalized (one launch), else the flat plan's partials and
    finalize up to FLAT_STATS_MAX elements a group. Statistics alone, channels_last, H200 (scripts/
    probe_resnet_bordered.py, session 22): 2x640x32x32 tile 3.8 us, rows 33.4; 2x960x64x64 flat 18.6, rows 74.4;
    1x512x128x128 flat 12.1, rows 74.5; 1x256x256x256 flat 36.5, rows 83.6. ``strides`` is (x's (sN, sC, sS),
    channels_last)."""
    sx, channels_last = strides
    dense_rows = channels_last and sx[1] == 1
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // max(N * C, 1)
    Cg = C // num_groups
    plan = choose_plan(Cg, S, C, channels_last, dense_rows)
    if plan == "tile":
        stats = poisoned(torch.empty((N * num_groups, 2), device=x.device, dtype=torch.float32))
        block_c, block_s = _tile_block(Cg, S)
        _tile_kernel[(N * num_groups,)](x, x, x, x, stats, x, num_groups, S, eps, *sx, *sx, *sx, 0, 0, CG=Cg,
                                        BLOCK_C=block_c, BLOCK_S=block_s, CHANNELS_FAST=dense_rows,
                                        **_tile_variant(block_c * block_s, S, dense_rows), HAS_WEIGHT=False,
                                        HAS_BIAS=False, SILU=False, HAS_RESIDUAL=False, HAS_SHIFT=False,
                                        STATS_ONLY=True, **programmatic_launch(x))
        return stats
    # Above the largest group measured (524288 elements), the rows plan stays: it was built and measured for the
    # VAE's 512 MiB activations at 1024 px, which the flat plan was not timed on.
    rows = plan == "rows" and Cg * S > FLAT_STATS_MAX and dense_rows and C <= ROW_TILE
    return _split_stats(x, num_groups, eps, "rows" if rows else "flat", sx, _layout_flags(channels_last, x))


def group_norm_triton(x, num_groups, weight, bias, eps, silu, residual, out, strides, shift=None):
    """Launch on x seen as (N, C, S), plus the (N, C) ``shift`` if given. ``strides`` gives (x, residual, out)
    strides as (sN, sC, sS) triples and whether channels vary fastest (channels_last); the caller checked shapes,
    dtypes and layouts."""
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    G = num_groups
    Cg = C // G
    size = Cg * S
    (sx, sr, so), channels_last = strides
    layout = _layout_flags(channels_last, x, residual, out)
    epilogue = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
                    HAS_RESIDUAL=residual is not None)
    # Unused pointers still need a tensor; x is never read through them because the flags are off.
    w, b, r = (weight if weight is not None else x, bias if bias is not None else x,
               residual if residual is not None else x)
    plan = plan_for(x.shape, G, (sx, sr, so), channels_last)

    # Several groups a program only where a group fills at most 512 lanes: at (16384 rows, 640) the H200 ran one
    # row a program faster (32.9 vs 37.4 us), at (8192, 320) slower (8.0 vs 6.3 us; scripts/probe_layer_norm.py).
    sh, shN, shC, shift_flag = _shift_args(x, shift)
    if plan in ("tile", "one_pass") and layout["FLAT"] and 8 * next_power_of_2(size) <= GROUPS_TILE:
        block = next_power_of_2(size)
        gp = min(GROUPS_TILE // block, next_power_of_2(N * G))
        _one_pass_groups_kernel[(cdiv(N * G, gp),)](x, w, b, r, out, sh, N * G, G, Cg, S, eps, shN, shC, GP=gp,
                                                    BLOCK=block, num_warps=_warps(gp * block), **epilogue,
                                                    **shift_flag, **programmatic_launch(x))
        return out
    if plan == "tile":
        block_c, block_s = _tile_block(Cg, S)
        channels_fast = _channels_dense(sx, sr, so)
        _tile_kernel[(N * G,)](x, w, b, r, out, sh, G, S, eps, *sx, *sr, *so, shN, shC, CG=Cg, BLOCK_C=block_c,
                               BLOCK_S=block_s, CHANNELS_FAST=channels_fast,
                               **_tile_variant(block_c * block_s, S, channels_fast), **epilogue, **shift_flag,
                               **programmatic_launch(x))
        return out
    if plan == "one_pass":
        block = next_power_of_2(size)
        _one_pass_kernel[(N * G,)](x, w, b, r, out, sh, G, Cg, S, eps, *sx, *sr, *so, shN, shC, BLOCK=block,
                                   num_warps=_warps(block, 32), **layout, **epilogue, **shift_flag,
                                   **programmatic_launch(x))
        return out
    if plan == "flat" and cdiv(size, TILE) <= FUSE_MAX_TILES:
        pdl = programmatic_launch(x)  # the apply pass's launch overlaps the partials kernel
        partials, tiles = _flat_partials(x, G, sx, layout, shift, pdl)
        return _apply(x, partials, G, w, b, r, out, sx, sr, so, plan, layout, epilogue, shift,
                      eps=eps, partials_block=next_power_of_2(tiles), pdl=pdl)

    stats = _split_stats(x, G, eps, plan, sx, layout, shift)
    return _apply(x, stats, G, w, b, r, out, sx, sr, so, plan, layout, epilogue, shift)


def _apply(x, stats, G, w, b, r, out, sx, sr, so, plan, layout, epilogue, shift=None, eps=0.0, partials_block=0,
           pdl=None):
    """The apply pass of the split plans: out = epilogue((x + shift - mean) * rstd) with the (N*G, 2) stats
    given, or (flat plan, partials_block > 0) the partials they come from; ``pdl`` (flat plan): launched as a
    programmatic dependent of the kernel that wrote them."""
    sh, shN, shC, shift_flag = _shift_args(x, shift)
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    Cg = C // G
    if plan == "rows":
        block_s, block_c, row_tiles = _rows_geometry(C, S)
        _rows_apply_kernel[(row_tiles, N)](x, stats, w, b, r, out, sh, G, Cg, C, S, sx[0], sx[2], sr[0], sr[2],
                                           so[0], so[2], shN, shC, BLOCK_S=block_s, BLOCK_C=block_c,
                                           num_warps=_warps(ROW_TILE), **epilogue, **shift_flag)
        return out
    tiles = cdiv(Cg * S, TILE)
    _flat_apply_kernel[(N * G * tiles,)](x, stats, w, b, r, out, sh, G, Cg, S, tiles, *sx, *sr, *so, shN, shC, eps,
                                         TILE_SIZE=TILE, num_warps=_warps(TILE), **layout, **epilogue, **shift_flag,
                                         PARTIALS_BLOCK=partials_block, **(pdl or {}))
    return out


def group_norm_apply_triton(x, stats, weight, bias, silu, out, strides):
    """out = [silu]((x - mean) * rstd * weight + bias) with the given (N, G, 2) fp32 stats (contiguous), x seen as
    (N, C, S): the apply pass alone, for a caller that took the statistics of a larger tensor (sdkernels' banded
    ResNet block normalizes a band of rows with its whole image's statistics). ``strides`` as group_norm_triton's
    without the residual."""
    (sx, so), channels_last = strides
    layout = _layout_flags(channels_last, x, out)
    epilogue = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu), HAS_RESIDUAL=False)
    w, b = weight if weight is not None else x, bias if bias is not None else x
    C = x.shape[1]
    plan = "rows" if channels_last and sx[1] == 1 and so[1] == 1 and C <= ROW_TILE else "flat"
    return _apply(x, stats, stats.shape[1], w, b, x, out, sx, sx, so, plan, layout, epilogue)


fix_cache_keys(globals())  # last: see its docstring
