"""sdkernels::add_bias_residual_: a convolution's epilogue, in place, in one pass.

    y <- (y + bias[None, :, None, None] + residual) * scale          (bias, residual optional)

y is (N, C, ...) floating point; bias (C,) and residual (y's shape) have y's dtype and device. The sum is computed in
fp32 (fp64 for fp64) and rounded once to y's dtype, where eager PyTorch rounds after each add. The patched
ResnetBlock2D runs conv2 without its bias and adds bias, shortcut and 1 / output_scale_factor here: one pass over the
activation where eager takes two (PyTorch adds a convolution's bias in a pass of its own) or three.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import dispatch
from ._common import KERNEL_DTYPES, call_op, fail, kernels, triton_available, triton_device_why_not
from .group_norm import compute_dtype

OP = "add_bias_residual_"


def add_bias_residual_reference(y, bias=None, residual=None, scale=1.0):
    """The definition: the sum in compute_dtype, rounded once into y (returned)."""
    total = y.to(compute_dtype(y))
    if bias is not None:
        total = total + bias.to(total.dtype).view(-1, *([1] * (y.dim() - 2)))
    if residual is not None:
        total = total + residual.to(total.dtype)
    if scale != 1.0:
        total = total * scale
    return y.copy_(total)


def check_inputs(y, bias, residual, scale) -> None:
    reason = _invalid(y, bias, residual, scale)
    if reason is not None:
        fail(OP, reason, y=y, bias=bias, residual=residual)


def _invalid(y, bias, residual, scale) -> Optional[str]:
    """Why these inputs are invalid, or None (plain tests: they run on every call)."""
    if not isinstance(y, torch.Tensor):
        return "y must be a tensor"
    if not (y.dim() >= 2 and y.is_floating_point()):
        return "y must be a floating-point (N, C, ...) tensor"
    for name, t in (("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a tensor or None"
        expected = (y.shape[1],) if name == "bias" else tuple(y.shape)
        if tuple(t.shape) != expected:
            return f"{name} must have shape {expected}"
        if t.dtype != y.dtype:
            return f"{name} has dtype {t.dtype} but y has {y.dtype} (one dtype: no promotion)"
        if t.device != y.device:
            return f"{name} is on {t.device} but y is on {y.device}"
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return f"scale={scale!r} must be a finite number"
    return None


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dense_channels_last(y) -> Optional[bool]:
    """True where y is dense channels_last (NHWC), False where dense contiguous (NCHW), None otherwise: torch's own
    contiguity flags (where both hold, the two layouts are the same memory)."""
    fmt = _CHANNELS_LAST.get(y.dim())
    if fmt is not None and y.is_contiguous(memory_format=fmt):
        return True
    return False if y.is_contiguous() else None


def operands_why_not(like, bias, residual):
    """Why the kernel cannot take this dtype, bias and device (``like``: y, or any tensor of y's dtype and device),
    or None; what sdkernels::conv3x3's cudnn_epilogue backend asks before its y exists."""
    if like.dtype not in KERNEL_DTYPES:
        return f"dtype {like.dtype} is not one of fp16, bf16, fp32"
    if bias is not None and bias.stride() != (1,) and bias.numel() > 1:
        return "bias is not contiguous"
    return triton_device_why_not(like, bias, residual)


def _triton_why_not(y, bias, residual, scale):
    if dense_channels_last(y) is None:
        return "y is not dense NCHW or NHWC"
    if residual is not None and residual.stride() != y.stride():
        return "residual's strides differ from y's"
    return operands_why_not(y, bias, residual)


def _triton_run(y, bias, residual, scale):
    return kernels("bias_add").bias_residual_triton(y, bias, residual, float(scale), dense_channels_last(y))


# in_place: never timed by sdkernels.tuning (each timed call would add the bias again); its one kernel beats the
# eager reference wherever it runs, so the priority order is the choice.
add_bias_residual_dispatch = dispatch.define(OP, add_bias_residual_reference, in_place=True, check=check_inputs)
add_bias_residual_dispatch.register(dispatch.Backend("triton", _triton_run, _triton_why_not,
                                                     available=triton_available))


@torch.library.custom_op("sdkernels::add_bias_residual_", mutates_args=("y",))
def _add_bias_residual_op(y: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                          scale: float = 1.0) -> None:
    add_bias_residual_dispatch(y, bias, residual, scale)


@_add_bias_residual_op.register_fake
def _(y, bias, residual, scale=1.0):
    check_inputs(y, bias, residual, scale)


def add_bias_residual_(y: torch.Tensor, bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                       scale: float = 1.0) -> torch.Tensor:
    """(y + bias + residual) * scale written into y, one rounding; returns y. See the module docstring."""
    if type(scale) is not float:  # checked as given, then converted (the op checks that)
        check_inputs(y, bias, residual, scale)
        scale = float(scale)
    call_op(add_bias_residual_dispatch, y, bias, residual, scale)
    return y
