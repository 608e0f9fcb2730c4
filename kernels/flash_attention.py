"""Attention forward, non-causal, tiled with an online softmax (FlashAttention-2 style), in Triton.

Every tensor is seen as (B, H, tokens, d) through four strides, so diffusers' (B, N, H*d) layout is read in place.
tl.dot needs each dim to be a power of two >= 16, so the head dim is covered by at most two such chunks, D0 + D1,
and each product is the sum (QK^T) or the concatenation (PV) of two dots: 80 = 64 + 16 and 160 = 128 + 32 exactly,
40 as 32 + 16 = 48 (padding 40 to 64, as FA2/FA3 and SDPA do, wastes 37% of the tensor-core work; to 48, 17%).
Padded head-dim columns read as zero and are not stored.

Token, head and batch strides arrive divided by STRIDE_UNIT (16 bytes in elements where they all allow it), so that
the compiler knows rows start 16-byte aligned and uses vector loads and asynchronous copies (cp.async) even where a
stride is not a multiple of 16 elements (d = 40: a head starts every 80 bytes).

Scores live in the log2 domain, s = (q.k) * scale * log2(e) + mask * log2(e), so that exp2 replaces exp; without a
mask the scale is applied late (to the row max, and inside exp2's argument as one FMA: scale > 0). Keys past
the end of the last block are read clamped to the last key and masked to -inf, and query rows past the end are
read clamped and not stored, so no load needs a row mask.
"""
import torch
import triton
import triton.language as tl

from .utils import cdiv, interpreting, multiprocessor_count, fix_cache_keys
from .launch import cached_launch

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the same, readable inside kernels

# Head dim -> (D0, D1): the power-of-two chunks the dots run on (D1 = 0: one chunk; D0 + D1 > d: padded).
HEAD_DIM_CHUNKS = {40: (32, 16), 64: (64, 0), 80: (64, 16), 128: (128, 0), 160: (128, 32)}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for fp16/bf16 on sm_90 (H100/H200). Starting points: re-measure with
# `python bench/bench_attention.py --sweep` and update this table with what wins.
HALF_CONFIGS = {
    40: (128, 64, 8, 3),
    64: (128, 64, 8, 3),  # H200, 2x10x16384: 3278 us against 3668 us for (128, 128, 8, 3); 2x10x4096: 214 vs 248
    80: (128, 64, 8, 3),
    128: (128, 64, 8, 3),
    160: (64, 64, 4, 3),  # SD's head dim 160 comes at N <= 256 only: 64-row tiles (1.20x SDPA at N = 256, H200)
}
# Short key lengths (Nk <= SHORT_KEYS: SD's cross-attention to 77 text tokens): narrow key blocks and 4 warps, so the
# few key blocks keep the masked tail small (H200 sweep at Nk = 77: 1.13-1.25x SDPA, where HALF_CONFIGS gave
# 0.77x at d = 40; 1.02x at d = 64). Head dim 128 keeps HALF_CONFIGS (its best short-key config: 0.85x SDPA).
SHORT_KEYS = 128
SHORT_KEY_CONFIGS = {
    40: (128, 32, 4, 3),
    64: (64, 32, 4, 2),
    80: (64, 32, 4, 3),
    160: (64, 32, 4, 4),
}
# fp32 inputs use exact (ieee) dots, which run on CUDA cores: small tiles.
FP32_CONFIG = (32, 32, 8, 1)
# Under the interpreter: small tiles, so that tests at N <= 80 still see several blocks and a tail (few blocks:
# the interpreter spends its time per block, not per element).
INTERPRETER_CONFIG = (32, 64, 1, 1)


def launch_config(head_dim, dtype, N, batch_heads, mask_kind, device, Nk=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one launch (Nk None: a long key length)."""
    if interpreting():
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FP32_CONFIG
    if Nk is not None and Nk <= SHORT_KEYS and head_dim in SHORT_KEY_CONFIGS:
        block_m, block_n, warps, stages = SHORT_KEY_CONFIGS[head_dim]
    else:
        block_m, block_n, warps, stages = HALF_CONFIGS[head_dim]
        if too_few_tiles(N, 128, batch_heads, device):
            block_m, warps = 64, 4
    if mask_kind == 2:  # a full mask tile's 64-bit addresses cost registers: narrower key blocks
        block_n = min(block_n, 64)
    return block_m, block_n, warps, stages


def too_few_tiles(N, block_m, batch_heads, device) -> bool:
    """Whether block_m-row tiles leave SMs idle (short N): the launchers then halve the tile to double the programs."""
    return cdiv(N, block_m) * batch_heads < multiprocessor_count(device)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. PRECISION "upcast" multiplies in fp32 after an exact widening: the interpreter's dot
    reads bf16 operands as raw integers, and a bf16 x bf16 product is exact in fp32, so this is what the tensor
    cores compute."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_tile(base, rows, stride_row, stride_col, COL0: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Columns COL0 .. COL0+WIDTH of the given rows (already clamped in range); columns past HEAD_DIM read as 0.
    The padded columns are read clamped to the last real one and zeroed in registers, not through a masked load:
    on an H100 with Triton 3.6 the masked load feeding the dot gave wrong results and an out-of-bounds shared-memory
    read at head dim 40 (the clamped load runs right there: scripts/probe_attention.sh)."""
    cols = COL0 + tl.arange(0, WIDTH)
    if COL0 + WIDTH > HEAD_DIM:
        real = cols < HEAD_DIM
        tile = tl.load(base + rows[:, None] * stride_row + tl.minimum(cols, HEAD_DIM - 1)[None, :] * stride_col)
        return tl.where(real[None, :], tile, tl.zeros_like(tile))
    else:
        return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col)


@triton.jit
def _load_query(q_base, rows_m, stride_qn, stride_qd, D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """The query tile as its two head-dim chunks (the second is the first again when there is one chunk). A second
    chunk that overlaps the first (C1 < D0, see chunk1_start) has its overlapping columns zeroed here, once, so that
    q0 k0^T + q1 k1^T counts each column once."""
    q0 = _load_tile(q_base, rows_m, stride_qn, stride_qd, 0, D0, HEAD_DIM)
    if D1 > 0:
        q1 = _load_tile(q_base, rows_m, stride_qn, stride_qd, C1, D1, HEAD_DIM)
        if C1 < D0:
            q1 = tl.where((C1 + tl.arange(0, D1) >= D0)[None, :], q1, tl.zeros_like(q1))
    else:
        q1 = q0
    return q0, q1


@triton.jit
def _scores(q0, q1, k_base, mask_base, rows_m, start_n, Nk, stride_kn, stride_kd, stride_mm, stride_mn, qk_scale,
            D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
            TAIL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of one key block in the log2 domain, (BLOCK_M, BLOCK_N) fp32, and the key rows it read; without a
    mask still to be multiplied by qk_scale (see _log2_scores)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TAIL:
        rows_n = tl.minimum(offs_n, Nk - 1)
    else:
        rows_n = offs_n
    k0 = _load_tile(k_base, rows_n, stride_kn, stride_kd, 0, D0, HEAD_DIM)
    s = _dot(q0, tl.trans(k0), tl.zeros([q0.shape[0], BLOCK_N], dtype=tl.float32), PRECISION)
    if D1 > 0:
        k1 = _load_tile(k_base, rows_n, stride_kn, stride_kd, C1, D1, HEAD_DIM)
        s = _dot(q1, tl.trans(k1), s, PRECISION)
    if MASK == 1:  # one mask row for every query (a key-padding mask): load it as a vector
        bias = tl.load(mask_base + rows_n * stride_mn)
        s = s * qk_scale + bias.to(tl.float32)[None, :] * _LOG2E
    elif MASK == 2:
        bias = tl.load(mask_base + rows_m[:, None] * stride_mm + rows_n[None, :] * stride_mn)
        s = s * qk_scale + bias.to(tl.float32) * _LOG2E
    if TAIL:
        s = tl.where((offs_n < Nk)[None, :], s, float("-inf"))
    return s, rows_n


@triton.jit
def _log2_scores(s, qk_scale, MASK: tl.constexpr):
    """_scores' result (or a row max of it: scaling by qk_scale > 0 commutes with max) in the log2 domain. Where
    the multiply is left to here it fuses with the subtraction that follows into one FMA per score."""
    if MASK == 0:
        return s * qk_scale
    else:
        return s


@triton.jit
def _accumulate_pv(acc0, acc1, p, v_base, rows_n, stride_vn, stride_vd, D0: tl.constexpr, D1: tl.constexpr,
                   C1: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """acc += p @ v over both head-dim chunks; p is already in v's dtype."""
    v0 = _load_tile(v_base, rows_n, stride_vn, stride_vd, 0, D0, HEAD_DIM)
    acc0 = _dot(p, v0, acc0, PRECISION)
    if D1 > 0:
        v1 = _load_tile(v_base, rows_n, stride_vn, stride_vd, C1, D1, HEAD_DIM)
        acc1 = _dot(p, v1, acc1, PRECISION)
    return acc0, acc1


@triton.jit
def _online_softmax_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, mask_base, rows_m, start_n, Nk,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
                          D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                          TAIL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    s, rows_n = _scores(q0, q1, k_base, mask_base, rows_m, start_n, Nk, stride_kn, stride_kd, stride_mm,
                        stride_mn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, TAIL, MASK, PRECISION)
    m_new = tl.maximum(m_i, _log2_scores(tl.max(s, 1), qk_scale, MASK))
    if MASK > 0:
        # A row masked to -inf so far would give exp2(-inf - -inf) = NaN; subtract 0 instead (its p is 0 anyway).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(_log2_scores(s, qk_scale, MASK) - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc0 = acc0 * alpha[:, None]
    if D1 > 0:
        acc1 = acc1 * alpha[:, None]
    acc0, acc1 = _accumulate_pv(acc0, acc1, p.to(v_base.dtype.element_ty), v_base, rows_n, stride_vn, stride_vd,
                                D0, D1, C1, HEAD_DIM, PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _store_output(o_base, acc0, acc1, offs_m, N, stride_on, stride_od, D0: tl.constexpr, D1: tl.constexpr,
                  C1: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store the rows < N of both chunks: the first without columns past the head dim, the second (columns C1 ..)
    without those past the head dim or already stored with the first."""
    row_ok = (offs_m < N)[:, None]
    cols = tl.arange(0, D0)
    # One padded chunk (D0 > HEAD_DIM, e.g. 40 as 64 in a probe) must not write into the next head's columns.
    tl.store(o_base + offs_m[:, None] * stride_on + cols[None, :] * stride_od, acc0.to(o_base.dtype.element_ty),
             mask=row_ok & (cols < HEAD_DIM)[None, :])
    if D1 > 0:
        cols = C1 + tl.arange(0, D1)
        ptrs = o_base + offs_m[:, None] * stride_on + cols[None, :] * stride_od
        tl.store(ptrs, acc1.to(o_base.dtype.element_ty), mask=row_ok & ((cols >= D0) & (cols < HEAD_DIM))[None, :])


@triton.jit
def _zero_accumulators(BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """fp32 output accumulators for both head-dim chunks; with one chunk the second is the first (unused, carried
    unchanged through the key loop)."""
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        acc1 = acc0
    return acc0, acc1


@triton.jit
def _bh_base(ptr, b, h, stride_b, stride_h, STRIDE_UNIT: tl.constexpr):
    """Start of the (b, h) slice; strides in units of STRIDE_UNIT elements, 64-bit (the tensor may be large)."""
    return ptr + (b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h) * STRIDE_UNIT


@triton.jit
def _program_tile(q_ptr, k_ptr, v_ptr, mask_ptr, H, N, sqb, sqh, skb, skh, svb, svh, smb, smh,
                  BLOCK_M: tl.constexpr, STRIDE_UNIT: tl.constexpr):
    """What a program of grid (row block, b*H + h, ...) works on: b*H + h, the starts of its (b, h) slices of q,
    k, v and the mask, its query rows, and those rows clamped into range (read, never stored)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (bh, _bh_base(q_ptr, b, h, sqb, sqh, STRIDE_UNIT), _bh_base(k_ptr, b, h, skb, skh, STRIDE_UNIT),
            _bh_base(v_ptr, b, h, svb, svh, STRIDE_UNIT), _bh_base(mask_ptr, b, h, smb, smh, 1), offs_m,
            tl.minimum(offs_m, N - 1))


@cached_launch
@triton.jit
def _flash_attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, H, N, Nk, qk_scale,
                         sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                         smb, smh, smm, smn,
                         D0: tl.constexpr, D1: tl.constexpr, C1: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                         STRIDE_UNIT: tl.constexpr, TAIL_MODE: tl.constexpr):
    bh, q_base, k_base, v_base, mask_base, offs_m, rows_m = _program_tile(
        q_ptr, k_ptr, v_ptr, mask_ptr, H, N, sqb, sqh, skb, skh, svb, svh, smb, smh, BLOCK_M, STRIDE_UNIT)
    sqn *= STRIDE_UNIT
    skn *= STRIDE_UNIT
    svn *= STRIDE_UNIT
    son *= STRIDE_UNIT
    q0, q1 = _load_query(q_base, rows_m, sqn, sqd, D0, D1, C1, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0, acc1 = _zero_accumulators(BLOCK_M, D0, D1)
    full_end = (Nk // BLOCK_N) * BLOCK_N
    if TAIL_MODE == 2 and full_end < Nk:  # the partial block first, so nothing follows the pipelined loop
        acc0, acc1, m_i, l_i = _online_softmax_block(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, mask_base, rows_m, full_end, Nk, skn, skd, svn, svd,
            smm, smn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, True, MASK, PRECISION)
    if TAIL_MODE == 1:  # every block masked, the partial one inside the loop
        for start_n in range(0, Nk, BLOCK_N):
            acc0, acc1, m_i, l_i = _online_softmax_block(
                acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, mask_base, rows_m, start_n, Nk, skn, skd, svn, svd,
                smm, smn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, True, MASK, PRECISION)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc0, acc1, m_i, l_i = _online_softmax_block(
                acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, mask_base, rows_m, start_n, Nk, skn, skd, svn, svd,
                smm, smn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, False, MASK, PRECISION)
    if TAIL_MODE == 0 and full_end < Nk:  # the partial block after the loop
        acc0, acc1, m_i, l_i = _online_softmax_block(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, mask_base, rows_m, full_end, Nk, skn, skd, svn, svd,
            smm, smn, qk_scale, D0, D1, C1, HEAD_DIM, BLOCK_N, True, MASK, PRECISION)

    inv_l = 1.0 / l_i
    o_base = _bh_base(o_ptr, bh // H, bh % H, sob, soh, STRIDE_UNIT)
    _store_output(o_base, acc0 * inv_l[:, None], acc1 * inv_l[:, None], offs_m, N, son, sod, D0, D1, C1, HEAD_DIM)


def dot_precision(dtype) -> str:
    """How the kernels' dots multiply: fp32 inputs exactly ("ieee"; TF32 would miss an fp32 reference by ~1e-3),
    bf16 under the interpreter widened to fp32 first (see _dot), fp16/bf16 on the GPU on tensor cores."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"  # ignored for 16-bit inputs


def stride_unit(*tensors) -> int:
    """16 bytes in elements if every batch, head and token stride of the (B, H, tokens, d) views is a multiple of
    it, else 1: the kernels take those strides divided by this unit (see the module docstring)."""
    unit = 16 // tensors[0].element_size()
    for t in tensors:  # plain loops: this runs on every launch, and a generator costs a call per item
        for s in t.stride()[:3]:
            if s % unit:
                return 1
    return unit


def view_strides(t, unit):
    """(batch, head, token) strides divided by ``unit``, then the head-dim stride in elements."""
    sb, sh, sn, sd = t.stride()
    return sb // unit, sh // unit, sn // unit, sd


def mask_strides(mask):
    return mask.stride() if mask is not None else (0, 0, 0, 0)


# Whether a mask row shared by every query is loaded as one vector (kind 1) also where the head dim takes two dot
# chunks. On an H100 with Triton 3.6, compute-sanitizer found an out-of-range shared-memory read in the row max at
# head dim 80 (64 + 16) with a key-padding mask loaded that way (d = 64 was clean): such masks take the full-tile
# load of kind 2 (with a zero row stride) there until scripts/probe_attention.sh shows the vector load clean.
VECTOR_MASK_WITH_TWO_CHUNKS = False
# Where the partial last key block runs: 0 after the key loop, 1 inside it (every block masked), 2 before it.
# Head dims of two dot chunks (80 = 64 + 16, 160 = 128 + 32) computed wrong results on an H100 with Triton 3.6 when
# the partial block followed the pipelined loop (relative error 0.2 at N = 65, Nk = 300: 4 full blocks of 64, then
# the partial one) or preceded it (0.18-0.24); inside the loop they are right (3e-4, scripts/probe_attention.sh).
# So those head dims fold a partial block into the loop (tail_mode); one-chunk head dims, and key lengths with no
# partial block, keep the unmasked loop (masking every block costs time). None: that choice;
# scripts/probe_attention.py sets 0, 1 or 2 to compare.
TAIL_MODE = None


# Where the second head-dim chunk starts. With OVERLAP_LAST_CHUNK (the default) a padded split ends its second chunk
# at the head dim (40 = columns 0..31 and 24..39): every load is a plain contiguous row segment, the query's
# overlapping columns are zeroed once (_load_query), and the output's are stored from the first chunk only. Off, the
# second chunk starts at D0 and its padded columns are read clamped and zeroed (_load_tile), which turns the loads into
# gathers: 1.6x slower at SD1.5's self-attention on an H200 (bench_attention.py --sweep, bench/NOTES.md).
OVERLAP_LAST_CHUNK = True


def chunk1_start(head_dim: int) -> int:
    D0, D1 = HEAD_DIM_CHUNKS[head_dim]
    if D1 and OVERLAP_LAST_CHUNK:
        return head_dim - D1
    return D0


def tail_mode(head_dim: int, Nk: int, block_n: int) -> int:
    if TAIL_MODE is not None:
        return TAIL_MODE
    return 1 if HEAD_DIM_CHUNKS[head_dim][1] and Nk % block_n else 0


def mask_kind(mask, head_dim) -> int:
    """0: no mask; 1: the same mask row for every query (loaded as a vector); 2: a full (N, Nk) mask tile per
    program (also used for shared rows where the vector load is unsafe, see VECTOR_MASK_WITH_TWO_CHUNKS)."""
    if mask is None:
        return 0
    shared_row = mask.stride(2) == 0 or mask.shape[2] == 1
    vector_ok = HEAD_DIM_CHUNKS[head_dim][1] == 0 or VECTOR_MASK_WITH_TWO_CHUNKS
    return 1 if shared_row and vector_ok else 2


def flash_attention_triton(q, k, v, out, scale, mask, config=None):
    """out = softmax(scale * q k^T + mask) v on (B, H, tokens, d) views (any strides). ``mask`` is None or a view
    broadcast to (B, H, N, Nk) (zero strides where it broadcasts). The caller checked shapes, dtypes and head dim.
    Where the copy engine can load the views (kernels/flash_attention_tma.py) it does."""
    from .flash_attention_tma import flash_attention_tma, use_tma  # imports this module: not at the top
    if use_tma(q, k, v, out, mask):
        return flash_attention_tma(q, k, v, out, scale, config)
    B, H, N, d = q.shape
    Nk = k.shape[2]
    D0, D1 = HEAD_DIM_CHUNKS[d]
    block_m, block_n, warps, stages = config or launch_config(d, q.dtype, N, B * H, mask_kind(mask, d), q.device, Nk)
    unit = stride_unit(q, k, v, out)
    grid = (cdiv(N, block_m), B * H)
    _flash_attention_fwd[grid](
        q, k, v, out, mask if mask is not None else q, H, N, Nk, float(scale) * LOG2E,
        *view_strides(q, unit), *view_strides(k, unit), *view_strides(v, unit), *view_strides(out, unit),
        *mask_strides(mask),
        D0=D0, D1=D1, C1=chunk1_start(d), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, MASK=mask_kind(mask, d),
        PRECISION=dot_precision(q.dtype), STRIDE_UNIT=unit, TAIL_MODE=tail_mode(d, Nk, block_n), num_warps=warps,
        num_stages=stages)
    return out


fix_cache_keys(globals())  # last: see its docstring
