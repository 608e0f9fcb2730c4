"""The patchers of patch(..., low_memory=True) (sdkernels.banded); without it they run the original forwards.

  upsample_bands   diffusers' Upsample2D (nearest 2x, then a 3x3 conv) in bands of output rows where its output is
                   large (the VAE decoder at 512 px and up), so the 4x-size nearest copy is never made whole.
  decoder_handoff  the VAE Decoder's forward, handing each UpDecoderBlock2D its input without keeping a reference:
                   diffusers' loop (``sample = up_block(sample, ...)``, and Module.__call__'s argument tuple) keeps
                   a block's input (512 MiB at 1024 px) alive until the block returns, beside the activations of
                   its second and third ResNet blocks. Where no module of the decoder has hooks (which could keep a
                   tensor), each ResNet block's input is also donated (sdkernels.banded.donated): nothing else holds
                   it, so a band forward may write the block's output over it; and conv_norm_out + SiLU run in
                   place, in bands.
Every variant the band forwards do not mirror runs the original forward."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import nn

from .. import banded
from ..patch import (Patcher, bind_forward, must_run_original, original_forward, patched_by, register, unbind_forward,
                     why_not_plain)


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
            or x.shape[0] >= 64 or x.numel() * 4 > 2**31 or not banded.wants_bands(self, x, growth=4)
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


_DECODER_NAMES = frozenset(("_gradient_checkpointing_func", "conv_act", "conv_in", "conv_norm_out", "conv_out",
                            "gradient_checkpointing", "is_grad_enabled", "mid_block", "torch", "up_blocks"))


@functools.lru_cache(maxsize=None)  # called per up block of every decode
def _decoder_classes():
    try:
        from diffusers.models.autoencoders.vae import Decoder
        from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
    except ImportError:
        return None, None
    return Decoder, UpDecoderBlock2D


def _decoder_forward(self, sample, latent_embeds=None):
    """diffusers' Decoder.forward (0.42.1) without gradient checkpointing, each plain UpDecoderBlock2D run by
    _run_up_block_taking so that no frame but the block's own holds its input."""
    if (banded.min_bytes(self) == 0 or (torch.is_grad_enabled() and self.gradient_checkpointing)
            or must_run_original(sample)):
        return original_forward(self)(sample, latent_embeds)
    donate = _hookless(self)
    sample = self.conv_in(sample)
    sample = self.mid_block(sample, latent_embeds)
    for up_block in self.up_blocks:
        if why_not_plain(up_block, _decoder_classes()[1], "the up block", hooks_matter=True) is None:
            holder = [sample]
            del sample  # the block's input now lives in holder alone, which _run_up_block_taking empties
            sample = _run_up_block_taking(up_block, holder, latent_embeds, donate)
        else:
            sample = up_block(sample, latent_embeds)
    if latent_embeds is None and donate and _norm_then_silu(self) and banded.wants_bands(self, sample):
        sample = banded.group_norm_silu_in_place(sample, self.conv_norm_out)
    else:
        if latent_embeds is None:
            sample = self.conv_norm_out(sample)
        else:
            sample = self.conv_norm_out(sample, latent_embeds)
        sample = self.conv_act(sample)
    return self.conv_out(sample)


def _norm_then_silu(decoder) -> bool:
    """Whether conv_norm_out then conv_act compute silu(group_norm(x)): both plain, or fused by the
    norm_out_gn_silu patcher (its conv_act an identity)."""
    if "norm_out_gn_silu" in patched_by(decoder):
        return True
    return (why_not_plain(decoder.conv_norm_out, nn.GroupNorm, "conv_norm_out", hooks_matter=True) is None
            and why_not_plain(decoder.conv_act, nn.SiLU, "conv_act", hooks_matter=True) is None)


def _hookless(decoder) -> bool:
    """No forward hook anywhere in the decoder, nor a global one: no tensor it makes is kept anywhere else."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in decoder.modules())


def _run_up_block_taking(block, holder: list, temb, donate: bool = False):
    """UpDecoderBlock2D.forward on holder's only tensor, which it takes out: once the first ResNet block returns,
    nothing holds the block's input any more. With ``donate``, each ResNet block may write over its input."""
    hidden_states = holder.pop()
    for resnet in block.resnets:
        with banded.donated(hidden_states) if donate else contextlib.nullcontext():
            hidden_states = resnet(hidden_states, temb=temb)
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            hidden_states = upsampler(hidden_states)
    return hidden_states


def _find_decoders(model):
    cls = _decoder_classes()[0]
    return ((name, m) for name, m in model.named_modules() if isinstance(m, cls)) if cls is not None else ()


def _decoder_why_not(decoder) -> Optional[str]:
    decoder_cls, block_cls = _decoder_classes()
    reason = why_not_plain(decoder, decoder_cls, "the decoder", hooks_matter=False)
    if reason:
        return reason
    if (frozenset(decoder_cls.forward.__code__.co_names) != _DECODER_NAMES
            or frozenset(block_cls.forward.__code__.co_names) != frozenset(("resnets", "upsamplers"))):
        import diffusers
        return f"diffusers {diffusers.__version__}'s Decoder or UpDecoderBlock2D forward is not the one mirrored"
    return None


register(Patcher(
    name="decoder_handoff",
    find=_find_decoders,
    why_not=_decoder_why_not,
    apply=lambda decoder: bind_forward(decoder, _decoder_forward),
    restore=unbind_forward,
))


register(Patcher(
    name="upsample_bands",
    find=_find,
    why_not=_why_not,
    apply=lambda up: bind_forward(up, _forward),
    restore=unbind_forward,
))
