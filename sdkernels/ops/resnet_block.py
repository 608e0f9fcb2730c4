"""The ResNet block of the SD UNet and VAE, fused into three sdkernels ops (the forward of diffusers'
ResnetBlock2D in eval mode without up/down-sampling, "default" time embedding and SiLU):

    out = (shortcut + conv2(silu(norm2(conv1(silu(norm1(x))) + temb)))) / output_scale_factor

  1. sdkernels::group_norm_stats   norm1's (mean, rstd) of x                     (reads x)
  2. sdkernels::conv3x3_fused      conv1: prologue norm1 + SiLU; epilogue + bias + temb, and norm2's statistics
                                   of its output                                  (reads x, writes h)
  3. sdkernels::conv3x3_fused      conv2: prologue norm2 + SiLU; epilogue + bias + shortcut, / output_scale_factor
                                                                                  (reads h and the shortcut)

With conv3x3_fused's prologue kernel (backend "triton") neither normalized activation is written to memory; with its
default on Hopper, "triton_bordered", each is written once, into a zero-bordered buffer that the conv reads as nine
shifted 2-D GEMMs whose loads normalize nothing (faster: bench/NOTES.md, session 22). Neither writes the conv1 + temb
sum before norm2's statistics. ``temb`` here is the (N, Cout)
projection of the time embedding (time_emb_proj's output), ``shortcut`` the 1x1 conv_shortcut's output, or None for
the identity shortcut. Which blocks take this path, and the module glue, is sdkernels/patchers/resnet_block.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .conv3x3 import conv3x3_fused
from .group_norm import group_norm_stats


class Norm(NamedTuple):
    """A GroupNorm's parameters, as nn.GroupNorm holds them."""
    num_groups: int
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float


def resnet_block(x: torch.Tensor, norm1: Norm, conv1_weight: torch.Tensor, conv1_bias: Optional[torch.Tensor],
                 norm2: Norm, conv2_weight: torch.Tensor, conv2_bias: Optional[torch.Tensor],
                 temb: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None,
                 output_scale_factor: float = 1.0) -> torch.Tensor:
    """The fused block; see the module docstring. The output is channels_last when x is."""
    stats1 = group_norm_stats(x, norm1.num_groups, norm1.eps)
    h, stats2 = conv3x3_fused(x, conv1_weight, conv1_bias, norm_stats=stats1, norm_weight=norm1.weight,
                              norm_bias=norm1.bias, add=temb, stats_groups=norm2.num_groups, stats_eps=norm2.eps)
    out, _ = conv3x3_fused(h, conv2_weight, conv2_bias, norm_stats=stats2, norm_weight=norm2.weight,
                           norm_bias=norm2.bias, residual=x if shortcut is None else shortcut,
                           output_scale_factor=output_scale_factor)
    return out
