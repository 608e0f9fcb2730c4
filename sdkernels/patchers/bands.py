"""upsample_bands: diffusers' Upsample2D (nearest 2x, then a 3x3 conv) in bands of output rows where its output is
large (the VAE decoder at 512 px and up; sdkernels.banded), so the 4x-size nearest copy is never materialized
whole. Smaller inputs, and every variant the band forward does not mirror, run the original forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import banded
from ..patch import Patcher, bind_forward, must_run_original, original_forward, register, unbind_forward, why_not_plain


def _upsample_class():
    try:
        from diffusers.models.upsampling import Upsample2D
    except ImportError:
        return None
    return Upsample2D


# The names Upsample2D.forward uses in the diffusers versions upsample_forward mirrors (0.27 to 0.42).
_MIRRORED_FORWARD_NAMES = frozenset((
    "Conv2d_0", "F", "bfloat16", "channels", "contiguous", "conv", "deprecate", "dtype", "float32", "get", "interpolate",
    "is_torch_version", "len", "max", "name", "norm", "numel", "permute", "pow", "shape", "to", "torch",
    "use_conv", "use_conv_transpose", "zip"))


def _forward(self, hidden_states, output_size=None, *args, **kwargs):
    x = hidden_states
    if (args or kwargs or output_size is not None or not isinstance(x, torch.Tensor) or x.dim() != 4
            or x.shape[0] >= 64 or x.numel() * 4 > 2**31 or not banded.wants_bands_upsampled(self, x)
            or must_run_original(x, self.conv.weight)):
        return original_forward(self)(hidden_states, output_size, *args, **kwargs)
    return banded.upsample_forward(self, x)


def _find(model):
    cls = _upsample_class()
    return ((name, m) for name, m in model.named_modules() if isinstance(m, cls)) if cls is not None else ()


def _why_not(up) -> Optional[str]:
    cls = _upsample_class()
    reason = why_not_plain(up, cls, "the upsampler", hooks_matter=False)
    if reason:
        return reason
    names = set(cls.forward.__code__.co_names)
    if not names <= _MIRRORED_FORWARD_NAMES:
        import diffusers
        return f"diffusers {diffusers.__version__}'s Upsample2D.forward is not the one this patcher mirrors"
    if up.use_conv_transpose or not up.use_conv or not up.interpolate or up.norm is not None or up.name != "conv":
        return "not nearest 2x + conv (transposed conv, no conv, a norm or a renamed conv)"
    if not banded.is_same_conv3x3(up.conv):
        return "its conv is not a 3x3, stride 1, zero padding 1 nn.Conv2d"
    return None


register(Patcher(
    name="upsample_bands",
    find=_find,
    why_not=_why_not,
    apply=lambda up: bind_forward(up, _forward),
    restore=unbind_forward,
))
