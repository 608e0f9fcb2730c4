"""Flat steps without CUDA graphs: ``sdkernels.patch(pipe, flat=True)``.

Without graphs an SD UNet step is host-bound on the GPU hosts measured here: Python and launches take longer than the
GPU's work, and diffusers' module code is much of that Python (about 12,500 Python calls an SD1.5 step, and twice
that with the patched modules, whose op calls each pass through input checks, dispatch and a launcher). With
``flat=True`` the UNet's forward is traced by dynamo, torch.compile's front end, into one FX graph per input
signature, and that graph runs as plain Python: one line per op, no nn.Module calls, none of diffusers' branches.
There is no code generation and no CUDA graph: the ops are the same calls, sdkernels' ops call their own
implementation (the same input checks and dispatch, without torch.library's Python layers), and tracing takes
seconds, not the minutes Inductor's compile takes. Each op node then records its call once and replays it
(sdkernels.replay), and the backend drops idle dropouts and ``x / 1.0`` and merges repeated calls (``merge_repeats``).

What tracing fixes stays fixed until dynamo's guards see a change (a new shape, dtype or module, which traces
again): environment knobs the patched modules read, and the paths that only run eagerly (the pending transformer
norms: under tracing each block runs on its own, and the backend fuses the chained blocks' add and LayerNorm into
one op again: ``fuse_add_layer_norms``). sdkernels.linear_groups' fused projections and the ResNet blocks'
shared time-embedding SiLU keep state across calls eagerly, which a trace cannot hold: while a flat graph is traced
(``tracing()``) each member of a group calls ``sdkernels::linear_group_all`` on the group's buffers (every member's
output; the member takes its columns) and each block its own SiLU, and ``merge_repeats`` leaves one call of each
per input. Before each flat call the groups lay out again any weights replaced since (``BEFORE_CALL``: the graph
reads the groups' buffers, not the members' weights). The first call of a model runs eagerly (precompile and the
measured op choices). Calls with autograd recording, under torch.compile, a dispatch or function mode, or a
functorch transform run the forward as it is. Inside ``patch.running_originals`` (the step choice's other way) a
second graph is traced with the original modules, so that sdkernels.step_choice, installed over this, weighs two
flat steps. Dynamo keeps its graphs per code object, up to its recompile limit (8 by default,
torch._dynamo.config): past that many signatures (resolutions, batch sizes, dtypes) and models, further ones run
the forward eagerly, as without ``flat``.
"""
from __future__ import annotations

import functools
import inspect
import logging
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import replay
from .ops._common import _nothing_intercepts
from .replay import RecordedCall
from .shadow import Shadowing, attach_to_unet, detach

logger = logging.getLogger("sdkernels")

_FLAT = "_sdkernels_flat"  # on a model: its FlatCall
BEFORE_CALL = []  # called before each flat call (sdkernels.linear_groups.keep_intact)
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
    """Point gm's sdkernels op nodes at the ops' own implementations, each recorded and replayed (sdkernels.replay);
    returns how many nodes it changed."""
    implementations = _op_implementations()
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = _op_name(node.target)
            implementation = implementations.get(name)
            if implementation is not None:
                node.target = RecordedCall(name, implementation)
                changed += 1
    if changed:
        gm.recompile()
    return changed


def drop_idle_dropouts(gm: torch.fx.GraphModule) -> int:
    """Remove gm's F.dropout nodes that return their input (training False, or p 0: every dropout of an inference
    UNet, ~70 calls an SD1.5 step); returns how many it removed."""
    def idle(node) -> bool:
        if node.op != "call_function" or node.target is not F.dropout or not node.args:
            return False
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return training is False or (p == 0 and type(p) in (int, float))
    return _bypass(gm, idle)


def _bypass(gm: torch.fx.GraphModule, returns_its_input) -> int:
    """Replace each node for which returns_its_input(node) holds by its first argument; returns how many."""
    removed = 0
    for node in list(gm.graph.nodes):
        if returns_its_input(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return removed


# Calls that compute a fresh tensor from their arguments alone, so that two with the same arguments may be one
# (merge_repeats): the linear groups' op and SiLU, which every member and every ResNet block traces on its own.
_MERGEABLE_OPS = {"sdkernels::linear_group_all"}
_MERGEABLE_FUNCTIONS = (F.silu,)
# What never returns a view of its arguments (every sdkernels op, by torch.library's rule, and these): where a chain
# of other calls leads from a mutated tensor back to the same one of these, the mutation may reach the other's memory.
_FRESH_FUNCTIONS = (F.linear, F.silu, F.gelu, F.group_norm, F.layer_norm, F.scaled_dot_product_attention, F.interpolate,
                    torch.conv2d, torch.cat, torch.exp, torch.sin, torch.cos, torch.arange, operator.add, operator.sub,
                    operator.mul, operator.truediv)
_INPUTS, _ANY = "graph inputs", "any"  # memory roots: the graph's inputs (one: they may share memory); any memory


def _mutated_arguments(node):
    """The arguments a node writes into (in-place methods and functions, inplace=True, out=, mutating ops), or
    None where it may write into any of them (a module call)."""
    if node.op == "call_module":
        return None
    if node.op not in ("call_function", "call_method"):
        return ()
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    schema = getattr(target, "_schema", None)
    if schema is None and isinstance(target, torch._ops.OpOverloadPacket):
        schema = target.default._schema
    if schema is not None:
        return tuple(node.args[i] for i, a in enumerate(schema.arguments)
                     if a.alias_info is not None and a.alias_info.is_write and i < len(node.args))
    written = []
    if (name.endswith("_") and not name.endswith("__")) or _inplace(node) or name in (
            "setitem", "iadd", "isub", "imul", "itruediv"):
        written.append(node.args[0] if node.args else None)
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    return tuple(written)


@functools.lru_cache(maxsize=None)
def _signature(target):
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without one
        return None


def _inplace(node) -> bool:
    """Whether a call passes inplace=True (by keyword or position: F.silu(x, True))."""
    if node.kwargs.get("inplace") is True:
        return True
    signature = _signature(node.target) if callable(node.target) else None
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        return signature.bind(*node.args, **node.kwargs).arguments.get("inplace") is True
    except TypeError:
        return True  # cannot tell: say it writes


def _memory_root(node, roots: dict):
    """The call whose fresh output a node's tensor may be a view of: itself for a fresh call, _INPUTS for the graph's
    inputs, else its tensor arguments' root where they share one, _ANY where they do not."""
    if node in roots:
        return roots[node]
    if node.op in ("placeholder", "get_attr"):
        root = _INPUTS
    elif node.op == "call_function" and ((_op_name(node.target) or "").startswith("sdkernels::") or (
            node.target in _FRESH_FUNCTIONS and not _inplace(node))):
        root = node
    else:
        sources = {_memory_root(a, roots) for a in node.all_input_nodes}
        root = sources.pop() if len(sources) == 1 else node if not sources else _ANY
    roots[node] = root
    return root


def _merge_key(node):
    mergeable = (node.op == "call_function" and (_op_name(node.target) in _MERGEABLE_OPS or (
        node.target in _MERGEABLE_FUNCTIONS and not _inplace(node))))
    if not mergeable:
        return None
    key = (node.target, tuple(node.args), tuple(sorted(node.kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def merge_repeats(gm: torch.fx.GraphModule) -> int:
    """Merge each mergeable call (_MERGEABLE_OPS, _MERGEABLE_FUNCTIONS) into an earlier one with the same arguments,
    where nothing in between may have written into their memory; returns how many it merged."""
    roots, first, written_at = {}, {}, {}  # written_at: memory root -> position of the last write into it
    last_write, merged = -1, 0              # (last_write: of any root)
    for position, node in enumerate(list(gm.graph.nodes)):
        _memory_root(node, roots)  # in graph order: each lookup then recurses one level at most
        key = _merge_key(node)
        if key is not None:
            earlier = first.get(key)
            reads = {_memory_root(a, roots) for a in node.all_input_nodes}
            written = last_write if _ANY in reads else max([written_at.get(_ANY, -1)]
                                                             + [written_at.get(r, -1) for r in reads])
            if earlier is not None and written < earlier[1]:
                node.replace_all_uses_with(earlier[0])
                gm.graph.erase_node(node)
                merged += 1
                continue
            first[key] = (node, position)
        targets = _mutated_arguments(node)
        for target in [_ANY] if targets is None else targets:
            if target is _ANY or isinstance(target, torch.fx.Node):
                written_at[target if target is _ANY else _memory_root(target, roots)] = last_write = position
    if merged:
        gm.recompile()
    return merged


def _example(node) -> Optional[torch.Tensor]:
    """The (fake) tensor dynamo traced for a node, or None."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _private_fresh(node) -> bool:
    """Whether node is a fresh call's output (_memory_root) that nothing but its one user reads."""
    return isinstance(node, torch.fx.Node) and _memory_root(node, {}) is node and len(node.users) == 1


def drop_unit_scaling(gm: torch.fx.GraphModule) -> int:
    """Remove ``x / 1.0`` and ``x * 1.0`` nodes (diffusers' rescale_output_factor, one a UNet attention: a kernel
    that copies its input) where x is floating point, fresh and read by nothing else, so that no write through the
    result can reach other memory; returns how many it removed."""
    def unit(node) -> bool:
        if not (node.op == "call_function" and node.target in (operator.truediv, operator.mul) and len(node.args) == 2
                and not node.kwargs and type(node.args[1]) is float and node.args[1] == 1.0
                and _private_fresh(node.args[0])):
            return False
        x = _example(node.args[0])
        return x is not None and x.is_floating_point()
    return _bypass(gm, unit)


def _layer_norm_of_sum(node) -> Optional[tuple]:
    """(add node, view node, C, weight, bias, eps) where node is sdkernels::group_norm with one group, no SiLU,
    residual or shift, of ``(a + b).view(-1, C, 1)`` (patchers.layer_norm's LayerNorm) with a, b and the norm's
    parameters (graph inputs: defined before the sum) as add_layer_norm's kernel takes them (the eager chain's
    test); else None."""
    from .patchers.transformer_block import fusable
    if node.op != "call_function" or _op_name(node.target) != "sdkernels::group_norm":
        return None
    args = list(node.args) + [None] * (8 - len(node.args))
    for i, name in enumerate(("x", "num_groups", "weight", "bias", "eps", "silu", "residual", "shift")):
        if name in node.kwargs:
            args[i] = node.kwargs[name]
    rows, groups, weight, bias, eps, silu, residual, shift = args
    if groups != 1 or silu is not False or residual is not None or shift is not None:
        return None
    if not (isinstance(rows, torch.fx.Node) and rows.op == "call_method" and rows.target == "view"
            and len(rows.args) == 4 and rows.args[1] == -1 and rows.args[3] == 1 and type(rows.args[2]) is int):
        return None
    total = rows.args[0]
    if not (isinstance(total, torch.fx.Node) and total.op == "call_function" and total.target is operator.add
            and len(total.args) == 2 and not total.kwargs):
        return None
    a, b = (_example(t) for t in total.args)
    C = rows.args[2]
    if a is None or b is None or a.dim() < 2 or a.shape[-1] != C:
        return None
    parameters = [_example(p) for p in (weight, bias)]
    if any(p is not None and (t is None or tuple(t.shape) != (C,) or p.op not in ("placeholder", "get_attr"))
           for p, t in zip((weight, bias), parameters)):
        return None
    return (total, rows, C, weight, bias, eps) if fusable(a, b, *parameters) else None


def fuse_add_layer_norms(gm: torch.fx.GraphModule) -> int:
    """Where the graph already calls sdkernels::add_layer_norm (transformer_add_norm is patched in), fuse each other
    ``layer_norm(a + b)`` (as patchers.layer_norm traces it) into that op too: a transformer block's last add and the
    next block's norm1, which eagerly link across the two blocks' calls (patchers.transformer_block's chain) but not
    in a trace, where each block runs on its own (SDXL's chained blocks). The sum keeps its other readers. Returns how
    many it fused."""
    op = torch.ops.sdkernels.add_layer_norm.default
    if not any(_op_name(n.target) == "sdkernels::add_layer_norm" for n in gm.graph.nodes if n.op == "call_function"):
        return 0
    fused = 0
    for node in list(gm.graph.nodes):
        found = _layer_norm_of_sum(node)
        if found is None:
            continue
        total, rows, C, weight, bias, eps = found
        with gm.graph.inserting_after(total):  # before every reader of the sum
            both = gm.graph.call_function(op, (total.args[0], total.args[1], weight, bias, eps))
        with gm.graph.inserting_after(both):
            new_total = gm.graph.call_function(operator.getitem, (both, 0))
        with gm.graph.inserting_after(new_total):
            normed = gm.graph.call_function(operator.getitem, (both, 1))
        with gm.graph.inserting_after(normed):
            normed_rows = gm.graph.call_method("view", (normed, -1, C, 1))
        node.replace_all_uses_with(normed_rows)
        gm.graph.erase_node(node)
        if not rows.users:
            gm.graph.erase_node(rows)
        total.replace_all_uses_with(new_total)
        gm.graph.erase_node(total)
        fused += 1
    if fused:
        gm.recompile()
    return fused


def flat_backend(gm: torch.fx.GraphModule, example_inputs):
    """A dynamo backend that runs the traced graph as it is, without idle dropouts, unit scalings and repeated calls,
    each add + LayerNorm one op where the model has that op, its sdkernels ops called directly."""
    drop_idle_dropouts(gm)
    drop_unit_scaling(gm)
    fuse_add_layer_norms(gm)
    merge_repeats(gm)
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
        for hook in BEFORE_CALL:
            hook()
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
