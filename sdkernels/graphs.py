"""CUDA graphs for patched models: ``sdkernels.patch(pipe, cuda_graph=True)``.

The UNet's forward and the VAE's decode are replaced on the instance by a ``GraphedCall``, which keeps one CUDA graph
per input signature (shapes, dtypes, devices and strides of the tensor arguments, the values of the others, the keys
of the dicts among them), captured by ``benchmarking.as_cuda_graph`` on the first call of that signature; all graphs
of one model share one memory pool, since they never run at the same time. Each call copies its tensors into the
graph's static inputs, replays it, and returns a clone of its static output (see ``GraphedCall.__call__``).

A graph replays the kernels it captured on the memory it captured them with. So weights changed in place (LoRA
fused by an in-place add, ``load_state_dict``) are followed, and anything that changes which memory or code a call
uses drops every graph of the model, found by comparing ``fingerprint(model)`` with the last call's.
When a graph cannot serve a call (tensors off the GPU, autograd recording, an argument that should be a tensor and
is not, torch.compile tracing, a capture already running) the model runs eagerly, with a one-time
``SdkernelsFallbackWarning`` where the user can do something about it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import weakref
from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import tuning
from .benchmarking import as_cuda_graph
from .dispatch import SdkernelsFallbackWarning
from .shadow import ShadowMethod, attach, detach, unshadow

_GRAPHED = "_sdkernels_graphed"  # on a model: its GraphedCall
_SILENT = ""                     # an eager reason the user cannot act on (they are compiling or capturing already)
# Arguments other than tensors that a signature can hold: compared by value (with their type, so True != 1).
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format)


@dataclasses.dataclass(frozen=True)
class Target:
    """Which method of a model runs through graphs, the arguments that must be tensors for a graph to serve the
    call (a Python number there would be frozen into the graph), and the arguments the method does not read."""
    method: str
    tensors: tuple
    ignored: tuple = ()


UNET = Target("forward", ("sample", "timestep", "encoder_hidden_states"))
# AutoencoderKL.decode takes a generator that it does not use; pipelines pass theirs, which must not stop a graph.
VAE_DECODE = Target("decode", ("z",), ignored=("generator",))


def target(model: nn.Module) -> Optional[Target]:
    """The Target of a diffusers UNet2DConditionModel or AutoencoderKL; None for any other model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    if isinstance(model, UNet2DConditionModel):
        return UNET
    return VAE_DECODE if isinstance(model, AutoencoderKL) else None


def install(model: nn.Module, label: str = "") -> bool:
    """Put a GraphedCall on the model's target method (nothing if one is there already); False for a model that
    has no target."""
    t = target(model)
    if t is None:
        return False
    attach(model, _GRAPHED, lambda: GraphedCall(model, t, label or type(model).__name__))
    return True


def uninstall(model: nn.Module) -> None:
    """Take the GraphedCall off the model and free its graphs."""
    detach(model, _GRAPHED)


def graphed(model: nn.Module) -> Optional["GraphedCall"]:
    return model.__dict__.get(_GRAPHED)


def signature_key(*args, **kwargs) -> Optional[tuple]:
    """The key of the graph that serves a call with these arguments; None when one of them is neither a tensor nor
    a plain value (a graph would freeze whatever it is)."""
    leaves, spec = tree_flatten((args, kwargs))
    return _key(spec, leaves)


def _key(spec, leaves) -> Optional[tuple]:
    key = [spec]  # the structure: which arguments were given, the keys of the dicts among them
    for x in leaves:
        if isinstance(x, torch.Tensor):
            key.append((x.shape, x.stride(), x.dtype, x.device))
        elif isinstance(x, _PLAIN):
            key.append((type(x), x))
        else:
            return None
    return tuple(key)


def fingerprint(model: nn.Module) -> tuple:
    """What a captured graph depends on besides its inputs, cheap enough to compute on every call: per module its
    identity, its instance forward, attention processor and hook counts, each parameter and buffer's identity,
    address and requires_grad, and the adapter state of peft LoRA layers. It changes when a parameter tensor is
    replaced or moved (``param.data = ...``, ``.to()``), a module is added, removed or patched, or LoRA adapters are
    loaded, switched, merged or unloaded; not when weights are written in place.

    Why a per-call walk and not hooks: peft's merge assigns ``weight.data``, set_adapters changes Python floats and
    lists, processors are plain attributes; no registration hook sees those, and a missed change silently replays
    stale kernels. Ids are compared, not objects, so nothing freed is kept alive."""
    parts = []
    add = parts.append  # flat appends, and module state read from __dict__: this loop runs on every call
    stack = [model]
    while stack:
        m = stack.pop()
        if m is None:  # a child slot set to None
            continue
        d = m.__dict__
        add(id(m))
        add(id(d.get("forward")))
        add(id(d.get("processor")))
        add(len(d["_forward_hooks"]) + len(d["_forward_pre_hooks"]))
        for t in d["_parameters"].values():
            if t is not None:
                add(id(t))
                add(t.data_ptr())
                add(t.requires_grad)
        for t in d["_buffers"].values():
            if t is not None:
                add(id(t))
                add(t.data_ptr())
        if "merged_adapters" in d:  # a peft BaseTunerLayer: its adapter state decides what forward computes
            add(_adapter_state(d))
        children = d["_modules"]
        add(len(children))
        stack.extend(children.values())
    return tuple(parts)


def _adapter_state(d: dict) -> tuple:
    active = d.get("_active_adapter")
    # scalings rounded: diffusers multiplies and divides them around a call with a LoRA scale
    return (tuple(active) if isinstance(active, list) else active, tuple(d["merged_adapters"]),
            d.get("_disable_adapters"), tuple(sorted((k, round(v, 9)) for k, v in d.get("scaling", {}).items())))


class GraphedCall:
    """The graphs of one model's target method, installed as an instance attribute that shadows the method."""

    def __init__(self, model: nn.Module, t: Target, label: str):
        self.model, self.target, self.label = model, t, label
        self.shadowed = model.__dict__.get(t.method)  # an instance attribute we shadow (None: the class method)
        self.original = getattr(model, t.method)
        self.signature = inspect.signature(self.original)
        self.graphs = {}          # signature key -> (static input leaves, replay), or None: that capture failed
        self.pool = None
        self.state = None         # fingerprint(model) when the graphs were captured
        self.needs_grad = False   # whether a parameter required grad at that fingerprint
        self.tensors = None       # (weak reference, address) of each parameter and buffer at that fingerprint
        self.warned = set()
        self.open = True

        self.method = model.__dict__[t.method] = ShadowMethod(self, self.original)

    def __getstate__(self):
        """Copied (``copy.deepcopy`` of the model) and pickled (``torch.save``) without graphs: CUDA graphs and their
        pool neither copy nor pickle; the new model, its own target bound to it, captures its own."""
        state = self.__dict__.copy()
        state.update(graphs={}, pool=None, state=None, tensors=None, warned=set())
        return state

    def __call__(self, *args, **kwargs):
        """The graph of this signature, replayed on copies of these arguments; eager where no graph can serve.

        The output is a clone of the graph's static output, not the static output itself (which torch.compile's
        reduce-overhead returns, to be overwritten by the next replay): pipelines consume a UNet output at once, but
        multistep schedulers keep some (DPMSolver's epsilon history), and a decoded image is kept by its caller;
        the clone costs microseconds against a step of milliseconds."""
        if not self.open or torch.compiler.is_compiling():
            return self.original(*args, **kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return self.original(*args, **kwargs)  # the method's own error message
        arguments = {k: v for k, v in bound.arguments.items() if k not in self.target.ignored}
        reason = self._why_eager(arguments)
        leaves, spec = tree_flatten(arguments)
        key = None if reason is not None else _key(spec, leaves)
        if reason is None and key is None:
            reason = self._eager("an argument is neither a tensor nor a plain value: " + ", ".join(
                sorted({type(x).__name__ for x in leaves if not isinstance(x, (torch.Tensor,) + _PLAIN)})))
        if reason is None:
            out = self._replay_then_check(key, leaves)
            if out is not None:
                return out
            reason = self._check_state()
        entry = None if reason is not None else self.graphs.get(key, False)
        if entry is False:
            entry = self.graphs[key] = self._capture(spec, leaves)
        if entry is None:
            return self.original(*args, **kwargs)
        return self._replay(entry, leaves)

    @staticmethod
    def _replay(entry, leaves):
        static, replay = entry
        for s, x in zip(static, leaves):
            if isinstance(x, torch.Tensor):
                s.copy_(x)
        return tree_map(lambda y: y.clone() if isinstance(y, torch.Tensor) else y, replay())

    def _replay_then_check(self, key, leaves):
        """The replay of this signature's graph, launched before the model's fingerprint is compared (about a
        millisecond of Python on the SD1.5 UNet): the comparison then runs while the GPU works, where a loop that
        waits for the GPU every step (DDIM's scheduler indexes a CPU tensor by the GPU timestep) would otherwise
        leave the GPU idle for it. None, and nothing launched, unless every parameter and buffer seen at capture is
        alive at the address the graph reads (so the replay reads mapped memory holding the current weights); None
        after the replay if the fingerprint differs (a module, forward, processor or adapter changed): its output
        is discarded and the caller's check drops the graphs."""
        entry = self.graphs.get(key)
        if not entry or self.tensors is None or (torch.is_grad_enabled() and self.needs_grad):
            return None
        for ref, address in self.tensors:
            t = ref()
            if t is None or t.data_ptr() != address:
                return None
        out = self._replay(entry, leaves)
        return out if fingerprint(self.model) == self.state else None

    def _why_eager(self, arguments: dict) -> Optional[str]:
        """Why no graph can serve a call with these arguments (None if one can). 0-dim CPU tensors among CUDA ones
        (a scheduler's timestep) are moved to the GPU here, as the UNet itself would do it."""
        if "_hf_hook" in self.model.__dict__:
            return self._eager("accelerate hooks (enable_model_cpu_offload) move its weights between calls")
        for name in self.target.tensors:
            if name in arguments and not isinstance(arguments[name], torch.Tensor):
                return self._eager(f"{name} is a {type(arguments[name]).__name__}, not a tensor: pass a tensor "
                                   "on the model's device")
        device = next((x.device for x in tree_flatten(arguments)[0] if isinstance(x, torch.Tensor) and x.is_cuda),
                      None)
        if device is None:
            return self._eager("its inputs are not on a CUDA GPU")
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor) and value.is_cpu and value.dim() == 0:
                arguments[name] = value.to(device)
        tensors = [x for x in tree_flatten(arguments)[0] if isinstance(x, torch.Tensor)]
        if any(x.device != device for x in tensors):
            return self._eager(f"its inputs are on several devices: {sorted({str(x.device) for x in tensors})}")
        if torch.cuda.is_current_stream_capturing():
            return _SILENT  # an outer capture (torch.compile's, the caller's) records the eager call
        if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
            return self._eager("autograd is recording (an input requires grad): run it under torch.no_grad()")
        return None

    def _check_state(self) -> Optional[str]:
        """Drop the graphs if the model changed since they were captured; refuse while autograd would record it."""
        state = fingerprint(self.model)
        if state != self.state:
            self.drop()
            self.state = state
            self.needs_grad = any(p.requires_grad for p in self.model.parameters())
            # the memory a graph captured now reads (weak references: nothing replaced is kept alive)
            self.tensors = [(weakref.ref(t), t.data_ptr()) for t in (*self.model.parameters(), *self.model.buffers())]
        if torch.is_grad_enabled() and self.needs_grad:
            return self._eager("autograd is recording (parameters require grad): run it under torch.no_grad() "
                               "or call model.requires_grad_(False)")
        return None

    def _capture(self, spec, leaves):
        """(static input leaves, replay) of a new graph for this signature; None, with a warning, if capture fails
        (the method did something a graph cannot hold, e.g. a host sync): that signature then runs eagerly."""
        static = [torch.empty_like(x).copy_(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        device = next(x.device for x in leaves if isinstance(x, torch.Tensor) and x.is_cuda)
        call = functools.partial(self._call_with, spec, static)
        try:
            with torch.cuda.device(device):
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                with tuning.optimizing_for("device"):  # a replay pays GPU time only: its choices minimize that
                    return static, as_cuda_graph(call, pool=self.pool)
        except Exception as e:  # noqa: BLE001  (whatever broke the capture, eager still computes the call)
            self._eager(f"its CUDA graph capture failed ({type(e).__name__}: {e})")
            return None

    def _call_with(self, spec, leaves):
        b = inspect.BoundArguments(self.signature, tree_unflatten(leaves, spec))
        return self.original(*b.args, **b.kwargs)

    def _eager(self, reason: str) -> str:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"sdkernels: {self.label}.{self.target.method} runs without CUDA graphs: {reason}",
                          SdkernelsFallbackWarning, stacklevel=4)
        return reason

    def drop(self) -> None:
        """Free every graph (after the GPU has finished any replay of them) and their pool."""
        if self.graphs and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.graphs.clear()
        self.pool = None

    def close(self) -> None:
        """Free the graphs and put the method back. If another library has wrapped our method since (accelerate's
        hooks do), it stays in place and calls straight through to the original."""
        self.drop()
        self.open = False
        unshadow(self.model, self.target.method, self.method, self.shadowed)
