"""The instance attribute that shadows a model's method (CUDA graphs' ``GraphedCall``, ``StepChoice``,
``Precompiler``).

A plain closure there would survive ``copy.deepcopy(model)`` as the very same function (deepcopy does not copy
functions), so the copy would keep calling the original model's wrapper, and through it the original model. A
``ShadowMethod`` is an object: a deep copy of the model copies it and its owner along with the model. It keeps the
method's name, docstring and (``__wrapped__``) signature for callers that inspect it, as diffusers' pipelines do.
"""
from __future__ import annotations

import functools
from typing import Callable


class ShadowMethod:
    def __init__(self, owner: Callable, method: Callable):
        # not the wrapped one's __dict__: where it is another ShadowMethod (StepChoice's over the Precompiler's), its
        # owner would replace ours
        functools.update_wrapper(self, method, updated=())
        self.owner = owner

    def __call__(self, *args, **kwargs):
        return self.owner(*args, **kwargs)


def unshadow(model, name: str, method: ShadowMethod, shadowed) -> None:
    """Put ``model.<name>`` back as it was before ``method`` shadowed it (``shadowed``: the instance attribute it
    replaced, None for the class's method). If another library has wrapped ours since, that wrapper stays in place
    and calls straight through (the owner, closed, calls the original)."""
    d = model.__dict__
    if d.get(name) is method:
        if shadowed is None:
            del d[name]
        else:
            d[name] = shadowed


class Shadowing:
    """Base of an owner that shadows ``model.<method>`` from construction until ``close()``; ``self.original`` is
    what it shadows (the bound method, or an inner owner's ShadowMethod)."""

    def __init__(self, model, method: str):
        self.model, self.method_name = model, method
        self.shadowed = model.__dict__.get(method)  # an instance attribute we shadow (None: the class method)
        self.original = getattr(model, method)
        self.open = True
        self.method = model.__dict__[method] = ShadowMethod(self, self.original)

    def close(self) -> None:
        """Put the method back (if another library has wrapped ours since, it stays and calls straight through)."""
        self.open = False
        unshadow(self.model, self.method_name, self.method, self.shadowed)


def attach(model, attr: str, make: Callable[[], object]) -> None:
    """Keep ``make()`` on the model under ``attr``, unless one is there already."""
    if attr not in model.__dict__:
        model.__dict__[attr] = make()


def attach_to_unet(model, attr: str, make: Callable[[], object]) -> bool:
    """attach() where ``model`` is a diffusers UNet2DConditionModel; False, attaching nothing, for any other model."""
    from diffusers import UNet2DConditionModel
    if not isinstance(model, UNet2DConditionModel):
        return False
    attach(model, attr, make)
    return True


def detach(model, attr: str) -> None:
    """Take the owner kept under ``attr`` off the model and close it."""
    owner = model.__dict__.pop(attr, None)
    if owner is not None:
        owner.close()
