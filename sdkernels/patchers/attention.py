"""Attention patcher: SdkernelsAttnProcessor on every diffusers ``Attention`` that runs AttnProcessor2_0.

The processor is installed with ``Attention.set_processor`` and the one it replaces is kept on the module and put
back by ``unpatch``. Modules with another processor (IP-Adapter, fused QKV, xformers, a user's own) or a head dim
our kernels do not take (e.g. the SD VAE's single 512-wide head) are left alone, with the reason in the summary.
"""
from __future__ import annotations

from typing import Optional

from ..attention_processor import SdkernelsAttnProcessor
from ..ops.attention import KERNEL_HEAD_DIMS
from ..patch import Patcher, register

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


def _apply(attn) -> None:
    attn.__dict__[_PREVIOUS_PROCESSOR] = attn.processor
    attn.set_processor(SdkernelsAttnProcessor())


def _restore(attn) -> None:
    attn.set_processor(attn.__dict__.pop(_PREVIOUS_PROCESSOR))


register(Patcher(name="attention", find=_find, why_not=_why_not, apply=_apply, restore=_restore))
