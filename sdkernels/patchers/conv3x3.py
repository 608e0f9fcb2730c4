"""conv3x3 (opt-in: ``patch(model, ops=[*sdkernels.default_ops(), "conv3x3"])``): a 3x3 nn.Conv2d (stride 1, zero
padding 1, one group) on a channels_last fp16/bf16 input runs as sdkernels::conv3x3, whose measured dispatch picks
cuDNN or one of our convolutions per shape.

With tuning on (sdkernels.patch's default) the op times its backends on the first call of each shape and keeps the
fastest. In situ on an H200 (``scripts/probe_conv3x3_patch.py``, device objective) the triton_tma backend
(kernels/conv3x3_tma.py) won only the VAE decoder's 256- and 128-channel layers at 1024 px (1.1x-1.4x cuDNN there)
and one 256-channel layer at 512 px; cuDNN won every SD1.5 UNet shape. Whole models with CUDA graphs, patcher on
against off in one call: VAE decode at 1024 px 28.0 against 28.5 ms, and 28.6 against 28.2 ms in the next call
(noise); the SD1.5 UNet step 6.142 against 6.141 ms. No measurable gain, and a Triton compile per conv shape on a
machine's first run, hence not a default patcher. (A higher peak first seen with it, 1920 against 1441 MiB at
1024 px, was output_like allocating each output twice, since fixed: 1408 MiB.) Other inputs (NCHW, fp32, autograd,
autocast) run nn.Conv2d.forward.
ResnetBlock2D's patched forward runs its convs without their bias through ``conv_without_bias``, which takes the op
where this patcher took the conv; where it took conv2, the block's shortcut and 1 / output_scale_factor go into the
op's epilogue (``conv_plus_residual``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..banded import is_same_conv3x3
from ..ops.conv3x3_plain import conv3x3
from ..patch import Patcher, bind_forward, forward_is, original_forward, register, unbind_forward, why_not_plain
from .pointwise_conv import channels_last_half_call


def _conv3x3_forward(self, x):
    if not channels_last_half_call(self, x):
        return original_forward(self)(x)
    return conv3x3(x, self.weight, self.bias)


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) without its bias (the caller adds it later): through the op where this patcher took the conv."""
    if takes(conv, x):
        return conv3x3(x, conv.weight, None)
    return conv._conv_forward(x, conv.weight, None)


def takes(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether conv(x) runs as sdkernels::conv3x3 (this patcher took the conv, and x is a call it takes)."""
    return forward_is(conv, _conv3x3_forward) and channels_last_half_call(conv, x)


def conv_plus_residual(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor, scale: float) -> torch.Tensor:
    """(conv(x) + residual) * scale as one sdkernels::conv3x3 call, its epilogue adding the residual, where takes(conv,
    x) and the residual has the output's shape and x's dtype (the caller checks)."""
    return conv3x3(x, conv.weight, conv.bias, residual, scale)


def _find(model):
    return ((name, m) for name, m in model.named_modules() if is_same_conv3x3(m) and m.groups == 1)


def _why_not(conv) -> Optional[str]:
    return why_not_plain(conv, nn.Conv2d, "the conv", hooks_matter=False)  # hooks still run: forward is swapped


register(Patcher(name="conv3x3", find=_find, why_not=_why_not,
                 apply=lambda conv: bind_forward(conv, _conv3x3_forward), restore=unbind_forward, default=False))
