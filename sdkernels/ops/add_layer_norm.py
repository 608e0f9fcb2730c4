"""sdkernels::add_layer_norm: a residual add and the LayerNorm of the sum, in one pass.

    total  = x + residual                                  (x's dtype: exactly eager's add)
    normed = layer_norm(total, (C,), weight, bias, eps)    (statistics from the rounded total, in fp32; x's dtype out)

x and residual are (..., C) with at least 2 dims, one floating dtype and device; weight and bias are optional (C,)
tensors of that dtype. Both outputs are fresh contiguous tensors. diffusers' BasicTransformerBlock runs
``hidden = attn_output + hidden; norm_hidden = norm2(hidden)`` as two kernels, the second reading the sum back:
this reads x and residual once and writes both results.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ._common import (KERNEL_DTYPES, call_op, fail, kernels, new_output, triton_available,
                      triton_device_why_not)
from .group_norm import compute_dtype

OP = "add_layer_norm"
# The Triton kernel holds a whole row in one program's registers (16 warps at most): wider rows take the reference.
TRITON_MAX_C = 8192


def layer_norm_reference(total, weight=None, bias=None, eps=1e-5):
    """F.layer_norm over the last dim in compute_dtype(total) (fp32 statistics and affine for fp16/bf16, one
    rounding to total's dtype at the end)."""
    dt = compute_dtype(total)
    up = lambda t: None if t is None else t.to(dt)  # noqa: E731
    return F.layer_norm(total.to(dt), (total.shape[-1],), up(weight), up(bias), eps).to(total.dtype)


def add_layer_norm_reference(x, residual, weight=None, bias=None, eps=1e-5):
    """The definition: (total, normed) with total = x + residual as eager rounds it, normed its LayerNorm."""
    total = x + residual
    return total, layer_norm_reference(total, weight, bias, eps)


def check_inputs(x, residual, weight, bias, eps) -> None:
    reason = _invalid(x, residual, weight, bias, eps)
    if reason is not None:
        fail(OP, reason, x=x, residual=residual, weight=weight, bias=bias)


def _invalid(x, residual, weight, bias, eps) -> Optional[str]:
    """Why these inputs are invalid, or None (plain tests: they run on every call)."""
    if not isinstance(x, torch.Tensor):
        return "x must be a tensor"
    if not x.is_floating_point():
        return f"x must be floating point, not {x.dtype}"
    if x.dim() < 2:
        return f"x must be (..., C) with at least 2 dims (rows of C), not rank {x.dim()}"
    if not isinstance(residual, torch.Tensor):
        return "residual must be a tensor"
    if tuple(residual.shape) != tuple(x.shape):
        return f"residual must have x's shape {tuple(x.shape)}"
    if residual.dtype != x.dtype:
        return f"residual has dtype {residual.dtype} but x has {x.dtype} (one dtype: no promotion)"
    if residual.device != x.device:
        return f"residual is on {residual.device} but x is on {x.device}"
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a tensor or None"
        if tuple(t.shape) != (C,):
            return f"{name} must have shape ({C},) for rows of {C}"
        if t.dtype != x.dtype:
            return f"{name} has dtype {t.dtype} but x has {x.dtype} (one dtype: no promotion)"
        if t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}"
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        return f"eps={eps!r} must be a finite non-negative number"
    return None


# ---- triton backend -------------------------------------------------------------------------------------------

def _triton_why_not(x, residual, weight, bias, eps):
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of fp16, bf16, fp32"
    if x.shape[-1] > TRITON_MAX_C:
        return f"rows of {x.shape[-1]} elements are wider than the kernel's {TRITON_MAX_C}"
    if not x.is_contiguous():
        return "x is not contiguous (the kernel reads rows of C one after another)"
    if not residual.is_contiguous():
        return "residual is not contiguous (the kernel reads rows of C one after another)"
    if (weight is not None and not weight.is_contiguous()) or (bias is not None and not bias.is_contiguous()):
        return "weight or bias is not contiguous"
    return triton_device_why_not(x, residual, weight, bias)


def _triton_run(x, residual, weight, bias, eps):
    total, normed = new_output(x, x.shape), new_output(x, x.shape)
    return kernels("add_layer_norm").add_layer_norm_triton(x, residual, weight, bias, float(eps), total, normed)


def _reference_contiguous(x, residual, weight, bias, eps):
    """The reference with the kernel's (and the fake's) output layout: contiguous, whatever x's strides."""
    total, normed = add_layer_norm_reference(x, residual, weight, bias, eps)
    return total.contiguous(), normed.contiguous()


# Not in place, so sdkernels.tuning (patch(tune=True)) may time the kernel against the reference per shape; without
# a measurement the kernel, the only backend, runs wherever its why_not allows.
add_layer_norm_dispatch = dispatch.define(OP, add_layer_norm_reference, check=check_inputs)
add_layer_norm_dispatch.register(dispatch.Backend("triton", _triton_run, _triton_why_not, available=triton_available))
add_layer_norm_dispatch.reference = _reference_contiguous


# ---- the torch op ---------------------------------------------------------------------------------------------

@torch.library.custom_op("sdkernels::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_layer_norm_dispatch(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    check_inputs(x, residual, weight, bias, eps)
    return new_output(x, x.shape), new_output(x, x.shape)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, layer_norm(x + residual, (C,), weight, bias, eps)) in one pass; see the module docstring."""
    if type(eps) is not float:  # checked as given, then converted (the op checks that)
        check_inputs(x, residual, weight, bias, eps)
        eps = float(eps)
    return call_op(add_layer_norm_dispatch, x, residual, weight, bias, eps)
