"""What is computed from weights and kept (Winograd's transformed filters), and the writes it cannot see by itself.

A cached filter transform is keyed by its weight's storage and version counter (sdkernels.ops.winograd), so
``weight.add_(...)`` and ``weight.data = ...`` both show. peft's default LoRA merge does neither: it writes
``base_layer.weight.data += delta``, and ``.data`` is a tensor with a version counter of its own. That is what
diffusers' ``fuse_lora()`` and ``unfuse_lora()`` run unless ``safe_fusing=True``. So ``patch()`` wraps those two
methods of each model it patches (``install``) to forget the model's cached transforms after them, and
``weights_changed(model)`` does the same for any other in-place write through ``.data``. CUDA graphs need nothing
from here: a merge changes the LoRA layers' adapter state, which their fingerprint sees (sdkernels.graphs).
"""
from __future__ import annotations

from torch import nn

from .shadow import Shadowing, attach, detach

# The model methods that write its weights in place through ``.data`` (diffusers' PeftAdapterMixin).
WEIGHT_WRITERS = ("fuse_lora", "unfuse_lora")
_FORGETTERS = "_sdkernels_forget_after_"


def weights_changed(model: nn.Module) -> None:
    """Forget everything computed from ``model``'s weights: call it after writing them in place through ``.data``
    (``patch()`` does it after the model's fuse_lora and unfuse_lora)."""
    from .ops.winograd import forget_filter
    for parameter in model.parameters():
        forget_filter(parameter)


def install(model: nn.Module) -> None:
    """Shadow model.fuse_lora and model.unfuse_lora, where it has them, with calls that run them and then
    weights_changed(model). Idempotent; uninstall() puts them back."""
    for name in WEIGHT_WRITERS:
        if callable(getattr(model, name, None)):
            attach(model, _FORGETTERS + name, lambda name=name: ForgetAfter(model, name))


def uninstall(model: nn.Module) -> None:
    for name in WEIGHT_WRITERS:
        detach(model, _FORGETTERS + name)


class ForgetAfter(Shadowing):
    def __call__(self, *args, **kwargs):
        try:
            return self.original(*args, **kwargs)
        finally:  # (a merge that failed halfway has written some weights too)
            if self.open:
                weights_changed(self.model)
