"""Without CUDA graphs, a patched UNet's step runs its patched modules or its original ones, whichever measured
faster for the input signature: ``sdkernels.patch(pipe)`` (tune=True, cuda_graph=False) installs a ``StepChoice`` on
each UNet2DConditionModel's forward.

Why a whole step: an eager SD1.5 step at batch 2 and 512 px is host-bound on an H200's host (about 25 ms of Python
and launches against 20 ms of GPU work). The patched modules cut the GPU time, but each of their op calls spends
more host time than eager's (Python layers, Triton's launcher), and more inside a step, with the CPU's caches cold,
than the per-op measurement (sdkernels.tuning) sees in isolation: with every module patched, 0.89x eager for SD1.5
and 0.76x for SDXL at batch 2 (H200, paired timing, scripts/host_profile_step.py --each). Only the whole step says
which way is faster, so it is measured whole, once per signature.

How: the first call of a signature times the step both ways (tuning.MeasuredChoice with the current objective:
warm-up calls, then CUDA events around each call, the two ways in alternation so that the host's drift does not
read as a difference between them (tuning.alternating_ms), about 18 steps in all), keeps the faster, and stores it
with the op choices in the per-GPU tuning file, so a later process measures nothing. "originals" runs every patched
module's original code (``patch.running_originals``), which is what the unpatched model runs. Under torch.compile,
during a capture, with autograd recording or off the GPU nothing is measured and the patched modules run, as without
this.
The VAE has none: its decode is GPU-bound, where the patched modules are the faster (4.2x eager at 1024 px on an
H200), and measuring it would cost seconds of decodes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import tuning
from .shadow import Shadowing, attach_to_unet, detach

_CHOICE = "_sdkernels_step_choice"  # on a model: its StepChoice
PATCHED, ORIGINALS = "patched", "originals"


def install(model: nn.Module, flat: bool = False) -> bool:
    """Put a StepChoice on a UNet2DConditionModel's forward (nothing if one is there already); False for any other
    model. ``flat``: the forward is a flat call (sdkernels.flat), whose two ways are flat steps: their choice is
    stored apart from the unflattened one's, which weighs other steps."""
    return attach_to_unet(model, _CHOICE, lambda: StepChoice(model, "forward", flat))


def uninstall(model: nn.Module) -> None:
    detach(model, _CHOICE)


def installed(model: nn.Module) -> Optional["StepChoice"]:
    return model.__dict__.get(_CHOICE)


class StepChoice(Shadowing):
    """A model method shadowed on the instance by one that runs it with the patched or the original modules."""

    def __init__(self, model: nn.Module, method: str, flat: bool = False):
        name = f"step_{type(model).__name__}_{method}" + ("_flat" if flat else "")
        self.choices = tuning.MeasuredChoice(name, alternate=True)
        super().__init__(model, method)

    def __call__(self, *args, **kwargs):
        if not self.open or torch.compiler.is_compiling() or torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        leaves = tuple(tree_flatten((args, kwargs))[0])
        ways = lambda: {PATCHED: lambda: self.original(*args, **kwargs),  # noqa: E731
                        ORIGINALS: lambda: self._originals(*args, **kwargs)}
        if self.choices.choose(leaves, ways, default=PATCHED) == ORIGINALS:
            return self._originals(*args, **kwargs)
        return self.original(*args, **kwargs)

    def _originals(self, *args, **kwargs):
        from .patch import running_originals
        with running_originals():
            return self.original(*args, **kwargs)
