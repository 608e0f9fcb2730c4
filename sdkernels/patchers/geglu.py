"""GEGLU and GELU patchers: the feed-forward activations of diffusers' transformer blocks.

  geglu  diffusers GEGLU (FeedForward's activation_fn="geglu"): proj + chunk + a * gelu(g) as one
         sdkernels::linear_geglu matmul when proj is a plain nn.Linear; when proj is wrapped (a peft LoRA layer,
         diffusers' LoRACompatibleLinear with a lora_layer, hooks, an offload wrapper) proj runs as it is and
         sdkernels::geglu follows, so adapters keep applying.
  gelu   diffusers GELU ("gelu", "gelu-approximate"): proj as it is, then sdkernels::gelu.

The choice is made per call from what ``proj`` is then, so loading, fusing, switching or unloading LoRA adapters
after patching needs no re-patch, and the weights are read in place (nothing is cached from them). Every patched
forward runs the module's original forward when autograd must record it or autocast is on
(``must_run_original``), on devices our kernels do not run on, and for inputs the fused path would not take
(another dtype than the weight's, the deprecated ``scale`` argument).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..kernels.utils import device_ok
from ..ops.geglu import APPROXIMATIONS, geglu, gelu, linear_geglu
from ..patch import Patcher, bind_forward, must_run_original, original_forward, register, unbind_forward, why_not_plain


@functools.lru_cache(maxsize=None)
def _activation_classes():
    try:
        from diffusers.models.activations import GEGLU, GELU
    except ImportError:
        return None, None
    return GEGLU, GELU


_LORA_COMPATIBLE = []  # [diffusers' LoRACompatibleLinear or None] once asked (not lru_cache: dynamo warns on it)


def _lora_compatible_linear():
    """Asked on every forward."""
    if not _LORA_COMPATIBLE:
        try:
            from diffusers.models.lora import LoRACompatibleLinear
        except ImportError:
            LoRACompatibleLinear = None
        _LORA_COMPATIBLE.append(LoRACompatibleLinear)
    return _LORA_COMPATIBLE[0]


def _named(model: nn.Module, cls):
    if cls is None:
        return ()
    return ((name, m) for name, m in model.named_modules() if isinstance(m, cls))


def _is_plain_linear(proj: nn.Module) -> bool:
    """True when calling proj is exactly F.linear(x, proj.weight, proj.bias), so the fused matmul may read its
    weights instead of calling it: an nn.Linear (or a LoRACompatibleLinear with no lora_layer) running its class's
    forward, with no hooks."""
    lora_compatible = _lora_compatible_linear()
    if lora_compatible is not None and type(proj) is lora_compatible:
        if proj.lora_layer is not None:
            return False
        cls = lora_compatible
    else:
        cls = nn.Linear
    return type(proj) is cls and why_not_plain(proj, cls, "proj", hooks_matter=True) is None


def _runs_here(x, proj: nn.Module) -> bool:
    """Our path can stand in: a floating tensor on a device the kernels run on, no autograd or autocast."""
    # Without grad mode the parameters cannot make autograd record the call: skip walking them (microseconds).
    params = proj.parameters() if torch.is_grad_enabled() else ()
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and device_ok(x)
            and not must_run_original(x, *params))


def _why_not_activation(module, cls, what: str) -> Optional[str]:
    """why_not_plain, and also the class's own gelu method (the forward calls self.gelu) and a proj to call."""
    reason = why_not_plain(module, cls, what, hooks_matter=False)
    if reason:
        return reason
    if type(module).gelu is not cls.gelu:
        return f"{what} is {type(module).__name__}, a {cls.__name__} with its own gelu"
    if not isinstance(getattr(module, "proj", None), nn.Module):
        return f"{what} has no proj module"
    return None


# ---- geglu ----------------------------------------------------------------------------------------------------

def _geglu_forward(self, hidden_states, *args, **kwargs):
    """diffusers' GEGLU.forward (0.42.1): proj, chunk(2, -1), value * F.gelu(gate) with the exact erf."""
    proj = self.proj
    if args or kwargs or not _runs_here(hidden_states, proj):
        return original_forward(self)(hidden_states, *args, **kwargs)
    if (_is_plain_linear(proj) and hidden_states.dtype == proj.weight.dtype
            and hidden_states.shape[-1:] == proj.weight.shape[1:]):
        return linear_geglu(hidden_states, proj.weight, proj.bias)
    return geglu(proj(hidden_states))


def _geglu_why_not(module) -> Optional[str]:
    cls, _ = _activation_classes()
    return _why_not_activation(module, cls, "the GEGLU")


register(Patcher(
    name="geglu",
    find=lambda model: _named(model, _activation_classes()[0]),
    why_not=_geglu_why_not,
    apply=lambda module: bind_forward(module, _geglu_forward),
    restore=unbind_forward,
    covers=lambda module: (module.proj,),  # its weights are read directly: no other patcher may change proj
))


# ---- gelu -----------------------------------------------------------------------------------------------------

def _gelu_forward(self, hidden_states):
    """diffusers' GELU.forward (0.42.1): proj, then F.gelu(approximate=self.approximate)."""
    if not _runs_here(hidden_states, self.proj):
        return original_forward(self)(hidden_states)
    return gelu(self.proj(hidden_states), self.approximate)


def _gelu_why_not(module) -> Optional[str]:
    _, cls = _activation_classes()
    reason = _why_not_activation(module, cls, "the GELU")
    if reason is None and getattr(module, "approximate", None) not in APPROXIMATIONS:
        reason = f"approximate={getattr(module, 'approximate', None)!r} is not one of {APPROXIMATIONS}"
    return reason


register(Patcher(
    name="gelu",
    find=lambda model: _named(model, _activation_classes()[1]),
    why_not=_gelu_why_not,
    apply=lambda module: bind_forward(module, _gelu_forward),
    restore=unbind_forward,
))
