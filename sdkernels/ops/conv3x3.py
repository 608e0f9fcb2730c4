"""sdkernels::conv3x3_fused: a 3x3 convolution (stride 1, zero padding 1) with the ResNet block's neighbours fused.

    a        = silu(group_norm_affine(x, norm_stats, norm_weight, norm_bias))   if norm_stats is given, else x
    out      = (conv2d(a, weight, bias, padding=1) + add[:, :, None, None] + residual) / output_scale_factor
    stats    = group_norm_stats(out, stats_groups, stats_eps)                    if stats_groups > 0
    returns (out, stats)

The zero padding is applied to the normalized activation ``a`` (eager ``conv2d(silu(group_norm(x)))``), and ``a``
is rounded to x's dtype before the convolution, as eager stores it. ``norm_stats`` is (N, G, 2) (mean, rstd) per
(sample, group), e.g. from sdkernels.group_norm_stats; ``add`` (N, Cout) is a per-(sample, channel) term (the ResNet
block's time-embedding projection); ``stats`` is (N, stats_groups, 2) (mean, rstd) of the output as stored, in
fp32 (fp64 for fp64 x), empty (N, 0, 2) when stats_groups is 0. Products accumulate in fp32. The output is
channels_last when x is, else contiguous; its dtype is x's.

Named for what it is (a fused 3x3 conv) rather than for the ResNet block, whose forward (sdkernels.ops.resnet_block)
is two calls of it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ._common import (KERNEL_DTYPES, call_op, is_channels_last_like, kernels, poisoned, requirements,
                      triton_available, triton_device_why_not)
from .conv3x3_plain import tma_operands_why_not
from .group_norm import compute_dtype, group_norm_stats_reference, normalize_reference

OP = "conv3x3_fused"
INT32_MAX = 2**31 - 1


def conv3x3_reference(x, weight, bias=None, norm_stats=None, norm_weight=None, norm_bias=None, add=None,
                      residual=None, output_scale_factor=1.0, stats_groups=0, stats_eps=1e-6):
    """The specification, in eager PyTorch (compute_dtype math, x's dtype out); see the module docstring."""
    compute = compute_dtype(x)
    a = x
    if norm_stats is not None:
        a = F.silu(normalize_reference(x, norm_stats.to(compute), norm_weight, norm_bias)).to(x.dtype)
    up = lambda t: None if t is None else t.to(compute)  # noqa: E731
    y = F.conv2d(a.to(compute), weight.to(compute), up(bias), padding=1)
    if add is not None:
        y = y + up(add)[:, :, None, None]
    if residual is not None:
        y = y + up(residual)
    out = (y / output_scale_factor).to(x.dtype)
    if stats_groups:
        return out, group_norm_stats_reference(out, stats_groups, stats_eps)
    return out, _no_stats(x)


def _no_stats(x):
    return x.new_empty((x.shape[0], 0, 2), dtype=compute_dtype(x))


def _output(x, cout):
    """The output tensor: x's dtype and device, channels_last when x is (NaN-poisoned under the tests)."""
    fmt = torch.channels_last if is_channels_last_like(x) else torch.contiguous_format
    shape = (x.shape[0], cout) + tuple(x.shape[2:])
    return poisoned(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt))


# ---- input checks ---------------------------------------------------------------------------------------------

def check_inputs(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                 stats_groups, stats_eps) -> None:
    inputs = dict(x=x, weight=weight, bias=bias, norm_stats=norm_stats, norm_weight=norm_weight,
                  norm_bias=norm_bias, add=add, residual=residual)
    need = requirements(OP, **inputs)

    need(isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor), "x and weight must be tensors")
    need(x.dim() == 4, lambda: f"x must be (N, Cin, H, W), not rank {x.dim()}")
    N, Cin, H, W = x.shape
    need(weight.dim() == 4 and weight.shape[1:] == (Cin, 3, 3),
         lambda: f"weight must be (Cout, {Cin}, 3, 3) for x's {Cin} channels, as nn.Conv2d stores a 3x3 kernel")
    Cout = weight.shape[0]
    need(x.is_floating_point(), lambda: f"x must be floating point, not {x.dtype}")
    need(weight.dtype == x.dtype,
         lambda: f"weight has dtype {weight.dtype} but x has {x.dtype} (as F.conv2d, one dtype)")
    expected = {"bias": (Cout,), "norm_weight": (Cin,), "norm_bias": (Cin,), "add": (N, Cout),
                "residual": (N, Cout, H, W)}
    for name, t in inputs.items():
        if t is None or name == "x":
            continue
        need(isinstance(t, torch.Tensor) and t.is_floating_point(), lambda: f"{name} must be a floating-point tensor")
        need(t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")
        if name in expected:
            need(tuple(t.shape) == expected[name], lambda: f"{name} must have shape {expected[name]}")
    if norm_stats is not None:
        need(norm_stats.dim() == 3 and norm_stats.shape[0] == N and norm_stats.shape[2] == 2,
             lambda: f"norm_stats must be ({N}, G, 2): (mean, rstd) per sample and group")
        G = norm_stats.shape[1]
        need(G >= 1 and Cin % G == 0, lambda: f"norm_stats has {G} groups, which must divide x's {Cin} channels")
    else:
        need(norm_weight is None and norm_bias is None, "norm_weight and norm_bias need norm_stats")
    need(isinstance(output_scale_factor, (int, float)) and math.isfinite(output_scale_factor)
         and output_scale_factor != 0,
         lambda: f"output_scale_factor={output_scale_factor!r} must be finite and non-zero")
    need(isinstance(stats_groups, int) and stats_groups >= 0 and (stats_groups == 0 or Cout % stats_groups == 0),
         lambda: f"stats_groups={stats_groups!r} must be 0 (no statistics) or a positive divisor of the {Cout} output "
         "channels")
    need(stats_eps >= 0, lambda: f"stats_eps={stats_eps!r} must be non-negative")


# ---- triton backend -------------------------------------------------------------------------------------------

def _triton_why_not(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                    stats_groups, stats_eps):
    tensors = [t for t in (x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual) if t is not None]
    reason = triton_device_why_not(*tensors)
    if reason:
        return reason
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of fp16, bf16, fp32"
    if x.numel() == 0 or weight.shape[0] == 0:
        return "empty tensor"
    if norm_stats is not None and norm_stats.dtype != torch.float32:
        return f"norm_stats is {norm_stats.dtype}; the kernel reads fp32 statistics"
    out_numel = x.shape[0] * weight.shape[0] * x.shape[2] * x.shape[3]
    if out_numel > INT32_MAX or any(t.numel() > INT32_MAX for t in tensors):  # channel offsets are 32-bit
        return "more than 2**31 elements in one tensor"
    return None


def _triton_run(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                stats_groups, stats_eps):
    out = _output(x, weight.shape[0])
    norm = None if norm_stats is None else (norm_stats.contiguous(), norm_weight, norm_bias)
    stats = kernels("conv3x3").conv3x3_triton(x, weight, bias, norm, add, residual, output_scale_factor, stats_groups,
                                              stats_eps, out)
    return out, (stats.view(x.shape[0], stats_groups, 2) if stats is not None else _no_stats(x))


def _reference_into_layout(x, weight, *args):
    out, stats = conv3x3_reference(x, weight, *args)
    into = _output(x, weight.shape[0])
    into.copy_(out)
    return into, stats


# ---- triton_bordered backend: normalize once into a zero-bordered buffer, then nine shifted 2-D GEMMs ------------

def _bordered_why_not(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                      stats_groups, stats_eps):
    return (_triton_why_not(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                            stats_groups, stats_eps)
            or tma_operands_why_not(x, weight, read_x=False))  # x itself is read into the bordered buffer


def _bordered_run(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                  stats_groups, stats_eps):
    k = kernels("conv3x3_padded")
    out = _output(x, weight.shape[0])
    norm = None if norm_stats is None else (norm_stats.contiguous(), norm_weight, norm_bias)
    N, Cin, H, W = x.shape
    bordered = k.gn_silu_bordered(x, norm, poisoned(torch.empty((N, H + 2, W + 2, Cin), device=x.device,
                                                                dtype=x.dtype)))
    stats = k.conv3x3_padded(bordered, weight, bias, add, residual, 1.0 / output_scale_factor, out, stats_groups,
                             stats_eps)
    return out, (stats.view(x.shape[0], stats_groups, 2) if stats is not None else _no_stats(x))


conv3x3_dispatch = dispatch.define(OP, _reference_into_layout, check=check_inputs)
conv3x3_dispatch.register(dispatch.Backend("triton_bordered", _bordered_run, _bordered_why_not,
                                           available=triton_available))
conv3x3_dispatch.register(dispatch.Backend("triton", _triton_run, _triton_why_not, available=triton_available))


# ---- the torch op ---------------------------------------------------------------------------------------------

@torch.library.custom_op("sdkernels::conv3x3_fused", mutates_args=())
def _conv3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                norm_stats: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                norm_bias: Optional[torch.Tensor], add: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                output_scale_factor: float, stats_groups: int, stats_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor, stats_groups,
            stats_eps)
    return conv3x3_dispatch(*args)


@_conv3x3_op.register_fake
def _(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor, stats_groups,
      stats_eps):
    check_inputs(x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, output_scale_factor,
                 stats_groups, stats_eps)
    stats = x.new_empty((x.shape[0], stats_groups, 2), dtype=compute_dtype(x))
    return _output(x, weight.shape[0]), stats


def conv3x3_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  norm_stats: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                  norm_bias: Optional[torch.Tensor] = None, add: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, output_scale_factor: float = 1.0, stats_groups: int = 0,
                  stats_eps: float = 1e-6) -> tuple:
    """(out, stats) of the fused 3x3 convolution; see the module docstring."""
    args = (x, weight, bias, norm_stats, norm_weight, norm_bias, add, residual, float(output_scale_factor),
            stats_groups, float(stats_eps))
    return call_op(conv3x3_dispatch, *args)  # checks args where its dispatch has not seen their key
