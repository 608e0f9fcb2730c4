"""The shapes the Stable Diffusion models really feed to their modules, read off the diffusers models themselves.

Each workload (a model of sdkernels.models, with its config from /work/shared/ANCHORS.md, at a batch and image size)
is built and run once on the ``meta`` device: tensors there have shapes, dtypes and strides but no storage, so even
the SDXL UNet costs well under a second and no memory. Forward hooks on the chosen module types record each call,
and a torch-function mode notes the first torch function that consumes each recorded output (so "GroupNorm followed
by SiLU" is seen, not assumed).

    calls = workload_calls("sd15", nn.GroupNorm)               # every call, in order
    counts = module_input_shapes(model, inputs, nn.Conv2d)     # {(type, input shape): calls per forward}
    for s in group_norm_shapes("vae1024"): print(s.case, s.count, s.silu_count)

    python bench/shapes.py [sd15,sdxl,...]                     # print the GroupNorm shape lists
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sdkernels

from sdkernels import models  # noqa: E402

# ---- recording module calls ------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModuleCall:
    """One call of a recorded module during a forward."""
    name: str                      # qualified name inside the model, e.g. "down_blocks.0.resnets.1.norm2"
    module: nn.Module = dataclasses.field(repr=False)
    input_shapes: tuple            # shapes of the tensor positional arguments, in order
    kwarg_shapes: dict             # {name: shape} of the tensor keyword arguments (encoder_hidden_states, ...)
    output: Any = dataclasses.field(repr=False, default=None)
    consumer: Optional[str] = None  # the first torch function that took the output as an argument ("silu", ...)

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _returns_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple)) and value
                                               and all(isinstance(v, torch.Tensor) for v in value))


class _ConsumerMode(TorchFunctionMode):
    """Notes, for each pending module output, the first torch function that computes a tensor from it. Metadata
    queries (``.shape``, ``.size()``, ``.dtype``, ...) return no tensor, so they are not consumers."""

    def __init__(self):
        super().__init__()
        self.pending = {}  # id(output tensor) -> ModuleCall; the call keeps the tensor alive, so ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.pending and _returns_tensor(result):
            for t in _tensors((args, kwargs)):
                call = self.pending.pop(id(t), None)
                if call is not None:
                    call.consumer = getattr(func, "__name__", str(func))
        return result


def _as_args_kwargs(inputs) -> tuple:
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
        return tuple(inputs[0]), inputs[1]
    return tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,), {}


def module_calls(model: nn.Module, inputs, module_types, method: str = "forward") -> list:
    """Run ``model.<method>(*args, **kwargs)`` once and return a ModuleCall for every call of a submodule that is
    an instance of ``module_types`` (a type or tuple of types), in call order. ``inputs`` is a tuple of positional
    arguments, a dict of keyword arguments, or an (args, kwargs) pair. Run it on meta tensors to pay nothing."""
    args, kwargs = _as_args_kwargs(inputs)
    names = {m: n for n, m in model.named_modules()}
    calls = []
    mode = _ConsumerMode()

    def hook(module, hook_args, hook_kwargs, output):
        shapes = tuple(tuple(a.shape) for a in hook_args if isinstance(a, torch.Tensor))
        kw_shapes = {k: tuple(v.shape) for k, v in hook_kwargs.items() if isinstance(v, torch.Tensor)}
        call = ModuleCall(names.get(module, "?"), module, shapes, kw_shapes, output)
        calls.append(call)
        if isinstance(output, torch.Tensor):
            mode.pending[id(output)] = call

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, module_types)]
    try:
        with torch.no_grad(), mode:
            getattr(model, method)(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        mode.pending.clear()
    for call in calls:
        call.output = None  # drop the references; shapes and consumers are all that is kept
    return calls


def module_input_shapes(model: nn.Module, inputs, module_types, extra: Optional[Callable] = None,
                        method: str = "forward") -> collections.Counter:
    """{(type name, first input shape, *extra(call)): calls per forward}, deduplicated, in first-call order.
    ``extra(call)`` returns a tuple of more fields to tell calls apart (groups, kernel size, the consumer, ...)."""
    counts = collections.Counter()
    for call in module_calls(model, inputs, module_types, method):
        shape = call.input_shapes[0] if call.input_shapes else ()
        counts[(call.type_name, shape) + (tuple(extra(call)) if extra else ())] += 1
    return counts


# ---- the workloads ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model: str        # a model of sdkernels.models (its diffusers config, random init)
    batch: int
    resolution: int   # image size in pixels

    @property
    def method(self) -> str:
        return models.spec(self.model).method


WORKLOADS = {w.name: w for w in [
    Workload("sd15", "SD1.5 UNet, batch 2 (CFG), 512 px (64x64 latent)", "sd15", 2, 512),
    Workload("sd21", "SD2.1 UNet, batch 2 (CFG), 768 px (96x96 latent)", "sd21", 2, 768),
    Workload("sdxl", "SDXL UNet, batch 2 (CFG), 1024 px (128x128 latent)", "sdxl", 2, 1024),
    Workload("vae512", "VAE decoder, batch 1, 512 px output", "vae", 1, 512),
    Workload("vae1024", "VAE decoder, batch 1, 1024 px output", "vae", 1, 1024),
]}


def workload_calls(name: str, module_types) -> list:
    """module_calls of a named workload, with the model and its inputs on the meta device."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    w = WORKLOADS[name]
    with torch.device("meta"):
        model = models.build(w.model)
        inputs = models.model_inputs(model, w.batch, w.resolution)
    return module_calls(model, inputs, module_types, w.method)


# ---- GroupNorm -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroupNormShape:
    """A distinct GroupNorm call of a workload: its input shape (N, C, *spatial), groups, eps, how often it runs.
    Most inputs are (N, C, H, W); the VAE's mid-block attention normalizes a (N, C, H*W) view."""
    shape: tuple
    groups: int
    eps: float
    count: int          # calls per forward
    silu_count: int     # of those, how many feed SiLU directly (so fused GroupNorm+SiLU replaces both)

    @property
    def case(self) -> str:
        return group_norm_case(self.shape, self.groups)


def group_norm_case(shape, groups) -> str:
    """"B=2,C=320,H=64,W=64,G=32" (rank 4), "B=1,C=512,L=4096,G=32" (rank 3), "B=..,C=..,D=..,H=..,W=.." (5)."""
    spatial = {1: "L", 2: "HW", 3: "DHW"}[len(shape) - 2]
    dims = ",".join(f"{k}={v}" for k, v in zip(spatial, shape[2:]))
    return f"B={shape[0]},C={shape[1]},{dims},G={groups}"


def group_norm_shapes(name: str) -> list:
    """The distinct (shape, groups, eps) GroupNorm calls of a workload (one forward), in first-call order."""
    by_key = {}
    for call in workload_calls(name, nn.GroupNorm):
        m = call.module
        key = (call.input_shapes[0], m.num_groups, m.eps)
        count, silu = by_key.get(key, (0, 0))
        by_key[key] = (count + 1, silu + (call.consumer == "silu"))
    return [GroupNormShape(shape, groups, eps, count, silu) for (shape, groups, eps), (count, silu) in by_key.items()]


def _print_group_norm_shapes(names) -> None:
    for name in names:
        shapes = group_norm_shapes(name)
        total = sum(s.count for s in shapes)
        print(f"{name}: {WORKLOADS[name].description}: {len(shapes)} distinct GroupNorm shapes, {total} calls, "
              f"{sum(s.silu_count for s in shapes)} followed by SiLU")
        for s in shapes:
            print(f"  {s.case:34s} eps={s.eps:g}  calls={s.count:3d}  silu={s.silu_count:3d}")


if __name__ == "__main__":
    _print_group_norm_shapes(sys.argv[1].split(",") if len(sys.argv) > 1 else list(WORKLOADS))
