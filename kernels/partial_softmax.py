"""Attention through a partially fused softmax ("Speed Is All You Need", arXiv 2304.11267), in Triton.

Two passes over the keys instead of one online-softmax pass:
  1. row statistics: for each query row of S = scale * q k^T + mask, its max L and the sum of exp(S - L), stored as
     a (B*H, N, 2) fp32 tensor. The key range is split across SPLIT programs per row block (each writes a partial
     (L, sum)), so that short N (few row blocks) still fills the GPU; pass 2 merges the partials as it loads them
     (attention_row_stats_triton merges them in a kernel of its own where the statistics themselves are wanted);
  2. softmax . V: S is recomputed blockwise, exp(S - L) is multiplied by V on the tensor cores and the sum divides
     the result once at the end (dividing each p first would push small fp16 p into subnormals).
Neither pass writes the N x Nk matrix. The tiles, head-dim chunks and score computation are the flash kernel's.
Where one_launch() says so, the softmax . V kernel runs pass 1 itself over its rows (one launch; the statistics stay
in registers and are not split across programs).
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._env import ENVIRON, env_key, getenv
from .flash_attention import (HEAD_DIM_CHUNKS, LOG2E, SHORT_KEYS, _LOG2E, _accumulate_pv, _bh_base, _load_query,
                              _log2_scores, _program_tile, _scores, _store_output, dot_precision, launch_config,
                              mask_kind, chunk1_start, mask_strides, stride_unit, tail_mode, view_strides,
                              _zero_accumulators)
from .utils import cdiv, multiprocessor_count, poisoned, programmatic_dependent, fix_cache_keys
from .launch import cached_launch

_LN2 = tl.constexpr(0.6931471805599453)
# Row-statistics programs wanted per streaming multiprocessor; the key range is split until there are this many.
PROGRAMS_PER_SM = 2
MERGE_BLOCK = 128


@triton.jit
def _fold_block_stats(m_i, l_i, s, qk_scale, MASK: tl.constexpr):
    """Fold one block of _scores' scores into the running row max and sum of exp2(s - max) (log2 domain)."""
    m_new = tl.maximum(m_i, _log2_scores(tl.max(s, 1), qk_scale, MASK))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(_log2_scores(s, qk_scale, MASK) - m_sub[:, None]), 1)
    return m_new, l_i


@triton.jit
def _key_range_stats(q0, q1, k_base, mask_base, rows_m, first, count, is_last, Nk, skn, skd, smm, smn, qk_scale,
                     D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, FOLD_TAIL: tl.constexpr):
    """(max, sum of exp2(s - max)) in the log2 domain of the query rows over key blocks first .. first + count - 1;
    ``is_last`` (the last range) also takes the partial tail block (FOLD_TAIL: as one of the loop's blocks, every
    block masked; see flash_attention.TAIL_MODE)."""
    m_i = tl.full([q0.shape[0]], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([q0.shape[0]], dtype=tl.float32)
    n_full = Nk // BLOCK_N
    if FOLD_TAIL:
        for blk in range(first, tl.minimum(first + count, tl.cdiv(Nk, BLOCK_N))):
            s, _rows_n = _scores(q0, q1, k_base, mask_base, rows_m, blk * BLOCK_N, Nk, skn, skd, smm, smn,
                                 qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, True, MASK, PRECISION)
            m_i, l_i = _fold_block_stats(m_i, l_i, s, qk_scale, MASK)
    else:
        for blk in range(first, tl.minimum(first + count, n_full)):
            s, _rows_n = _scores(q0, q1, k_base, mask_base, rows_m, blk * BLOCK_N, Nk, skn, skd, smm, smn,
                                 qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, False, MASK, PRECISION)
            m_i, l_i = _fold_block_stats(m_i, l_i, s, qk_scale, MASK)
        if is_last & (n_full * BLOCK_N < Nk):
            s, _rows_n = _scores(q0, q1, k_base, mask_base, rows_m, n_full * BLOCK_N, Nk, skn, skd, smm, smn,
                                 qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, True, MASK, PRECISION)
            m_i, l_i = _fold_block_stats(m_i, l_i, s, qk_scale, MASK)
    return m_i, l_i


@cached_launch
@triton.jit
def _attention_row_stats(q_ptr, k_ptr, mask_ptr, out_ptr, H, N, Nk, qk_scale, blocks_per_split,
                         sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smm, smn,
                         D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                         STRIDE_UNIT: tl.constexpr, FOLD_TAIL: tl.constexpr, PDL: tl.constexpr = False):
    """Program (row block, b*H + h, split) writes (max, sum) in natural units of its rows over its key blocks to
    out[split, b*H + h, row, :]; the last split also takes the partial tail block."""
    split = tl.program_id(2)
    bh, q_base, k_base, _v_base, mask_base, offs_m, rows_m = _program_tile(
        q_ptr, k_ptr, k_ptr, mask_ptr, H, N, sqb, sqh, skb, skh, skb, skh, smb, smh, BLOCK_M, STRIDE_UNIT)
    sqn *= STRIDE_UNIT
    skn *= STRIDE_UNIT
    if PDL:  # the softmax . V grid may start now: it loads its query tile, then waits for this grid's statistics
        gdc_launch_dependents()
    q0, q1 = _load_query(q_base, rows_m, sqn, sqd, D0, D1, C1, HEAD_DIM)

    m_i, l_i = _key_range_stats(q0, q1, k_base, mask_base, rows_m, split * blocks_per_split, blocks_per_split,
                                split == tl.num_programs(2) - 1, Nk, skn, skd, smm, smn, qk_scale, D0, D1, C1,
                                HEAD_DIM, BLOCK_N, MASK, PRECISION, FOLD_TAIL)

    out = out_ptr + ((split * tl.num_programs(1) + bh).to(tl.int64) * N + offs_m) * 2
    row_ok = offs_m < N
    tl.store(out, m_i * _LN2, mask=row_ok)
    tl.store(out + 1, l_i, mask=row_ok)


@triton.jit
def _merged_row_stats(part_ptr, rows_idx, rows, splits, ok):
    """(L, sum) of rows rows_idx from their partials part[0..splits-1, row]: L = max L_s, sum = sum_s sum_s *
    exp(L_s - L). With one split the partial is the statistic."""
    big_l = tl.load(part_ptr + rows_idx.to(tl.int64) * 2, mask=ok, other=0.0)
    for s in range(1, splits):
        big_l = tl.maximum(big_l, tl.load(part_ptr + (s * rows + rows_idx).to(tl.int64) * 2, mask=ok, other=0.0))
    l_sub = tl.where(big_l == float("-inf"), 0.0, big_l)
    total = tl.zeros_like(big_l)
    for s in range(splits):
        base = part_ptr + (s * rows + rows_idx).to(tl.int64) * 2
        part_l = tl.load(base, mask=ok, other=0.0)
        part_sum = tl.load(base + 1, mask=ok, other=0.0)
        total += part_sum * tl.math.exp2((part_l - l_sub) * _LOG2E)
    return big_l, total


@cached_launch
@triton.jit
def _merge_row_stats(part_ptr, stats_ptr, rows, splits, BLOCK: tl.constexpr):
    """stats[r] = the merged (L, sum) of partials part[0..splits-1, r]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows
    big_l, total = _merged_row_stats(part_ptr, offs, rows, splits, ok)
    tl.store(stats_ptr + offs.to(tl.int64) * 2, big_l, mask=ok)
    tl.store(stats_ptr + offs.to(tl.int64) * 2 + 1, total, mask=ok)


@triton.jit
def _softmax_pv_block(acc0, acc1, l2, q0, q1, k_base, v_base, mask_base, rows_m, start_n, Nk,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
                      D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      TAIL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    s, rows_n = _scores(q0, q1, k_base, mask_base, rows_m, start_n, Nk, stride_kn, stride_kd, stride_mm,
                        stride_mn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, TAIL, MASK, PRECISION)
    p = tl.math.exp2(_log2_scores(s, qk_scale, MASK) - l2[:, None])
    return _accumulate_pv(acc0, acc1, p.to(v_base.dtype.element_ty), v_base, rows_n, stride_vn, stride_vd,
                          D0, D1, C1, HEAD_DIM, PRECISION)


@cached_launch
@triton.jit
def _softmax_times_v(q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, part_ptr, splits, H, N, Nk, qk_scale,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                     smb, smh, smm, smn,
                     D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                     STRIDE_UNIT: tl.constexpr, FOLD_TAIL: tl.constexpr, PDL: tl.constexpr = False,
                     OWN_STATS: tl.constexpr = False, STATS_BLOCK_N: tl.constexpr = 64,
                     STATS_FOLD_TAIL: tl.constexpr = False):
    """OWN_STATS: the program computes its rows' statistics itself, a first pass over the keys (one launch, the
    statistics in registers) in key blocks of STATS_BLOCK_N (wider ones shorten that pass's chain of dependent
    loads, and its tile needs no accumulator beside it; STATS_FOLD_TAIL its tail mode); else it merges the statistics
    kernel's partials part[0..splits-1]. PDL with OWN_STATS: a programmatic dependent of whatever kernel ran before
    (its launch overlaps that kernel's end): wait for its writes before any load; else a dependent of the statistics
    kernel (the wait below)."""
    if OWN_STATS and PDL:
        gdc_wait()
        gdc_launch_dependents()
    bh, q_base, k_base, v_base, mask_base, offs_m, rows_m = _program_tile(
        q_ptr, k_ptr, v_ptr, mask_ptr, H, N, sqb, sqh, skb, skh, svb, svh, smb, smh, BLOCK_M, STRIDE_UNIT)
    sqn *= STRIDE_UNIT
    skn *= STRIDE_UNIT
    svn *= STRIDE_UNIT
    son *= STRIDE_UNIT
    q0, q1 = _load_query(q_base, rows_m, sqn, sqd, D0, D1, C1, HEAD_DIM)
    if OWN_STATS:
        l2, row_sum = _key_range_stats(q0, q1, k_base, mask_base, rows_m, 0, tl.cdiv(Nk, STATS_BLOCK_N), True,
                                       Nk, skn, skd, smm, smn, qk_scale, D0, D1, C1, HEAD_DIM, STATS_BLOCK_N, MASK,
                                       PRECISION, STATS_FOLD_TAIL)
    else:
        if PDL:  # a programmatic dependent of the statistics: wait for them (q, k, v were ready before)
            gdc_wait()
        # The statistics' partials are merged here, not by a kernel of their own: one launch fewer (rows_m
        # repeats the last row past N, so every load is in bounds).
        big_l, row_sum = _merged_row_stats(part_ptr, bh * N + rows_m, tl.num_programs(1) * N, splits,
                                           rows_m >= 0)
        l2 = big_l * _LOG2E
    l2 = tl.where(l2 == float("-inf"), 0.0, l2)  # fully masked rows: no NaN from -inf - -inf

    acc0, acc1 = _zero_accumulators(BLOCK_M, D0, D1)
    full_end = (Nk // BLOCK_N) * BLOCK_N
    if FOLD_TAIL:  # the partial block inside the loop (see flash_attention.TAIL_MODE)
        for start_n in range(0, Nk, BLOCK_N):
            acc0, acc1 = _softmax_pv_block(acc0, acc1, l2, q0, q1, k_base, v_base, mask_base, rows_m, start_n,
                                           Nk, skn, skd, svn, svd, smm, smn, qk_scale, D0, D1, C1, HEAD_DIM,
                                           BLOCK_N, True, MASK, PRECISION)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc0, acc1 = _softmax_pv_block(acc0, acc1, l2, q0, q1, k_base, v_base, mask_base, rows_m, start_n,
                                           Nk, skn, skd, svn, svd, smm, smn, qk_scale, D0, D1, C1, HEAD_DIM,
                                           BLOCK_N, False, MASK, PRECISION)
    if (not FOLD_TAIL) and full_end < Nk:
        acc0, acc1 = _softmax_pv_block(acc0, acc1, l2, q0, q1, k_base, v_base, mask_base, rows_m, full_end, Nk,
                                       skn, skd, svn, svd, smm, smn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N,
                                       True, MASK, PRECISION)
    inv_sum = 1.0 / row_sum  # the softmax's division, once per output element
    o_base = _bh_base(o_ptr, bh // H, bh % H, sob, soh, STRIDE_UNIT)
    _store_output(o_base, acc0 * inv_sum[:, None], acc1 * inv_sum[:, None], offs_m, N, son, sod, D0, D1, C1,
                  HEAD_DIM)


# Programmatic launch pays at short key lengths and costs at long ones (H200, bench_attention, same call, PDL on
# against off: Nk = 77 and 256 4-12% faster, N = 256 d = 160 12.2 -> 11.0 us; N = Nk = 1024 d = 80 27.5 -> 30.2 us;
# Nk = 4096 and 16384 within 1-3% either way).
PDL_MAX_KEYS = 256


def programmatic_launch(q, Nk: int) -> bool:
    """Whether softmax . V launches as a programmatic dependent of the statistics kernel (Hopper's griddepcontrol,
    sm_90+; not in the interpreter): its launch and query loads then overlap the statistics' last programs, where a
    short call spends a few us between the two kernels; with one launch, of the kernel before it. Auto: at Nk <=
    PDL_MAX_KEYS. SDKERNELS_PARTIAL_PDL=0 turns it off, =1 on at every length and device (compile_check's sm_90
    scenario)."""
    return programmatic_dependent("SDKERNELS_PARTIAL_PDL", q.device, Nk <= PDL_MAX_KEYS)


# One launch (the softmax . V kernel computes its rows' statistics itself, a first pass over the keys) where the
# second launch and its wait cost more than splitting the statistics across programs gains: up to 1024 keys.
# bench_attention --quick on an H200, one launch against two kernels, same call: Nk = 77 7.7 against 9.9 us
# (N = 1024, d = 80), 15.0/16.9 (N = 4096, d = 40), 18.5/20.0 (d = 64), 7.6/8.8 (N = 256, d = 160); N = Nk = 1024
# d = 80 25.9/27.8; N = Nk = 256 d = 160 10.9/11.1; Nk = 4096 even at d = 40 and 64 but 452.6/414.6 at d = 128;
# Nk = 16384 4938/4732.
ONE_LAUNCH_MAX_KEYS = 1024
_ONE_LAUNCH_KNOB = env_key("SDKERNELS_PARTIAL_ONE_LAUNCH")  # read per launch: `in ENVIRON` first (no call if unset)


def one_launch(Nk: int) -> bool:
    """Whether partial_softmax_attention_triton runs both passes in one kernel: at Nk <= ONE_LAUNCH_MAX_KEYS;
    SDKERNELS_PARTIAL_ONE_LAUNCH=0 never, =1 always."""
    knob = getenv("SDKERNELS_PARTIAL_ONE_LAUNCH") if _ONE_LAUNCH_KNOB in ENVIRON else None
    if knob in ("0", "1"):
        return knob == "1"
    return Nk <= ONE_LAUNCH_MAX_KEYS


# The one-launch kernel's statistics pass in key blocks of at least this many where the keys are more than
# SHORT_KEYS: its loop then has half the dependent steps. H200, scripts/probe_partial_softmax.py --plans one,stats,
# same call: N = Nk = 256, d = 160, tile (64, 64, 4, 3): 9.0 us against 9.4 with 64-key statistics blocks (256-key
# blocks 9.6); at Nk = 77 (SHORT_KEYS: 32-key blocks) 128-key blocks lost (6.2 against 5.9 us).
STATS_BLOCK_MIN = 128
_STATS_BLOCK_KNOB = env_key("SDKERNELS_PARTIAL_STATS_BLOCK")


def one_launch_stats_block(block_n: int, Nk: int) -> int:
    """Key block of the one-launch kernel's statistics pass: STATS_BLOCK_MIN or the softmax . V pass's block_n if
    wider, block_n itself at Nk <= SHORT_KEYS; SDKERNELS_PARTIAL_STATS_BLOCK=n forces n (a probe knob,
    scripts/probe_partial_softmax.py)."""
    knob = getenv("SDKERNELS_PARTIAL_STATS_BLOCK") if _STATS_BLOCK_KNOB in ENVIRON else None
    if knob:
        return int(knob)
    return block_n if Nk <= SHORT_KEYS else max(block_n, STATS_BLOCK_MIN)


def choose_splits(n_row_programs: int, n_key_blocks: int, device) -> int:
    """How many programs share each row block's key range: enough to fill the GPU, at most one per key block."""
    want = cdiv(PROGRAMS_PER_SM * multiprocessor_count(device), max(n_row_programs, 1))
    return max(1, min(want, n_key_blocks))


def _row_stat_partials(q, k, scale, mask, splits=None, config=None, pdl=False):
    """(partials, splits): partials is (splits, B*H, N, 2) fp32, each split's (max, sum) over its part of the keys
    (_attention_row_stats); with one split it is the statistics themselves. ``pdl``: the next kernel is a
    programmatic dependent (programmatic_launch)."""
    B, H, N, d = q.shape
    Nk = k.shape[2]
    D0, D1 = HEAD_DIM_CHUNKS[d]
    block_m, block_n, warps, stages = config or launch_config(d, q.dtype, N, B * H, mask_kind(mask, d), q.device, Nk)
    n_row_programs = cdiv(N, block_m) * B * H
    n_key_blocks = cdiv(Nk, block_n)
    splits = splits or choose_splits(n_row_programs, n_key_blocks, q.device)
    splits = min(splits, n_key_blocks)
    fold_tail = tail_mode(d, Nk, block_n) == 1
    blocks_per_split = cdiv(n_key_blocks if fold_tail else Nk // block_n, splits)
    partials = poisoned(torch.empty((splits, B * H, N, 2), device=q.device, dtype=torch.float32))
    unit = stride_unit(q, k)
    _attention_row_stats[(cdiv(N, block_m), B * H, splits)](
        q, k, mask if mask is not None else q, partials, H, N, Nk, float(scale) * LOG2E, blocks_per_split,
        *view_strides(q, unit), *view_strides(k, unit), *mask_strides(mask),
        D0=D0, D1=D1, C1=chunk1_start(d), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, MASK=mask_kind(mask, d),
        PRECISION=dot_precision(q.dtype), STRIDE_UNIT=unit, FOLD_TAIL=fold_tail, PDL=pdl, num_warps=warps,
        num_stages=stages)
    return partials, splits


def attention_row_stats_triton(q, k, scale, mask, splits=None, config=None):
    """(B*H, N, 2) fp32: per row of S = scale * q k^T + mask its max L and its sum of exp(S - L). q, k are
    (B, H, tokens, d) views; mask None or broadcast to (B, H, N, Nk)."""
    partials, splits = _row_stat_partials(q, k, scale, mask, splits, config)
    if splits == 1:
        return partials[0]
    rows = partials[0].numel() // 2
    stats = poisoned(torch.empty_like(partials[0]))
    _merge_row_stats[(cdiv(rows, MERGE_BLOCK),)](partials, stats, rows, splits, BLOCK=MERGE_BLOCK, num_warps=4)
    return stats


def partial_softmax_attention_triton(q, k, v, out, scale, mask, row_stats=None, config=None, stats_config=None):
    """out = softmax(scale * q k^T + mask) v through row statistics, then softmax . V. ``row_stats(q, k, scale,
    mask)`` computes the (B*H, N, 2) statistics (default: the Triton statistics' per-split partials, which the
    softmax . V kernel merges as it loads them, or where one_launch(Nk) both passes in the softmax . V kernel);
    the caller checked inputs. ``config`` and ``stats_config``: the
    softmax . V and the statistics kernels' (BLOCK_M, BLOCK_N, warps, stages) (default: launch_config; the
    statistics take ``config`` where only it is given)."""
    B, H, N, d = q.shape
    Nk = k.shape[2]
    D0, D1 = HEAD_DIM_CHUNKS[d]
    own_stats = row_stats is None and one_launch(Nk)
    block_m, block_n, warps, stages = config or launch_config(d, q.dtype, N, B * H, mask_kind(mask, d), q.device, Nk)
    pdl = programmatic_launch(q, Nk)
    stats_block = one_launch_stats_block(block_n, Nk) if own_stats else block_n
    if own_stats:
        partials, splits = q, 1  # (not read)
    elif row_stats is None:
        partials, splits = _row_stat_partials(q, k, scale, mask, config=stats_config or config, pdl=pdl)
    else:
        partials, splits = row_stats(q, k, scale, mask), 1
    unit = stride_unit(q, k, v, out)
    _softmax_times_v[(cdiv(N, block_m), B * H)](
        q, k, v, out, mask if mask is not None else q, partials, splits, H, N, Nk, float(scale) * LOG2E,
        *view_strides(q, unit), *view_strides(k, unit), *view_strides(v, unit), *view_strides(out, unit),
        *mask_strides(mask),
        D0=D0, D1=D1, C1=chunk1_start(d), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, MASK=mask_kind(mask, d),
        PRECISION=dot_precision(q.dtype), STRIDE_UNIT=unit, FOLD_TAIL=tail_mode(d, Nk, block_n) == 1, PDL=pdl,
        OWN_STATS=own_stats, STATS_BLOCK_N=stats_block,
        STATS_FOLD_TAIL=tail_mode(d, Nk, stats_block) == 1, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return out


fix_cache_keys(globals())  # last: see its docstring
