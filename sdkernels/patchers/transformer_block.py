"""transformer_add_norm: diffusers' BasicTransformerBlock with each residual add and the LayerNorm that reads it as
one op (sdkernels::add_layer_norm), where the block's norm is a plain LayerNorm ("layer_norm", as in SD1.5, SD2.1
and SDXL).

The block computes ``h = attn1(norm1(h)) + h``, then ``norm2(h)`` for attn2, ``h = attn2(...) + h``, then
``norm3(h)`` for the feed-forward: each sum is written and read back at once by the next norm. The op reads the two
addends, writes the sum (the residual stream goes on) and the normalized rows in one pass. The block's last add
(``ff(...) + h``) joins the next block's norm1 the same way where one block feeds the next (see "the chain"). The
feed-forward and norm1 stay module calls (so LoRA layers, processors and other patchers keep working); whatever the
fused path does not cover (other norm types, positional embeddings, GLIGEN, chunked feed-forward, 4-D inputs,
autograd, autocast) runs the original forward.
"""
from __future__ import annotations

from typing import Optional

import weakref

import torch
from torch import nn

from ..ops._common import KERNEL_DTYPES
from ..ops.add_layer_norm import add_layer_norm
from ..patch import Patcher, bind_forward, must_run_original, original_forward, register, unbind_forward, why_not_plain

# BasicTransformerBlock.forward's co_names in the diffusers versions this forward mirrors (0.27 to 0.42: the same
# names, and the same "layer_norm" path). Another forward leaves the blocks alone.
_MIRRORED_FORWARD_NAMES = frozenset((
    "ValueError", "_chunk_dim", "_chunk_size", "_chunked_feed_forward", "attn1", "attn2", "chunk", "copy", "dtype",
    "ff", "fuser", "get", "logger", "ndim", "norm1", "norm2", "norm3", "norm_type", "only_cross_attention", "pop",
    "pos_embed", "reshape", "scale_shift_table", "shape", "squeeze", "unsqueeze", "warning"))


def _block_class():
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:
        return None
    return BasicTransformerBlock


def fusable(addend: torch.Tensor, stream: torch.Tensor, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor]) -> bool:
    """Whether add_layer_norm's kernel takes ``addend + stream`` then a LayerNorm of these parameters: one shape and
    kernel dtype, dense rows, the parameters in that dtype (also sdkernels.flat's test, on traced tensors)."""
    return (addend.shape == stream.shape and addend.dtype == stream.dtype and addend.dtype in KERNEL_DTYPES
            and addend.device == stream.device and addend.is_contiguous() and stream.is_contiguous()
            and all(p is None or p.dtype == addend.dtype for p in (weight, bias)))


def _add_then_norm(addend: torch.Tensor, stream: torch.Tensor, norm: nn.LayerNorm) -> tuple:
    """(addend + stream, norm(addend + stream)): one op where it takes them, else the add and the norm's call."""
    if fusable(addend, stream, norm.weight, norm.bias):
        return add_layer_norm(addend, stream, norm.weight, norm.bias, norm.eps)
    total = addend + stream
    return total, norm(total)


# ---- the chain: a block's last add fused with the next block's norm1 --------------------------------------------
# Where a block's output goes straight into the next block (SDXL's transformers chain 2 to 10), the last add and the
# next block's norm1 are one op too. A block cannot see its successor, so the link is learned: a block's output is
# offered in _PENDING, and the block that takes exactly that tensor as its input (same object, no in-place change
# since: weak reference and version counter) links its norm1 to the producer. From then on the producer computes
# that norm with its add and leaves the result in _PENDING; the consumer takes it instead of calling norm1. A
# consumer that gets any other tensor, or whose norm1 gained hooks, calls norm1: a wrong link costs time, never
# correctness. Under CUDA graphs the warm-up calls learn the links and the capture records the fused kernels.
# On a producer: the norm1 its output feeds. A plain reference to a module of the same model, kept out of _modules (no
# state_dict entry, no second owner in .modules()): a deep copy of the model links its own copies.
_NEXT_NORM = "_sdkernels_next_norm"
_EMPTY = (None, -1, None, None, None)
# (weak reference to the output, its version, the norm applied or None, the normed output, weak ref. to the producer)
_PENDING = list(_EMPTY)


def _tracks(x: torch.Tensor) -> bool:
    # (torch.compile traces neither weak references nor version counters; inference tensors have no version)
    return not torch.compiler.is_compiling() and not x.is_inference()


def _plain_norm(norm) -> bool:
    return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1
            and not (norm._forward_hooks or norm._forward_pre_hooks))


def _first_norm(block, hidden_states):
    """norm1(hidden_states): the one its producer computed with its add, if any; learns the link otherwise."""
    if torch.compiler.is_compiling():  # a trace must not read _PENDING: dynamo would guard on what it held then
        return block.norm1(hidden_states)
    ref, version, norm, normed, producer = _PENDING
    if ref is not None and ref() is hidden_states and _tracks(hidden_states) and version == hidden_states._version:
        _PENDING[:] = _EMPTY
        if norm is block.norm1 and _plain_norm(norm):
            return normed
        producer = producer()
        if producer is not None and _plain_norm(block.norm1):  # a new link, or one that pointed elsewhere
            producer.__dict__[_NEXT_NORM] = block.norm1
    return block.norm1(hidden_states)


def _last_add(block, ff_output, hidden_states):
    """ff_output + hidden_states, offered to the next block (with its norm1 applied, where linked)."""
    if not _tracks(hidden_states):
        return ff_output + hidden_states
    norm = block.__dict__.get(_NEXT_NORM)
    if (norm is not None and _plain_norm(norm) and fusable(ff_output, hidden_states, norm.weight, norm.bias)
            and not must_run_original(*norm.parameters())):
        total, normed = add_layer_norm(ff_output, hidden_states, norm.weight, norm.bias, norm.eps)
    else:
        total, norm, normed = ff_output + hidden_states, None, None
    _PENDING[:] = (weakref.ref(total), total._version, norm, normed, weakref.ref(block))
    return total


def _block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                   added_cond_kwargs=None):
    """diffusers' BasicTransformerBlock.forward for norm_type "layer_norm", with the residual adds before norm2 and
    norm3 fused into them (see the module docstring); anything else runs the original forward."""
    if (not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or self._chunk_size is not None
            or (cross_attention_kwargs and ("gligen" in cross_attention_kwargs
                                            or cross_attention_kwargs.get("scale") is not None))
            or must_run_original(hidden_states, *self.norm3.parameters(),
                                 *(self.norm2.parameters() if self.attn2 is not None else ()))):
        return original_forward(self)(
            hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, timestep=timestep,
            cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs)
    kwargs = cross_attention_kwargs or {}
    attn_output = self.attn1(_first_norm(self, hidden_states),
                             encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                             attention_mask=attention_mask, **kwargs)
    if self.attn2 is not None:
        hidden_states, norm_hidden_states = _add_then_norm(attn_output, hidden_states, self.norm2)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask, **kwargs)
    hidden_states, norm_hidden_states = _add_then_norm(attn_output, hidden_states, self.norm3)
    return _last_add(self, self.ff(norm_hidden_states), hidden_states)


def _find(model):
    cls = _block_class()
    return ((name, m) for name, m in model.named_modules() if isinstance(m, cls)) if cls is not None else ()


def _why_not(block) -> Optional[str]:
    cls = _block_class()
    reason = why_not_plain(block, cls, "the block", hooks_matter=False)
    if reason:
        return reason
    if frozenset(cls.forward.__code__.co_names) != _MIRRORED_FORWARD_NAMES:
        import diffusers
        return f"diffusers {diffusers.__version__}'s BasicTransformerBlock.forward is not the one this patcher mirrors"
    if block.norm_type != "layer_norm":
        return f"norm_type {block.norm_type!r} (the fused path mirrors 'layer_norm')"
    if block.pos_embed is not None:
        return "it has a positional embedding"
    for name in ("norm2", "norm3") if block.attn2 is not None else ("norm3",):
        # Hooks matter: the fused path reads the norm's parameters instead of calling it.
        reason = why_not_plain(getattr(block, name), nn.LayerNorm, name, hooks_matter=True)
        if reason:
            return reason
        if len(getattr(block, name).normalized_shape) != 1:
            return f"{name} normalizes over several dims"
    return None


def _restore(block) -> None:
    unbind_forward(block)
    block.__dict__.pop(_NEXT_NORM, None)
    _PENDING[:] = _EMPTY


# Ahead of layer_norm, which then still patches norm1 and, for the fallback path, norm2 and norm3.
register(Patcher(name="transformer_add_norm", find=_find, why_not=_why_not,
                 apply=lambda block: bind_forward(block, _block_forward), restore=_restore),
         before="layer_norm")
