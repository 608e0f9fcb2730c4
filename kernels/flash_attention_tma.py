"""Attention forward (kernels/flash_attention.py's online softmax) with q, k, v read and the output written by
Hopper's copy engine (TMA) through 4-D tensor descriptors over the (B, H, tokens, d) views.

A descriptor's box is the tile in the layout the tensor cores read: the loads cost no registers or address
arithmetic and the pipeliner overlaps them with the dots. The copy engine fills what lies outside the view with
zeros (query rows past N, keys past Nk, head-dim columns past d when a chunk is padded: 40 as one chunk reads
columns 40..63) and the store drops the rows and columns outside it, so no load or store needs a mask; keys past
Nk still score -inf in the last block (a zero key would score 0).

A descriptor has one box shape, so a head dim of two chunks (80 = 64 + 16, 160 = 128 + 32; 40 = 32 + 16 where
tma_chunks says so) has two descriptors per tensor, one per chunk width. No attention mask: masked calls take the
pointer kernel.
"""
import torch
import triton
import triton.language as tl

from .._env import ENVIRON, env_key, getenv
from .flash_attention import (HEAD_DIM_CHUNKS, INTERPRETER_CONFIG, LOG2E, SHORT_KEYS, _dot, dot_precision,
                              tail_mode, too_few_tiles, _zero_accumulators)
from .utils import capability_major, cdiv, interpreting, next_power_of_2, fix_cache_keys

# Descriptors (TMA) need Hopper or newer (compute capability 90; sdkernels.compile_check reads it too).
MIN_COMPUTE_CAPABILITY = 90
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, from scripts/probe_flash_tma.py on an H200 (Triton 3.6),
# against the pointer kernel's best config in the same run: d = 80, N = 1024: 16.2 against 18.2 us (1.12x SDPA);
# d = 64, N = 16384: 3141 against 3234 us; d = 40, N = 4096: 174.9 against 181.3 us; d = 160, N = 256: 6.7 against
# 6.9 us. Head dim 128 (295.7 against 294.0 us) and short key lengths (Nk <= SHORT_KEYS: 11.5 against 10.0 us at
# d = 40, Nk = 77) keep the pointer kernel. Head dim 40 runs as one chunk zero-filled to 64 (ONE_CHUNK_HEAD_DIMS):
# 167.0 us (0.96x SDPA) against 174.9 us as 32 + 16 in session 20's probe (H200): one dot of each kind beat two
# narrower ones despite the 33% more multiplies.
ONE_CHUNK_HEAD_DIMS = "40"
_TMA_KNOB = env_key("SDKERNELS_FLASH_TMA")  # read per call: `in ENVIRON` first, no call where it is unset
TMA_CONFIGS = {
    40: (128, 64, 4, 3),
    64: (64, 128, 4, 2),
    80: (64, 128, 4, 2),
    160: (64, 128, 4, 2),
}


@triton.jit
def _tma_block(acc0, acc1, m_i, l_i, q0, q1, k0_desc, k1_desc, v0_desc, v1_desc, b, h, start_n, Nk, qk_scale,
               D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
               PRECISION: tl.constexpr):
    """One key block of the online softmax: scores in the log2 domain, rescaled accumulators, + p @ v."""
    k0 = k0_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, D0)
    s = _dot(q0, tl.trans(k0), tl.zeros([q0.shape[0], BLOCK_N], dtype=tl.float32), PRECISION)
    if D1 > 0:
        k1 = k1_desc.load([b, h, start_n, D0]).reshape(BLOCK_N, D1)
        s = _dot(q1, tl.trans(k1), s, PRECISION)
    if TAIL:
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < Nk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0 commutes with the max
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(q0.dtype)
    v0 = v0_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, D0)
    acc0 = _dot(p, v0, acc0 * alpha[:, None], PRECISION)
    if D1 > 0:
        v1 = v1_desc.load([b, h, start_n, D0]).reshape(BLOCK_N, D1)
        acc1 = _dot(p, v1, acc1 * alpha[:, None], PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _flash_attention_tma_fwd(q0_desc, q1_desc, k0_desc, k1_desc, v0_desc, v1_desc, o0_desc, o1_desc, H, Nk,
                             qk_scale, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TAIL_MODE: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    m0 = tl.program_id(0) * BLOCK_M
    q0 = q0_desc.load([b, h, m0, 0]).reshape(BLOCK_M, D0)
    if D1 > 0:
        q1 = q1_desc.load([b, h, m0, D0]).reshape(BLOCK_M, D1)
    else:
        q1 = q0  # unused
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0, acc1 = _zero_accumulators(BLOCK_M, D0, D1)
    # Where the partial last key block runs: see flash_attention.TAIL_MODE (0 after the loop, 1 inside it, 2 first).
    full_end = (Nk // BLOCK_N) * BLOCK_N
    if TAIL_MODE == 2 and full_end < Nk:
        acc0, acc1, m_i, l_i = _tma_block(acc0, acc1, m_i, l_i, q0, q1, k0_desc, k1_desc, v0_desc, v1_desc, b, h,
                                          full_end, Nk, qk_scale, D0, D1, BLOCK_N, True, PRECISION)
    if TAIL_MODE == 1:
        for start_n in range(0, Nk, BLOCK_N):
            acc0, acc1, m_i, l_i = _tma_block(acc0, acc1, m_i, l_i, q0, q1, k0_desc, k1_desc, v0_desc, v1_desc, b,
                                              h, start_n, Nk, qk_scale, D0, D1, BLOCK_N, True, PRECISION)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc0, acc1, m_i, l_i = _tma_block(acc0, acc1, m_i, l_i, q0, q1, k0_desc, k1_desc, v0_desc, v1_desc, b,
                                              h, start_n, Nk, qk_scale, D0, D1, BLOCK_N, False, PRECISION)
    if TAIL_MODE == 0 and full_end < Nk:
        acc0, acc1, m_i, l_i = _tma_block(acc0, acc1, m_i, l_i, q0, q1, k0_desc, k1_desc, v0_desc, v1_desc, b, h,
                                          full_end, Nk, qk_scale, D0, D1, BLOCK_N, True, PRECISION)
    inv_l = 1.0 / l_i
    o0_desc.store([b, h, m0, 0], (acc0 * inv_l[:, None]).to(q0.dtype).reshape(1, 1, BLOCK_M, D0))
    if D1 > 0:
        o1_desc.store([b, h, m0, D0], (acc1 * inv_l[:, None]).to(q0.dtype).reshape(1, 1, BLOCK_M, D1))


def tma_chunks(head_dim):
    """(D0, D1): for the head dims listed in SDKERNELS_FLASH_TMA_ONE_CHUNK (default ONE_CHUNK_HEAD_DIMS; "" for
    none) one chunk padded to a power of two by the zero fill (40 as 64), else HEAD_DIM_CHUNKS (40 as 32 + 16)."""
    if str(head_dim) in getenv("SDKERNELS_FLASH_TMA_ONE_CHUNK", ONE_CHUNK_HEAD_DIMS).split(","):
        return next_power_of_2(head_dim), 0
    return HEAD_DIM_CHUNKS[head_dim]


def _box_strides(t):
    """t's strides with those of size-1 dims replaced by one the copy engine accepts (torch may give a size-1 dim
    any stride; it is never stepped along)."""
    strides, shape = t.stride(), t.shape
    if 1 not in shape:
        return list(strides)
    span = max(s * n for s, n in zip(strides, shape))
    return [span if n == 1 else s for s, n in zip(strides, shape)]


def tma_why_not(q, k, v, out, mask):
    """None where the descriptor kernel can run this call, else why not (the pointer kernel runs it)."""
    if q.shape[3] not in TMA_CONFIGS:
        return f"head dim {q.shape[3]}"
    if mask is not None:
        return "an attention mask"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    for t in (q, k, v, out):
        strides, shape = t.stride(), t.shape
        if strides[3] != 1:
            return "a head-dim stride other than 1"
        # 8 elements = 16 bytes at 16 bits; a size-1 dim's stride is never stepped along (see _box_strides)
        if t.data_ptr() % 16 or any(strides[i] % 8 and shape[i] != 1 for i in range(3)):
            return "a start or a stride not a multiple of 16 bytes"
    return None


def use_tma(q, k, v, out, mask) -> bool:
    """Whether flash_attention_triton takes the descriptor kernel: on sm_90+ where it can (tma_why_not) and the
    keys are more than SHORT_KEYS; SDKERNELS_FLASH_TMA=0 never, =1 wherever it can (also under the interpreter).
    The cheap tests first: this runs on every call."""
    knob = getenv("SDKERNELS_FLASH_TMA", "") if _TMA_KNOB in ENVIRON else ""
    if knob == "0":
        return False
    if knob != "1" and (k.shape[2] <= SHORT_KEYS or interpreting()
                        or capability_major(q.device) * 10 < MIN_COMPUTE_CAPABILITY):
        return False
    return tma_why_not(q, k, v, out, mask) is None


def tma_launch_config(head_dim, N, batch_heads, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one launch of the descriptor kernel."""
    if interpreting():
        return INTERPRETER_CONFIG
    block_m, block_n, warps, stages = TMA_CONFIGS[head_dim]
    if block_m > 64 and too_few_tiles(N, block_m, batch_heads, device):
        block_m = 64
    return block_m, block_n, warps, stages


def flash_attention_tma(q, k, v, out, scale, config=None):
    """out = softmax(scale * q k^T) v on (B, H, tokens, d) views that tma_why_not accepts."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, H, N, d = q.shape
    Nk = k.shape[2]
    D0, D1 = tma_chunks(d)
    block_m, block_n, warps, stages = config or tma_launch_config(d, N, B * H, q.device)

    def descriptors(t, rows):
        shape, strides = list(t.shape), _box_strides(t)
        first = TensorDescriptor(t, shape, strides, [1, 1, rows, D0])
        return first, (TensorDescriptor(t, shape, strides, [1, 1, rows, D1]) if D1 else first)

    _flash_attention_tma_fwd[(cdiv(N, block_m), B * H)](
        *descriptors(q, block_m), *descriptors(k, block_n), *descriptors(v, block_n), *descriptors(out, block_m),
        H, Nk, float(scale) * LOG2E, D0=D0, D1=D1, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), TAIL_MODE=tail_mode(d, Nk, block_n), num_warps=warps, num_stages=stages)
    return out


fix_cache_keys(globals())  # last: see its docstring
