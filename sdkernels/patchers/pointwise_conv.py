"""pointwise_conv: a 1x1 nn.Conv2d on a channels_last fp16/bf16 input runs as the matmul it is, with its bias added
in the matmul's epilogue.

On a channels_last model cuDNN runs a 1x1 convolution as a cuBLAS GEMM over the (N*H*W, C) rows and then PyTorch
adds the bias in a separate strided broadcast pass over the output. In the SD1.5 step on an H200 those bias passes
(Transformer2DModel's proj_in / proj_out, ResnetBlock2D's conv_shortcut) were about 0.14 ms of 5.6 ms of kernels
(``scripts/probe_step_ops.py``). ``F.linear`` on the (N, H, W, C) view does the GEMM and the bias in one kernel
(cuBLASLt's bias epilogue, fp32 accumulation as in the convolution), and its (N, H, W, K) output is the channels_last
(N, K, H, W) tensor as a view. The bias is added in fp32 before the one rounding, where the convolution rounds the
product and then the sum. Other inputs (NCHW, fp32, autograd, autocast) run nn.Conv2d.forward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..patch import Patcher, bind_forward, must_run_original, original_forward, register, unbind_forward, why_not_plain

_HALF = (torch.float16, torch.bfloat16)
# nn.Conv2d attributes of a convolution that is a matmul over channels.
_POINTWISE = dict(kernel_size=(1, 1), stride=(1, 1), dilation=(1, 1), groups=1)


def is_pointwise(conv: nn.Conv2d) -> bool:
    return (all(getattr(conv, k) == v for k, v in _POINTWISE.items())
            and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


def channels_last_half_call(conv: nn.Conv2d, x) -> bool:
    """Whether a conv call can run as one of our channels_last paths (F.linear here, sdkernels::conv3x3 for the
    conv3x3 patcher): a 4-D channels_last input of the weight's half dtype, nothing for autograd or autocast to
    see."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in _HALF and x.dtype == conv.weight.dtype
            and x.is_contiguous(memory_format=torch.channels_last)
            and not must_run_original(x, conv.weight, conv.bias))


def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """conv2d(x, weight (K, C, 1, 1), bias) for a channels_last x, as F.linear over its (N, H, W, C) view: the
    channels_last (N, K, H, W) result."""
    return F.linear(x.permute(0, 2, 3, 1), weight[:, :, 0, 0], bias).permute(0, 3, 1, 2)


def _pointwise_forward(self, x):
    if not channels_last_half_call(self, x):
        return original_forward(self)(x)
    return pointwise_linear(x, self.weight, self.bias)


def _find(model):
    return ((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and is_pointwise(m))


def _why_not(conv) -> Optional[str]:
    return why_not_plain(conv, nn.Conv2d, "the conv", hooks_matter=False)  # hooks still run: forward is swapped


register(Patcher(name="pointwise_conv", find=_find, why_not=_why_not,
                 apply=lambda conv: bind_forward(conv, _pointwise_forward), restore=unbind_forward))
