"""Flat steps without CUDA graphs: ``sdkernels.patch(pipe, flat=True)``.

Without graphs an SD UNet step is host-bound on the GPU hosts measured here: Python and launches take longer than the
GPU's work, and diffusers' module code is much of that Python (about 12,500 Python calls an SD1.5 step, and twice
that with the patched modules, whose op calls each pass through input checks, dispatch and a launcher). With
``flat=True`` the UNet's forward is traced by dynamo, torch.compile's front end, into one FX graph per input
signature, and that graph runs as plain Python: one line per op, no nn.Module calls, none of diffusers' branches.
There is no code generation and no CUDA graph: the ops are the same calls, sdkernels' ops call their own
implementation (the same input checks and dispatch, without torch.library's Python layers), and tracing takes
seconds, not the minutes Inductor's compile takes.

What tracing fixes stays fixed until dynamo's guards see a change (a new shape, dtype or module, which traces
again): environment knobs the patched modules read, and the paths that only run eagerly (the pending transformer
norms: under tracing each block runs on its own). sdkernels.linear_groups' fused projections and the ResNet blocks'
shared time-embedding SiLU keep state across calls, which a trace cannot hold: while a flat graph is traced
(``tracing()``) they become calls of the ops ``sdkernels::linear_group_output`` and ``sdkernels::shared_silu``, which
keep that state at run time. The first call of a model runs eagerly (precompile and the measured op choices).
Calls with autograd recording, under torch.compile, a dispatch or function mode, or a functorch transform run the
forward as it is. Inside ``patch.running_originals`` (the step choice's other way) a second graph is traced with
the original modules, so that sdkernels.step_choice, installed over this, weighs two flat steps. Dynamo keeps its
graphs per code object, up to its recompile limit (8 by default, torch._dynamo.config): past that many signatures
(resolutions, batch sizes, dtypes) and models, further ones run the forward eagerly, as without ``flat``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import replay
from .ops._common import _nothing_intercepts
from .replay import RecordedCall, replayable
from .shadow import Shadowing, attach_to_unet, detach

logger = logging.getLogger("sdkernels")

_FLAT = "_sdkernels_flat"  # on a model: its FlatCall
_tracing = False  # True while a FlatCall runs its traced callable (dynamo guards on it: the graphs need it True)


def tracing() -> bool:
    """Whether the code running now is being traced (or run) as a flat graph's (see the module docstring)."""
    return _tracing


def install(model: nn.Module) -> bool:
    """Put a FlatCall on a UNet2DConditionModel's forward (nothing if one is there already); False for any other
    model (the VAE's decode is GPU-bound: flattening its few Python calls would not pay for the trace)."""
    return attach_to_unet(model, _FLAT, lambda: FlatCall(model, "forward"))


def uninstall(model: nn.Module) -> None:
    detach(model, _FLAT)


def installed(model: nn.Module) -> Optional["FlatCall"]:
    return model.__dict__.get(_FLAT)


def _op_implementations() -> dict:
    """{"sdkernels::name": the function the op was defined from} (torch.library.custom_op keeps them)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - torch 2.4 has it
        return {}
    return {name: d._init_fn for name, d in OPDEFS.items() if name.startswith("sdkernels::")}


def _op_name(target) -> Optional[str]:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def direct_calls(gm: torch.fx.GraphModule) -> int:
    """Point gm's sdkernels op nodes at the ops' own implementations, each recorded and replayed (sdkernels.replay)
    unless it keeps state across calls; returns how many nodes it changed."""
    implementations = _op_implementations()
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = _op_name(node.target)
            implementation = implementations.get(name)
            if implementation is not None:
                node.target = RecordedCall(name, implementation) if replayable(name) else implementation
                changed += 1
    if changed:
        gm.recompile()
    return changed


def drop_idle_dropouts(gm: torch.fx.GraphModule) -> int:
    """Remove gm's F.dropout nodes that return their input (training False, or p 0: every dropout of an inference
    UNet, ~70 calls an SD1.5 step); returns how many it removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.dropout and node.args:
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training is False or (p == 0 and type(p) in (int, float)):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
    if removed:
        gm.recompile()
    return removed


def flat_backend(gm: torch.fx.GraphModule, example_inputs):
    """A dynamo backend that runs the traced graph as it is, without idle dropouts, its sdkernels ops called
    directly."""
    drop_idle_dropouts(gm)
    direct_calls(gm)
    return gm.forward


class FlatCall(Shadowing):
    """A model method shadowed on the instance by its dynamo-traced flat graph (one per input signature)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__(model, method)
        self.flat = {}    # {running the originals: the traced callable}, each made on its way's second call
        self.calls = {}

    def __getstate__(self):  # a copy traces its own model
        state = self.__dict__.copy()
        state["flat"], state["calls"] = {}, {}
        return state

    def __call__(self, *args, **kwargs):
        # (_nothing_intercepts of no arguments: no compiling, tracing, dispatch or function mode, functorch transform)
        if not self.open or torch.is_grad_enabled() or not _nothing_intercepts(()):
            return self.original(*args, **kwargs)
        from .patch import originals_running
        way = originals_running()
        calls = self.calls[way] = self.calls.get(way, 0) + 1
        if calls == 1:  # eager once: precompile, op choices
            return self.original(*args, **kwargs)
        flat = self.flat.get(way)
        if flat is None:
            flat = self.flat[way] = _traced(self.original, way)
        global _tracing
        previous, _tracing = _tracing, True
        replaying, replay.active = replay.active, replay.allowed()
        try:
            return flat(*args, **kwargs)
        finally:
            _tracing, replay.active = previous, replaying


def _traced(method, originals: bool):
    """torch.compile of ``method`` with flat_backend. Each way gets a function of its own: dynamo keeps its traced
    graphs per code object, and a graph traced with the original modules must never serve the patched ones."""
    if originals:
        def run_originals(*args, **kwargs):
            return method(*args, **kwargs)
        return torch.compile(run_originals, backend=flat_backend, dynamic=False)

    def run_patched(*args, **kwargs):
        return method(*args, **kwargs)
    # dynamic=False: a graph per shape (sdkernels.replay's recordings hold for one graph's shapes)
    return torch.compile(run_patched, backend=flat_backend, dynamic=False)
