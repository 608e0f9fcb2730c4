"""The GELU family: sdkernels::gelu, sdkernels::geglu and sdkernels::linear_geglu.

    gelu(x, approximate)                     = F.gelu(x, approximate=approximate)
    geglu(h, approximate)                    = a * gelu(g, approximate)   with a, g = h.chunk(2, dim=-1)
    linear_geglu(x, weight, bias, approximate) = geglu(F.linear(x, weight, bias), approximate)

as diffusers' GELU and GEGLU modules compute them (GEGLU: value half first, exact erf GELU on the gate half).
``approximate`` is "none" (erf) or "tanh". Math is fp32 whatever the input dtype, rounded once to the input's
dtype; linear_geglu accumulates its matmul in fp32. gelu's output keeps x's layout; geglu's and linear_geglu's
are contiguous.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch, tuning
from ._common import (KERNEL_DTYPES, call_op, fail, kernels, layout_cached, new_output, triton_available,
                      triton_device_why_not)

APPROXIMATIONS = ("none", "tanh")
MAX_ROW_DIMS = 3       # leading dims the elementwise kernel indexes after merging; more take the reference
INT32_MAX = 2**31 - 1


# ---- references: the specification --------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gelu_reference(x, approximate="none"):
    return F.gelu(x.to(_compute_dtype(x.dtype)), approximate=approximate).to(x.dtype)


def geglu_reference(h, approximate="none"):
    a, g = h.to(_compute_dtype(h.dtype)).chunk(2, dim=-1)
    return (a * F.gelu(g, approximate=approximate)).to(h.dtype)


def linear_geglu_reference(x, weight, bias=None, approximate="none"):
    compute = _compute_dtype(x.dtype)
    h = F.linear(x.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    return geglu_reference(h, approximate).to(x.dtype)


# ---- input checks ---------------------------------------------------------------------------------------------

def _check_approximate(op, approximate, inputs):
    if approximate not in APPROXIMATIONS:
        fail(op, f"approximate={approximate!r} must be one of {APPROXIMATIONS}", **inputs)


def _check_float_tensor(op, name, t, inputs):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a tensor", **inputs)
    if not t.is_floating_point():
        fail(op, f"{name} must be floating point, not {t.dtype}", **inputs)


def check_gelu_inputs(x, approximate) -> None:
    inputs = dict(x=x, approximate=approximate)
    _check_float_tensor("gelu", "x", x, inputs)
    _check_approximate("gelu", approximate, inputs)


def check_geglu_inputs(h, approximate) -> None:
    inputs = dict(h=h, approximate=approximate)
    _check_float_tensor("geglu", "h", h, inputs)
    if h.dim() < 1 or h.shape[-1] % 2 != 0:
        fail("geglu", "h's last dim must have an even size (value half, then gate half)", **inputs)
    _check_approximate("geglu", approximate, inputs)


def check_linear_geglu_inputs(x, weight, bias, approximate) -> None:
    op = "linear_geglu"
    inputs = dict(x=x, weight=weight, bias=bias, approximate=approximate)
    _check_float_tensor(op, "x", x, inputs)
    _check_float_tensor(op, "weight", weight, inputs)
    if x.dim() < 1:
        fail(op, "x must have at least one dim (..., K)", **inputs)
    if weight.dim() != 2 or weight.shape[0] % 2 != 0 or weight.shape[1] != x.shape[-1]:
        fail(op, f"weight must be (2 * inner, K) with K = x.shape[-1] = {x.shape[-1]}, as nn.Linear stores it",
             **inputs)
    tensors = [("weight", weight)]
    if bias is not None:
        _check_float_tensor(op, "bias", bias, inputs)
        if bias.shape != (weight.shape[0],):
            fail(op, f"bias must have shape ({weight.shape[0]},), one value per row of weight", **inputs)
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != x.device:
            fail(op, f"{name} is on {t.device} but x is on {x.device}", **inputs)
        if t.dtype != x.dtype:
            fail(op, f"{name} has dtype {t.dtype} but x has {x.dtype} (as F.linear, one dtype)", **inputs)
    _check_approximate(op, approximate, inputs)


# ---- layouts --------------------------------------------------------------------------------------------------

def row_layout(lead_shape, *stride_lists):
    """The leading dims ``lead_shape`` (the row dims of tensors whose last dim is the column), merged wherever
    every tensor's strides allow, padded in front to MAX_ROW_DIMS: ((R0, R1, R2), [(s0, s1, s2) per tensor]);
    None when more than MAX_ROW_DIMS dims remain."""
    merged = []
    for dim, n in enumerate(lead_shape):
        if n == 1:
            continue
        strides = [s[dim] for s in stride_lists]
        if merged and all(prev == cur * n for prev, cur in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * n, strides)
        else:
            merged.append((n, strides))
    if len(merged) > MAX_ROW_DIMS:
        return None
    merged = [(1, [0] * len(stride_lists))] * (MAX_ROW_DIMS - len(merged)) + merged
    sizes = tuple(n for n, _ in merged)
    return sizes, [tuple(s[i] for _, s in merged) for i in range(len(stride_lists))]


def is_dense(shape, stride) -> bool:
    """The elements fill one block of memory without gaps or overlaps, in any dim order."""
    expected = 1
    for stride, n in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if stride != expected:
            return False
        expected *= n
    return True


def contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ---- triton backends ------------------------------------------------------------------------------------------

def _common_why_not(*tensors):
    reason = triton_device_why_not(*tensors)
    if reason:
        return reason
    if tensors[0].dtype not in KERNEL_DTYPES:
        return f"dtype {tensors[0].dtype} is not one of fp16, bf16, fp32"
    if any(t.numel() == 0 for t in tensors):
        return "empty tensor"
    return None


# The plans are functions of (shape, stride), remembered per layout (layout_cached): a model meets few.

@layout_cached
def _output_strides(shape, stride) -> tuple:
    """The strides new_output (torch.empty_like) gives an input of this layout: its own where it is dense."""
    if is_dense(shape, stride):
        return stride
    return torch.empty_like(torch.empty_strided(shape, stride, device="meta")).stride()


@layout_cached
def _gelu_plan(shape, stride, out_strides):
    """(rows, cols, row_sizes, in_strides, out_strides) for the elementwise kernel on an input and an output of
    these layouts, or a reason string."""
    if is_dense(shape, stride) and stride == out_strides:
        # One block of memory, in the same order in both: run over it flat.
        if math.prod(shape) > INT32_MAX:
            return "more than 2**31 elements in one flat block"
        return 1, math.prod(shape), (1, 1, 1), (0, 0, 0), (0, 0, 0)
    cols = shape[-1]
    if cols != 1 and (stride[-1] != 1 or out_strides[-1] != 1):
        return "the last dim is not contiguous (stride != 1)"
    layout = row_layout(shape[:-1], stride[:-1], out_strides[:-1])
    if layout is None:
        return f"the leading dims do not merge into {MAX_ROW_DIMS} strided dims"
    sizes, (s_in, s_out) = layout
    return math.prod(shape) // cols, cols, sizes, s_in, s_out


def _gelu_triton_why_not(x, approximate):
    reason = _common_why_not(x)
    if reason is None:
        shape, stride = x.shape, x.stride()
        plan = _gelu_plan(shape, stride, _output_strides(shape, stride))
        reason = plan if isinstance(plan, str) else None
    return reason


def _gelu_triton_run(x, approximate):
    out = new_output(x)
    rows, cols, sizes, s_in, s_out = _gelu_plan(x.shape, x.stride(), out.stride())
    return kernels("geglu").gelu_rows_triton(x, out, rows, cols, sizes, s_in, s_out, gated=False,
                                             approximate_tanh=approximate == "tanh")


@layout_cached
def _geglu_plan(shape, stride):
    """(rows, inner, row_sizes, in_strides, out_strides, out_shape) for the gated kernel on an input of this
    layout and a contiguous output, or a reason string."""
    inner = shape[-1] // 2
    if stride[-1] != 1:
        return "h's last dim is not contiguous (stride != 1)"
    if inner > INT32_MAX // 2:
        return "last dim too long"
    out_shape = tuple(shape[:-1]) + (inner,)
    layout = row_layout(shape[:-1], stride[:-1], contiguous_strides(out_shape)[:-1])
    if layout is None:
        return f"h's leading dims do not merge into {MAX_ROW_DIMS} strided dims"
    sizes, (s_in, s_out) = layout
    return math.prod(shape) // (2 * inner), inner, sizes, s_in, s_out, out_shape


def _geglu_triton_why_not(h, approximate):
    reason = _common_why_not(h)
    if reason is None:
        plan = _geglu_plan(h.shape, h.stride())
        reason = plan if isinstance(plan, str) else None
    return reason


def _geglu_triton_run(h, approximate):
    rows, inner, sizes, s_in, s_out, out_shape = _geglu_plan(h.shape, h.stride())
    out = new_output(h, out_shape)
    return kernels("geglu").gelu_rows_triton(h, out, rows, inner, sizes, s_in, s_out, gated=True,
                                             approximate_tanh=approximate == "tanh")


@layout_cached
def _linear_geglu_rows(shape, stride):
    """(M, row stride, leading dims) of an x of this layout seen as (M, K), or None where its leading dims are not
    one stride apart."""
    layout = row_layout(shape[:-1], stride[:-1])
    if layout is None or layout[0][0] != 1 or layout[0][1] != 1:
        return None
    return layout[0][2], layout[1][0][2], tuple(shape[:-1])


def _linear_geglu_triton_why_not(x, weight, bias, approximate):
    reason = _common_why_not(x, weight, *([] if bias is None else [bias]))
    if reason:
        return reason
    if weight.numel() > INT32_MAX:
        return "weight has more than 2**31 elements"
    if _linear_geglu_rows(x.shape, x.stride()) is None:
        return "x's leading dims are not one stride apart (a view that needs a copy to flatten)"
    return None


def _linear_geglu_triton_run(x, weight, bias, approximate):
    M, row_stride, lead = _linear_geglu_rows(x.shape, x.stride())
    K = x.shape[-1]
    x2d = x.as_strided((M, K), (row_stride, x.stride(-1)))
    N = weight.shape[0] // 2
    out = new_output(x, lead + (N,))
    kernels("linear_geglu").linear_geglu_triton(x2d, weight, bias, out.view(M, N),
                                              approximate_tanh=approximate == "tanh")
    return out


def _linear_geglu_cublas_why_not(x, weight, bias, approximate):
    if (_reduced_precision_reductions(x.dtype) and tuning.objective() != "device"
            and _linear_geglu_triton_why_not(x, weight, bias, approximate) is None):
        return ("the fused kernel takes these inputs, and torch lets cuBLAS reduce in reduced precision: switching "
                "that off per call makes every later cuBLAS call slower on the host (CUDA-graph replays, where only "
                "GPU time counts, may take this backend)")
    reason = _common_why_not(x, weight, *([] if bias is None else [bias]))
    if reason is None:  # the geglu kernel's view of F.linear's contiguous output
        shape = tuple(x.shape[:-1]) + (weight.shape[0],)
        plan = _geglu_plan(shape, contiguous_strides(shape))
        reason = plan if isinstance(plan, str) else None
    return reason


def _linear_geglu_cublas_run(x, weight, bias, approximate):
    """cuBLAS's F.linear, then the geglu kernel on its (…, 2N) output. The projection is written and read back,
    but when it fits in L2 the read costs little and cuBLAS's GEMM outruns the fused Triton one (H200, M = 512,
    K = 1280, N = 2 x 5120: torch.compile's F.linear + fused GEGLU took 33.8 us, the fused kernel 37.3 us).
    cuBLAS accumulates in fp32 here: torch lets it reduce split-K partials in fp16/bf16 by default, which put
    errors of several units in the last place on the projection at SD sizes (an H200, bf16)."""
    with fp32_reductions():
        projection = F.linear(x, weight, bias)
    return _geglu_triton_run(projection, approximate)


def _reduced_precision_reductions(dtype: torch.dtype) -> bool:
    """Whether torch lets cuBLAS reduce split-K partials of this dtype's GEMMs in that dtype (its default)."""
    matmul = torch.backends.cuda.matmul
    if dtype == torch.float16:
        return matmul.allow_fp16_reduced_precision_reduction
    return dtype == torch.bfloat16 and matmul.allow_bf16_reduced_precision_reduction


@contextlib.contextmanager
def fp32_reductions():
    """cuBLAS's fp16/bf16 GEMMs reduce their split-K partials in fp32 inside (torch's reduced-precision reduction
    flags off), then the flags as they were. Setting them costs the host time of every cuBLAS call after it (an
    H200 with torch 2.11: an unpatched SD1.5 model's step took 24.6 ms of host time, 33.3 ms when timed in
    alternation with a model that switched 16 times per step; one run each), so the cublas backend runs only where
    they are off already or under CUDA graphs."""
    matmul = torch.backends.cuda.matmul
    previous = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    if not any(previous):
        yield
        return
    matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = previous


def _reference_keeping_layout(x, approximate):
    out = new_output(x)
    out.copy_(gelu_reference(x, approximate))
    return out


def _contiguous(reference):
    return lambda *args: reference(*args).contiguous()


gelu_dispatch = dispatch.define("gelu", _reference_keeping_layout, check=check_gelu_inputs)
gelu_dispatch.register(dispatch.Backend("triton", _gelu_triton_run, _gelu_triton_why_not,
                                        available=triton_available))
geglu_dispatch = dispatch.define("geglu", _contiguous(geglu_reference), check=check_geglu_inputs)
geglu_dispatch.register(dispatch.Backend("triton", _geglu_triton_run, _geglu_triton_why_not,
                                         available=triton_available))
def _cublas_scope():
    """What _linear_geglu_cublas_why_not reads besides the inputs."""
    matmul = torch.backends.cuda.matmul
    return (tuning.objective(), matmul.allow_fp16_reduced_precision_reduction,
            matmul.allow_bf16_reduced_precision_reduction)


linear_geglu_dispatch = dispatch.define("linear_geglu", _contiguous(linear_geglu_reference), scope=_cublas_scope,
                                        check=check_linear_geglu_inputs)
linear_geglu_dispatch.register(dispatch.Backend("triton", _linear_geglu_triton_run, _linear_geglu_triton_why_not,
                                                available=triton_available))
# Second in priority: the fused kernel runs unless measurement (sdkernels.tuning, patch(tune=True)) finds this faster.
linear_geglu_dispatch.register(dispatch.Backend("cublas", _linear_geglu_cublas_run, _linear_geglu_cublas_why_not,
                                                available=triton_available))


# ---- the torch ops --------------------------------------------------------------------------------------------

@torch.library.custom_op("sdkernels::gelu", mutates_args=())
def _gelu_op(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return gelu_dispatch(x, approximate)


@_gelu_op.register_fake
def _(x, approximate):
    check_gelu_inputs(x, approximate)
    return torch.empty_like(x)


@torch.library.custom_op("sdkernels::geglu", mutates_args=())
def _geglu_op(h: torch.Tensor, approximate: str) -> torch.Tensor:
    return geglu_dispatch(h, approximate)


@_geglu_op.register_fake
def _(h, approximate):
    check_geglu_inputs(h, approximate)
    return h.new_empty(h.shape[:-1] + (h.shape[-1] // 2,))


@torch.library.custom_op("sdkernels::linear_geglu", mutates_args=())
def _linear_geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     approximate: str) -> torch.Tensor:
    return linear_geglu_dispatch(x, weight, bias, approximate)


@_linear_geglu_op.register_fake
def _(x, weight, bias, approximate):
    check_linear_geglu_inputs(x, weight, bias, approximate)
    return x.new_empty(x.shape[:-1] + (weight.shape[0] // 2,))


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(x, approximate) with fp32 math; the output keeps x's layout."""
    return call_op(gelu_dispatch, x, approximate)


def geglu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """a * gelu(g) with a, g = h.chunk(2, -1), as diffusers' GEGLU after its projection."""
    return call_op(geglu_dispatch, h, approximate)


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 approximate: str = "none") -> torch.Tensor:
    """geglu(F.linear(x, weight, bias)) in one matmul whose epilogue applies the gate; weight is (2 * inner, K)."""
    return call_op(linear_geglu_dispatch, x, weight, bias, approximate)
