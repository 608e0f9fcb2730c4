"""sdkernels::flash_attention: out = softmax(scale * q k^T + attn_mask) v, forward, non-causal.

Two layouts, told apart by ``heads``:
  * heads > 0: q (B, N, H*d), k and v (B, Nk, H*d): diffusers' projection outputs, read in place; out (B, N, H*d);
  * heads == 0: q (B, H, N, d), k and v (B, H, Nk, d); out (B, H, N, d) in q's stride order.
No backend transposes or copies q, k or v: each reads them through strides. ``attn_mask`` is None or an additive
float mask broadcastable to (B, H, N, Nk) (a boolean mask runs on the fallback).

Backends, in the order tried:
  * "flash": Triton, tiled online softmax (kernels/flash_attention.py);
  * "partial_softmax": Triton, row max L and sum of exp(S - L) into a (B*H, N, 2) tensor, then softmax . V
    recomputed blockwise, never writing the N x Nk matrix (kernels/partial_softmax.py);
  * "partial_softmax_cuda": the same with the row statistics in CUDA C++ (csrc/attention_row_stats.cu).
Inputs none of them runs (head dims other than 40, 64, 80, 128, 160, float64, boolean masks) run on torch's
scaled_dot_product_attention with one warning. ``dispatch.set_chooser("flash_attention", fn)`` lets a per-shape
choice (e.g. measured) pick among them when no backend is forced.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, dispatch
from ._common import (KERNEL_DTYPES, call_op, fail, kernels, new_output, poisoned, triton_available,
                      triton_device_why_not)

OP = "flash_attention"
KERNEL_HEAD_DIMS = (40, 64, 80, 128, 160)
# Head dims the kernels must not run on a GPU (comma-separated in SDKERNELS_GPU_UNSAFE_HEAD_DIMS; default none): a
# safety valve. Head dims of two dot chunks (80 = 64 + 16, 160 = 128 + 32) once computed wrong results on an H100
# with Triton 3.6 when the partial key block followed the pipelined key loop; they now fold it into the loop
# (kernels/flash_attention.py, TAIL_MODE).
GPU_UNSAFE_HEAD_DIMS = tuple(int(d) for d in os.environ.get("SDKERNELS_GPU_UNSAFE_HEAD_DIMS", "").split(",") if d)


# ---- layouts --------------------------------------------------------------------------------------------------

def as_bhnd(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, tokens, d) view of t: (B, tokens, H*d) unflattened and transposed when heads > 0 (never a copy). One
    as_strided: unflatten + transpose cost 2.5 times as much host time, and this runs for q, k, v and out."""
    if not heads:
        return t
    B, N, C = t.shape
    s_b, s_n, s_c = t.stride()
    d = C // heads
    return t.as_strided((B, heads, N, d), (s_b, d * s_c, s_n, s_c))


def from_bhnd(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.transpose(1, 2).flatten(2) if heads else t


def head_dim(t: torch.Tensor, heads: int) -> int:
    return t.shape[-1] // heads if heads else t.shape[-1]


def output_like(q: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The output: q's shape (with v's head dim) and dtype, in q's layout where q is dense."""
    if v.shape[-1] == q.shape[-1]:
        return new_output(q)
    return poisoned(q.new_empty(q.shape[:-1] + v.shape[-1:]))


def broadcast_mask(attn_mask: Optional[torch.Tensor], q4: torch.Tensor, k4: torch.Tensor):
    """attn_mask as a (B, H, N, Nk) view with zero strides where it broadcasts, or None."""
    if attn_mask is None:
        return None
    B, H, N, _ = q4.shape
    return attn_mask.expand(B, H, N, k4.shape[2])


# ---- reference ------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, scale, attn_mask=None, heads=0):
    """The specification, in eager PyTorch: float32 math (float64 for float64 inputs), q's dtype out."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q4, k4, v4 = (as_bhnd(t, heads).to(compute) for t in (q, k, v))
    s = (q4 @ k4.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(compute)
    out = torch.softmax(s, dim=-1) @ v4
    return from_bhnd(out, heads).to(q.dtype)


def _contiguous_output(q, v) -> bool:
    """Whether output_like makes a contiguous output for this (B, N, H*d) q: q contiguous, v of another width, or q
    the rows of a wider buffer (a slice of a fused projection: not dense, so empty_like does not keep its strides)."""
    if q.is_contiguous() or v.shape[-1] != q.shape[-1]:
        return True
    s0, s1, s2 = q.stride()
    return s2 == 1 and s1 > q.shape[2] and s0 >= q.shape[1] * s1


def _sdpa_fallback(q, k, v, scale, attn_mask, heads):
    """What runs when no backend fits, or where SDPA was measured faster: torch's SDPA in the input dtype (never the
    N x Nk fp32 reference, which would not fit in memory at SD sizes), in the op's output layout. For a contiguous
    (B, N, H*d) q that is what AttnProcessor2_0 makes of SDPA's output (transpose, reshape: no copy where SDPA wrote
    (B, N, H, d) memory), and for a slice of a fused projection, whose output_like is contiguous too (a copy there
    cost a launch per self-attention call); otherwise a copy into output_like."""
    q4, k4, v4 = as_bhnd(q, heads), as_bhnd(k, heads), as_bhnd(v, heads)
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if scale > 0:
        attend = F.scaled_dot_product_attention
    else:  # SDPA's flash backend on an H100 returned NaN for a negative scale: the math backend gets it right
        attend = _sdpa_math
    result = attend(q4, k4, v4, attn_mask=mask, scale=scale)
    if heads and _contiguous_output(q, v):  # as the reshape's result always is
        return result.transpose(1, 2).reshape(q.shape[:-1] + (heads * v4.shape[-1],))
    out = output_like(q, v, heads)
    as_bhnd(out, heads).copy_(result)
    return out


def _sdpa_math(q4, k4, v4, attn_mask, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=attn_mask, scale=scale)


# ---- checks ---------------------------------------------------------------------------------------------------

def check_inputs(q, k, v, scale, attn_mask, heads) -> None:
    inputs = dict(q=q, k=k, v=v, attn_mask=attn_mask)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            fail(OP, f"{name} must be a tensor", **inputs)
        if not t.is_floating_point():
            fail(OP, f"{name} must be floating point, not {t.dtype}", **inputs)
        if t.dtype != q.dtype or t.device != q.device:
            fail(OP, f"q, k and v must share dtype and device ({name} is {t.dtype} on {t.device})", **inputs)
    if not isinstance(heads, int) or heads < 0:
        fail(OP, f"heads={heads!r} must be 0 (q, k, v are (B, H, tokens, d)) or the number of heads", **inputs)
    if heads:
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            fail(OP, f"with heads={heads}, q, k and v must be (B, tokens, heads * head_dim)", **inputs)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[-1] % heads:
                fail(OP, f"{name}'s last dim {t.shape[-1]} is not a multiple of heads={heads}", **inputs)
        if not q.shape[0] == k.shape[0] == v.shape[0]:
            fail(OP, "q, k and v must have the same batch size", **inputs)
    else:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            fail(OP, "q, k and v must be (B, H, tokens, head_dim), or pass heads for (B, tokens, H * head_dim)",
                 **inputs)
        if not q.shape[:2] == k.shape[:2] == v.shape[:2]:
            fail(OP, "q, k and v must have the same batch size and number of heads", **inputs)
    token_dim = 1 if heads else 2
    if k.shape[token_dim] != v.shape[token_dim]:
        fail(OP, "k and v must have the same number of tokens", **inputs)
    if head_dim(q, heads) != head_dim(k, heads):
        fail(OP, "q and k must have the same head dim", **inputs)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        fail(OP, f"scale={scale!r} must be a finite number", **inputs)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            fail(OP, "attn_mask must be a tensor or None", **inputs)
        if attn_mask.device != q.device:
            fail(OP, f"attn_mask is on {attn_mask.device} but q is on {q.device}", **inputs)
        if not (attn_mask.is_floating_point() or attn_mask.dtype == torch.bool):
            fail(OP, f"attn_mask must be an additive float mask or a boolean mask, not {attn_mask.dtype}", **inputs)
        full = (q.shape[0], heads, q.shape[1], k.shape[1]) if heads else (*q.shape[:3], k.shape[2])
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            fail(OP, f"attn_mask must broadcast to (B, H, N, Nk) = {full}", **inputs)


def _slice_span(t: torch.Tensor, heads: int) -> int:
    """The largest element offset within one (batch, head) slice of t seen as (B, H, tokens, d) (no view made:
    this runs on every call)."""
    if heads:
        _, n, c = t.shape
        _, s_n, s_c = t.stride()
        return (n - 1) * s_n + (c // heads - 1) * s_c
    return (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)


def _kernel_why_not(q, k, v, scale, attn_mask, heads):
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not one of fp16, bf16, fp32"
    d = head_dim(q, heads)
    if d not in KERNEL_HEAD_DIMS:
        return f"head dim {d} is not one of {', '.join(map(str, KERNEL_HEAD_DIMS))}"
    if q.is_cuda and d in GPU_UNSAFE_HEAD_DIMS:
        return f"head dim {d} is listed in SDKERNELS_GPU_UNSAFE_HEAD_DIMS"
    if head_dim(v, heads) != d:
        return f"v's head dim {head_dim(v, heads)} differs from q's {d}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty tensor"
    if not scale > 0:
        return f"scale={scale} is not positive (the kernels scale a row's max, which only a positive scale keeps)"
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        return "boolean attn_mask (pass an additive float mask)"
    if q.shape[0] * (heads or q.shape[1]) > 65535:
        return "more than 65535 (batch, head) pairs (one grid dimension)"
    # The kernels index within one (batch, head) slice with 32-bit offsets.
    spans = [_slice_span(t, heads) for t in (q, k, v)]
    if attn_mask is not None:
        spans.append(_slice_span(broadcast_mask(attn_mask, as_bhnd(q, heads), as_bhnd(k, heads)), 0))
    if max(spans) >= 2**31:
        return "a (batch, head) slice spans more than 2**31 elements"
    return None


# ---- Triton backends ------------------------------------------------------------------------------------------

def _triton_why_not(q, k, v, scale, attn_mask, heads):
    return triton_device_why_not(q, k, v, attn_mask) or _kernel_why_not(q, k, v, scale, attn_mask, heads)


def _run_on_views(kernel, q, k, v, scale, attn_mask, heads, **kwargs):
    out = output_like(q, v, heads)
    q4, k4, v4, o4 = as_bhnd(q, heads), as_bhnd(k, heads), as_bhnd(v, heads), as_bhnd(out, heads)
    kernel(q4, k4, v4, o4, float(scale), broadcast_mask(attn_mask, q4, k4), **kwargs)
    return out


def _flash_run(q, k, v, scale, attn_mask, heads):
    return _run_on_views(kernels("flash_attention").flash_attention_triton, q, k, v, scale, attn_mask, heads)


def _partial_softmax_run(q, k, v, scale, attn_mask, heads):
    launch = kernels("partial_softmax").partial_softmax_attention_triton
    return _run_on_views(launch, q, k, v, scale, attn_mask, heads)


# ---- partial softmax with the row statistics in CUDA C++ ------------------------------------------------------

def _cuda_stats_available():
    reason = _ext.unavailable_reason()
    if reason is None and not hasattr(_ext.load(), "attention_row_stats"):
        return "the CUDA extension was built without attention_row_stats"
    return reason


def _cuda_stats_why_not(q, k, v, scale, attn_mask, heads):
    if q.device.type != "cuda":
        return f"tensor on {q.device.type}, not CUDA"
    if attn_mask is not None and attn_mask.dtype != q.dtype:
        return f"attn_mask dtype {attn_mask.dtype} differs from q's {q.dtype} (the CUDA kernel reads one dtype)"
    return _kernel_why_not(q, k, v, scale, attn_mask, heads)


# Query rows per block of csrc/attention_row_stats.cu: kMmaRows (fp16, bf16 on sm_80+), kRows (fp32).
CUDA_STATS_ROWS_PER_BLOCK = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 8}
CUDA_STATS_KEYS_PER_SPLIT = 64  # fewest keys worth a split of their own


def cuda_row_stats(q4, k4, scale, mask4, splits=None):
    """Row statistics (B*H, N, 2) = (max, sum of exp(S - max)) of S = scale * q k^T + mask, from the CUDA kernel;
    ``splits`` parts of the key range per row (default: enough blocks to fill the GPU)."""
    B, H, N, _ = q4.shape
    Nk = k4.shape[2]
    if splits is None:
        blocks = -(-N // CUDA_STATS_ROWS_PER_BLOCK[q4.dtype]) * B * H
        splits = kernels("partial_softmax").choose_splits(blocks, -(-Nk // CUDA_STATS_KEYS_PER_SPLIT), q4.device)
    partials = torch.empty((splits, B * H, N, 2), device=q4.device, dtype=torch.float32)
    stats = torch.empty((B * H, N, 2), device=q4.device, dtype=torch.float32)
    _ext.load().attention_row_stats(q4, k4, mask4, partials, stats, float(scale))
    return stats


def _partial_softmax_cuda_run(q, k, v, scale, attn_mask, heads):
    launch = kernels("partial_softmax").partial_softmax_attention_triton
    return _run_on_views(launch, q, k, v, scale, attn_mask, heads, row_stats=cuda_row_stats)


attention_dispatch = dispatch.define(OP, attention_reference, check=check_inputs)
attention_dispatch.register(dispatch.Backend("flash", _flash_run, _triton_why_not, available=triton_available))
attention_dispatch.register(dispatch.Backend("partial_softmax", _partial_softmax_run, _triton_why_not,
                                             available=triton_available))
attention_dispatch.register(dispatch.Backend("partial_softmax_cuda", _partial_softmax_cuda_run, _cuda_stats_why_not,
                                             available=_cuda_stats_available))
attention_dispatch.reference = _sdpa_fallback

# ---- the torch op ---------------------------------------------------------------------------------------------

@torch.library.custom_op("sdkernels::flash_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_mask: Optional[torch.Tensor],
                  heads: int) -> torch.Tensor:
    return attention_dispatch(q, k, v, scale, attn_mask, heads)


@_attention_op.register_fake
def _(q, k, v, scale, attn_mask, heads):
    check_inputs(q, k, v, scale, attn_mask, heads)
    return output_like(q, v, heads)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    attn_mask: Optional[torch.Tensor] = None, heads: Optional[int] = None) -> torch.Tensor:
    """softmax(scale * q k^T + attn_mask) v; ``scale`` defaults to head_dim ** -0.5. Pass ``heads`` for
    diffusers' (B, tokens, heads * head_dim) layout; without it q, k, v are (B, heads, tokens, head_dim)."""
    heads = int(heads or 0)
    if type(scale) is not float:  # checked as given, then converted (the op checks that)
        check_inputs(q, k, v, 1.0 if scale is None else scale, attn_mask, heads)
        scale = float(head_dim(q, heads) ** -0.5 if scale is None else scale)
    return call_op(attention_dispatch, q, k, v, scale, attn_mask, heads)
