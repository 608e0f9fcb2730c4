"""sdkernels::group_norm: F.group_norm, then optionally SiLU, then optionally + residual, in one op.

    out = [silu](group_norm(x [+ shift], num_groups, weight, bias, eps)) [+ residual]

x is (N, C, *spatial) with 1 to 3 spatial dims; statistics are fp32 whatever the input dtype; the output has x's
dtype and memory layout (channels_last in, channels_last out). ``shift`` is an optional (N, C) tensor added to x per
sample and channel before normalizing, in fp32 (no rounding of the sum): the bias and time embedding that
diffusers' ResnetBlock2D adds to conv1's output before norm2, without a pass of its own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, dispatch
from ._common import (KERNEL_DTYPES, call_op, channels_last_like, fail, is_channels_last_like, kernels, layout_cached,
                      new_output, nsc_strides, nsc_strides_of, triton_available, triton_device_why_not)

OP = "group_norm"


def compute_dtype(x) -> torch.dtype:
    """The dtype the references compute in: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_norm_stats_reference(x, num_groups, eps=1e-5):
    """(N, G, 2) (mean, rstd) of x's groups, two-pass, in compute_dtype(x)."""
    groups = x.to(compute_dtype(x)).reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(dim=2)
    var = (groups - mean[..., None]).square().mean(dim=2)
    return torch.stack([mean, torch.rsqrt(var + eps)], dim=-1)


def normalize_reference(x, stats, weight=None, bias=None):
    """(x - mean) * rstd per (sample, group) of the given (N, G, 2) statistics, then the affine, in stats' dtype."""
    N, C = x.shape[:2]
    mean, rstd = stats[..., :1], stats[..., 1:]
    y = ((x.to(stats.dtype).reshape(N, stats.shape[1], -1) - mean) * rstd).reshape(x.shape)
    channel = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(stats.dtype).reshape(channel)
    if bias is not None:
        y = y + bias.to(stats.dtype).reshape(channel)
    return y


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, residual=None, shift=None):
    """The specification, in eager PyTorch: fp32 math for fp16/bf16 inputs (fp64 for fp64), x's dtype out.
    Written out rather than F.group_norm, which refuses groups of one element."""
    xs = x
    if shift is not None:
        xs = x.to(compute_dtype(x)) + shift.to(compute_dtype(x)).reshape(*shift.shape, *([1] * (x.dim() - 2)))
    y = normalize_reference(xs, group_norm_stats_reference(xs, num_groups, eps), weight, bias)
    if silu:
        y = F.silu(y)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y.to(x.dtype)


def check_inputs(x, num_groups, weight, bias, eps, silu, residual, shift=None, op=OP) -> None:
    inputs = dict(x=x, weight=weight, bias=bias, residual=residual)
    if shift is not None:
        inputs["shift"] = shift
    if not isinstance(x, torch.Tensor):
        fail(op, "x must be a tensor", **inputs)
    if x.dim() < 3 or x.dim() > 5:
        fail(op, f"x must be (N, C, *spatial) with 1 to 3 spatial dims, not rank {x.dim()}", **inputs)
    if not x.is_floating_point():
        fail(op, f"x must be floating point, not {x.dtype}", **inputs)
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        fail(op, f"num_groups={num_groups!r} must be a positive integer that divides the {C} channels", **inputs)
    if not eps >= 0:
        fail(op, f"eps={eps!r} must be non-negative", **inputs)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (C,):
            fail(op, f"{name} must have shape ({C},) for {C} channels", **inputs)
        if t.device != x.device:
            fail(op, f"{name} is on {t.device} but x is on {x.device}", **inputs)
        if not t.is_floating_point():
            fail(op, f"{name} must be floating point", **inputs)
    if residual is not None:
        if residual.shape != x.shape:
            fail(op, "residual must have x's shape", **inputs)
        if residual.device != x.device:
            fail(op, f"residual is on {residual.device} but x is on {x.device}", **inputs)
        if not residual.is_floating_point():
            fail(op, "residual must be floating point", **inputs)
    if shift is not None:
        if not isinstance(shift, torch.Tensor) or tuple(shift.shape) != (x.shape[0], C):
            fail(op, f"shift must be an (N, C) = ({x.shape[0]}, {C}) tensor", **inputs)
        if shift.device != x.device:
            fail(op, f"shift is on {shift.device} but x is on {x.device}", **inputs)
        if not shift.is_floating_point():
            fail(op, "shift must be floating point", **inputs)


def _layout(x, residual):
    """(x's and residual's strides as (sN, sC, sS), whether channels vary fastest), or a reason string."""
    return _layout_of(x.shape, x.stride(), None if residual is None else residual.stride())


@layout_cached
def _layout_of(shape, x_stride, residual_stride):
    sx = nsc_strides_of(shape, x_stride)
    if sx is None:
        return "x's spatial dims are not one stride apart (a strided view); the kernel needs them flat"
    sr = sx if residual_stride is None else nsc_strides_of(shape, residual_stride)
    if sr is None:
        return "residual's spatial dims are not one stride apart"
    return sx, sr, channels_last_like(shape, sx)


def _kernel_why_not(x, num_groups, weight, bias, eps, silu, residual, shift=None):
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of fp16, bf16, fp32"
    if x.numel() == 0:
        return "empty tensor"
    if x.numel() >= 2**31:
        return "more than 2**31 elements"
    layout = _layout(x, residual)
    return layout if isinstance(layout, str) else None


# ---- triton backend -------------------------------------------------------------------------------------------

def _triton_why_not(x, num_groups, weight, bias, eps, silu, residual, shift=None):
    return triton_device_why_not(x) or _kernel_why_not(x, num_groups, weight, bias, eps, silu, residual)


def _triton_run(x, num_groups, weight, bias, eps, silu, residual, shift=None):
    out = new_output(x)
    sx, sr, channels_last = _layout(x, residual)
    strides = ((sx, sr, nsc_strides(out)), channels_last)
    return kernels("group_norm").group_norm_triton(x, num_groups, weight, bias, float(eps), silu, residual, out,
                                                   strides, shift)


# ---- CUDA C++ backend (channels_last, 16-byte vectors) -------------------------------------------------------

def _cuda_why_not(x, num_groups, weight, bias, eps, silu, residual, shift=None):
    if x.device.type != "cuda":
        return f"tensor on {x.device.type}, not CUDA"
    reason = _kernel_why_not(x, num_groups, weight, bias, eps, silu, residual)
    if reason:
        return reason
    if not is_channels_last_like(x) or nsc_strides(x)[2] != x.shape[1]:
        return "x is not dense channels_last (the CUDA kernel reads whole NHWC rows)"
    if residual is not None and residual.stride() != x.stride():
        return "residual's layout differs from x's"
    C = x.shape[1]
    vec = 16 // x.element_size()
    if C % vec or x.data_ptr() % 16 or (residual is not None and residual.data_ptr() % 16):
        return f"channels ({C}) not a multiple of {vec} or data not 16-byte aligned"
    for t in (weight, bias):
        if t is not None and not t.is_contiguous():
            return "weight/bias not contiguous"
    if shift is not None and C > 1 and shift.stride(1) != 1:
        return "shift's channels are not contiguous"
    return None


def _cuda_run(x, num_groups, weight, bias, eps, silu, residual, shift=None):
    out = new_output(x)
    _ext.load().group_norm_nhwc(x, weight, bias, residual, out, num_groups, float(eps), bool(silu), shift)
    return out


group_norm_dispatch = dispatch.define(OP, group_norm_reference, check=check_inputs)
group_norm_dispatch.register(dispatch.Backend("cuda", _cuda_run, _cuda_why_not, available=_ext.unavailable_reason))
group_norm_dispatch.register(dispatch.Backend("triton", _triton_run, _triton_why_not, available=triton_available))

def cuda_one_kernel(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, residual=None, shift=None) -> bool:
    """Whether the CUDA backend runs these inputs in one kernel (csrc/group_norm_nhwc_cluster.cu: a thread block
    cluster per channel slice of a sample, sm_90+) rather than its two."""
    if x.device.type != "cuda" or _ext.unavailable_reason() or _cuda_why_not(x, num_groups, weight, bias, eps, silu,
                                                                              residual, shift):
        return False
    try:
        _ext.load().group_norm_nhwc_cluster_why_not(x, num_groups)  # raises the reason where it does not apply
    except RuntimeError:
        return False
    return True


def _prefer_triton_for_one_program_per_group(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False,
                                             residual=None, shift=None):
    """Triton where its launcher runs one program per group (kernels/group_norm.py: choose_plan), else the priority
    order (CUDA first where it can run). Measured on an H200 (scripts/probe_gn_plans.py, fp16 channels_last, per call
    in a CUDA graph): the one-program plans beat the CUDA kernels at small groups (2x1280x16x16: 5.4 against 7.3 us;
    2x1280x8x8: 3.3 against 7.5; session 27, the one-kernel CUDA plan too: 2x320x32x32 6.0 against 7.7,
    2x1280x8x8 2.5 against 6.9), and the plans that split a group lost to them (2x1280x32x32: 18.1 against 12.2)."""
    layout = _layout(x, residual)
    if isinstance(layout, str) or triton_available() or x.dim() < 2 or x.numel() == 0:
        return None
    sx, sr, channels_last = layout
    if num_groups <= 0 or x.shape[1] % num_groups:
        return None
    k = kernels("group_norm")
    plan = k.plan_for(x.shape, num_groups, (sx, sr, sx), channels_last)  # the output takes x's layout
    return "triton" if plan in k.ONE_PROGRAM_PLANS else None


group_norm_dispatch.chooser = _prefer_triton_for_one_program_per_group


def _reference_into_layout(x, *args):
    out = new_output(x)
    out.copy_(group_norm_reference(x, *args))
    return out


group_norm_dispatch.reference = _reference_into_layout


# ---- the torch op ---------------------------------------------------------------------------------------------

@torch.library.custom_op("sdkernels::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, silu: bool, residual: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    return group_norm_dispatch(x, num_groups, weight, bias, eps, silu, residual, shift)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, residual, shift=None):
    check_inputs(x, num_groups, weight, bias, eps, silu, residual, shift)
    return new_output(x)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, silu: bool = False,
               residual: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GroupNorm of x (+ the (N, C) ``shift``), then SiLU if ``silu``, then ``+ residual`` if given; see the module
    docstring."""
    if type(eps) is not float or type(silu) is not bool:  # checked as given, then converted (the op checks those)
        check_inputs(x, num_groups, weight, bias, eps, silu, residual, shift)
        eps, silu = float(eps), bool(silu)
    return call_op(group_norm_dispatch, x, num_groups, weight, bias, eps, silu, residual, shift)


# ---- sdkernels::group_norm_stats: the statistics alone, for a consumer that normalizes as it loads --------------

STATS_OP = "group_norm_stats"


def _stats_triton_why_not(x, num_groups, eps):
    return _triton_why_not(x, num_groups, None, None, eps, False, None)


def _stats_triton_run(x, num_groups, eps):
    sx, _, channels_last = _layout(x, None)
    stats = kernels("group_norm").group_norm_stats_triton(x, num_groups, float(eps), (sx, channels_last))
    return stats.view(x.shape[0], num_groups, 2)


def check_stats_inputs(x, num_groups, eps) -> None:
    check_inputs(x, num_groups, None, None, eps, False, None, op=STATS_OP)


group_norm_stats_dispatch = dispatch.define(STATS_OP, group_norm_stats_reference, check=check_stats_inputs)
group_norm_stats_dispatch.register(dispatch.Backend("triton", _stats_triton_run, _stats_triton_why_not,
                                                    available=triton_available))


@torch.library.custom_op("sdkernels::group_norm_stats", mutates_args=())
def _group_norm_stats_op(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    return group_norm_stats_dispatch(x, num_groups, eps)


@_group_norm_stats_op.register_fake
def _(x, num_groups, eps):
    check_inputs(x, num_groups, None, None, eps, False, None, op=STATS_OP)
    return x.new_empty((x.shape[0], num_groups, 2), dtype=compute_dtype(x))


def group_norm_stats(x: torch.Tensor, num_groups: int, eps: float = 1e-5) -> torch.Tensor:
    """(N, G, 2) (mean, rstd = 1 / sqrt(var + eps)) of x's groups, fp32 (fp64 for fp64 x): what group_norm
    normalizes with, for an op that applies it as it loads x (sdkernels::conv3x3_fused's prologue)."""
    if type(eps) is not float:
        check_stats_inputs(x, num_groups, eps)
        eps = float(eps)
    return call_op(group_norm_stats_dispatch, x, num_groups, eps)


# ---- sdkernels::group_norm_apply: normalize with statistics taken elsewhere --------------------------------------

APPLY_OP = "group_norm_apply"


def group_norm_apply_reference(x, stats, weight=None, bias=None, silu=False):
    """[silu]((x - mean) * rstd * weight + bias) with the given (N, G, 2) statistics, in stats' dtype; x's dtype
    out."""
    y = normalize_reference(x, stats, weight, bias)
    return (F.silu(y) if silu else y).to(x.dtype)


def check_apply_inputs(x, stats, weight, bias, silu) -> None:
    if not isinstance(stats, torch.Tensor) or stats.dim() != 3:
        fail(APPLY_OP, "stats must be an (N, G, 2) tensor of (mean, rstd)", x=x, stats=stats)
    groups = stats.shape[1]
    # A symbolic group count (torch.compile's dynamic shapes) is checked when real tensors arrive.
    check_inputs(x, groups if isinstance(groups, int) else 1, weight, bias, 0.0, silu, None, None, op=APPLY_OP)
    if stats.shape[0] != x.shape[0] or stats.shape[2] != 2:
        fail(APPLY_OP, "stats must be (N, G, 2) (mean, rstd) per sample and group", x=x, stats=stats)
    if stats.dtype != compute_dtype(x):
        fail(APPLY_OP, f"stats must be {compute_dtype(x)} for x of {x.dtype}", x=x, stats=stats)
    if stats.device != x.device:
        fail(APPLY_OP, f"stats is on {stats.device} but x is on {x.device}", x=x, stats=stats)


def _apply_why_not(x, stats, weight, bias, silu):
    return (triton_device_why_not(x) or _kernel_why_not(x, stats.shape[1], weight, bias, 0.0, silu, None)
            or (None if stats.is_contiguous() else "stats not contiguous"))


def _apply_run(x, stats, weight, bias, silu):
    out = new_output(x)
    sx, _, channels_last = _layout(x, None)
    return kernels("group_norm").group_norm_apply_triton(x, stats, weight, bias, silu, out,
                                                         ((sx, nsc_strides(out)), channels_last))


def _apply_reference_into_layout(x, stats, weight, bias, silu):
    out = new_output(x)
    out.copy_(group_norm_apply_reference(x, stats, weight, bias, silu))
    return out


group_norm_apply_dispatch = dispatch.define(APPLY_OP, group_norm_apply_reference, check=check_apply_inputs)
group_norm_apply_dispatch.register(dispatch.Backend("triton", _apply_run, _apply_why_not, available=triton_available))
group_norm_apply_dispatch.reference = _apply_reference_into_layout


@torch.library.custom_op("sdkernels::group_norm_apply", mutates_args=())
def _group_norm_apply_op(x: torch.Tensor, stats: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    return group_norm_apply_dispatch(x, stats, weight, bias, silu)


@_group_norm_apply_op.register_fake
def _(x, stats, weight, bias, silu):
    check_apply_inputs(x, stats, weight, bias, silu)
    return new_output(x)


def group_norm_apply(x: torch.Tensor, stats: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, silu: bool = False) -> torch.Tensor:
    """GroupNorm's normalization with given (N, G, 2) fp32 (mean, rstd) statistics (sdkernels.group_norm_stats of
    this x or of a tensor x is a slice of), then the affine, then SiLU if ``silu``: x's dtype and layout out."""
    if type(silu) is not bool:
        check_apply_inputs(x, stats, weight, bias, silu)
        silu = bool(silu)
    return call_op(group_norm_apply_dispatch, x, stats, weight, bias, silu)
