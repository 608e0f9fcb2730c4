"""resnet_block patcher (opt-in): diffusers' ResnetBlock2D forward as the fused block of sdkernels.ops.resnet_block
(GroupNorm statistics, then two fused 3x3 convs that normalize as they load and add bias, time embedding and
shortcut as they store).

    sdkernels.patch(pipe, ops=sdkernels.default_ops() + ["resnet_block"])

Not applied by default: on an H100 its Triton convolution was 3x-12x slower than cuDNN (bench_resnet_block.py). Where
it may measure (a GPU, sdkernels.tuning on), each block shape runs the faster of the fused block and the unfused one
(resnet_gn_silu's forward: cuDNN convs around fused GroupNorm + SiLU), measured once and remembered per GPU; where it
may not, the fused block runs, as asked.
It is registered ahead of resnet_gn_silu and covers the blocks it patches, so those keep one patcher; the blocks it
leaves (its why_not: up/down-sampling, scale_shift, another activation or conv, hooks on the parts it reads) go on
to resnet_gn_silu, which still fuses their GroupNorm + SiLU pairs. At call time, whatever the fused path does not
cover (autograd, autocast, training-mode dropout, the deprecated ``scale`` argument, odd inputs) runs the original
forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import tuning
from ..ops.resnet_block import Norm, resnet_block
from ..patch import (Patcher, bind_forward, must_run_original, original_forward, register, unbind_forward,
                     why_not_plain)
from .group_norm import _find_resnets, _resnet_forward, _resnet_why_not

FUSED, UNFUSED = "fused", "unfused"
_fused_or_not = tuning.MeasuredChoice("resnet_block")

# nn.Conv2d attributes of the convolution sdkernels::conv3x3_fused computes.
_CONV3X3 = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, padding_mode="zeros")


def _norm(gn: nn.GroupNorm) -> Norm:
    return Norm(gn.num_groups, gn.weight, gn.bias, gn.eps)


def _call_why_not(block, x, temb, args, kwargs) -> Optional[str]:
    """Why this call must run the original forward (None when the fused path computes what it would)."""
    if args or kwargs:
        return "extra arguments (the deprecated scale)"
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype == block.conv1.weight.dtype):
        return "input is not a 4-D tensor of the convs' dtype"
    if block.time_emb_proj is not None and temb is None:
        return "no temb for a block with a time embedding (diffusers raises)"
    if block.time_emb_proj is None and temb is not None and block.time_embedding_norm == "default":
        return "a temb added without projection"
    if block.dropout.training and block.dropout.p > 0:
        return "training-mode dropout"
    params = [p for m in (block.norm1, block.conv1, block.norm2, block.conv2) for p in (m.weight, m.bias)]
    if must_run_original(x, temb, *params):
        return "autograd or autocast"
    return None


def _fused_forward(self, input_tensor, temb, *args, **kwargs):
    """ResnetBlock2D.forward (diffusers 0.27 to 0.42) for the blocks _why_not admits, as sdkernels.ops.resnet_block
    or, where measured faster, as the unfused path. time_emb_proj and conv_shortcut run as the modules they are
    (hooks, LoRA and all)."""
    if _call_why_not(self, input_tensor, temb, args, kwargs) is not None:
        return original_forward(self)(input_tensor, temb, *args, **kwargs)
    def fused():
        return _fused_block(self, input_tensor, temb)

    def unfused():
        return _resnet_forward(self, input_tensor, temb)

    key = (input_tensor, temb, self.conv1.weight, self.conv2.weight, self.conv_shortcut is not None)
    way = _fused_or_not.choose(key, lambda: {FUSED: fused, UNFUSED: unfused}, default=FUSED)
    return unfused() if way == UNFUSED else fused()


def _fused_block(self, input_tensor, temb):
    """The block as sdkernels.ops.resnet_block (GN1 statistics, conv1 with GN1+SiLU prologue and bias + temb + GN2
    statistics epilogue, conv2 with GN2+SiLU prologue and bias + shortcut + scale epilogue)."""
    projected = None
    if self.time_emb_proj is not None:
        projected = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
        if projected.dtype != input_tensor.dtype:  # eager would promote the sum: leave it to eager
            return original_forward(self)(input_tensor, temb)
    shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else None
    return resnet_block(input_tensor, _norm(self.norm1), self.conv1.weight, self.conv1.bias, _norm(self.norm2),
                        self.conv2.weight, self.conv2.bias, temb=projected, shortcut=shortcut,
                        output_scale_factor=float(self.output_scale_factor))


def _why_not(block) -> Optional[str]:
    reason = _resnet_why_not(block)  # a plain ResnetBlock2D of a mirrored diffusers version, GroupNorms and SiLU
    if reason:
        return reason
    if block.upsample is not None or block.downsample is not None:
        return "up/down-sampling between norm1 and conv1"
    if block.time_embedding_norm == "scale_shift":
        return "time_embedding_norm scale_shift (scale and shift between norm2 and its SiLU)"
    for name in ("conv1", "conv2"):
        conv = getattr(block, name)
        reason = why_not_plain(conv, nn.Conv2d, name, hooks_matter=True)  # its weights are read, it is not called
        if reason:
            return reason
        odd = {k: getattr(conv, k) for k, v in _CONV3X3.items() if getattr(conv, k) != v}
        if odd:
            return f"{name} is not a 3x3 stride-1 zero-padded conv ({odd})"
    return why_not_plain(block.dropout, nn.Dropout, "dropout", hooks_matter=True)


register(Patcher(
    name="resnet_block",
    find=_find_resnets,
    why_not=_why_not,
    apply=lambda block: bind_forward(block, _fused_forward),
    restore=unbind_forward,
    covers=lambda block: (block, block.norm1, block.norm2, block.conv1, block.conv2),
    default=False,
), before="resnet_gn_silu")
