"""Attention patcher: SdkernelsAttnProcessor on every diffusers ``Attention`` that runs AttnProcessor2_0.

The processor is installed with ``Attention.set_processor`` and the one it replaces is kept on the module and put
back by ``unpatch``. Where the module runs diffusers' own ``Attention.forward``, a lean copy of it is bound too: the
original asks ``inspect.signature`` of its processor on every call to filter extra keyword arguments (84 us per call
under cProfile on an H200's host, 140 calls per SDXL step, which a step without CUDA graphs pays in full); the copy
calls the processor straight away when there is nothing to filter, and the original otherwise. Modules with another
processor (IP-Adapter, fused QKV, xformers, a user's own) or a head dim our kernels do not take (e.g. the SD VAE's
single 512-wide head) are left alone, with the reason in the summary.
"""
from __future__ import annotations

from typing import Optional

from ..attention_processor import SdkernelsAttnProcessor
from ..ops.attention import KERNEL_HEAD_DIMS
from ..patch import (Patcher, bind_forward, forward_is, original_forward, register, unbind_forward,
                     why_not_plain)

_PREVIOUS_PROCESSOR = "_sdkernels_previous_attn_processor"


def _classes():
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    except ImportError:
        return None, None
    return Attention, AttnProcessor2_0


def _find(model):
    attention, _ = _classes()
    if attention is None:
        return ()
    return ((name, m) for name, m in model.named_modules() if isinstance(m, attention))


def _why_not(attn) -> Optional[str]:
    _, processor_2_0 = _classes()
    processor = getattr(attn, "processor", None)
    if type(processor) is not processor_2_0:
        return f"its processor is {type(processor).__name__}, not AttnProcessor2_0"
    head_dim = attn.inner_dim // attn.heads
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head dim {head_dim} is not one of {', '.join(map(str, KERNEL_HEAD_DIMS))}"
    if attn.inner_kv_dim != attn.inner_dim:
        return "keys and values have fewer heads than queries"
    return None


def _lean_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
    """Attention.forward (diffusers 0.42.1) where no keyword argument needs filtering and our processor is
    installed; the original forward otherwise."""
    if cross_attention_kwargs or type(self.processor) is not SdkernelsAttnProcessor:
        return original_forward(self)(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)


def _apply(attn) -> None:
    attn.__dict__[_PREVIOUS_PROCESSOR] = attn.processor
    attn.set_processor(SdkernelsAttnProcessor())
    if why_not_plain(attn, _classes()[0], "the Attention", hooks_matter=False) is None:
        bind_forward(attn, _lean_forward)


def _restore(attn) -> None:
    if forward_is(attn, _lean_forward):
        unbind_forward(attn)
    attn.set_processor(attn.__dict__.pop(_PREVIOUS_PROCESSOR))


register(Patcher(name="attention", find=_find, why_not=_why_not, apply=_apply, restore=_restore))
