"""Swap sdkernels ops into diffusers models, and back.

    sdkernels.patch(pipe)                  # every registered patcher, on pipe.unet, pipe.vae, ...
    sdkernels.patch(unet, ops=["group_norm"])
    sdkernels.unpatch(pipe)                # every patched module exactly as it was

This module is the op-agnostic frame: a ``Patcher`` finds the modules it can speed up in a model, says why it
leaves the others alone, patches one module in place and restores it. The patchers themselves (what diffusers
code they mirror, which op they call) live in ``sdkernels.patchers``.

Rules every patcher follows, through the helpers below:
  * patch instances, never classes: a replaced ``forward`` is a method bound on the instance, and the one it
    replaces is kept to be called when our path cannot run (autograd, autocast, inputs the op does not take) and
    to be put back by ``unpatch``;
  * patching is idempotent: a module already patched by a patcher is counted, not patched again (patch() only
    adds: to change which ops are patched, unpatch first);
  * a module taken over by one patcher (a GroupNorm fused into its ResNet block) is skipped by later ones.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import banded, flat as flat_steps, graphs, layout, precompile, step_choice, tuning, weights

logger = logging.getLogger("sdkernels")

# Pipeline attributes that hold the models we patch; text encoders and tokenizers are left alone.
MODEL_ATTRIBUTES = ("unet", "vae", "transformer", "controlnet")

_PATCHED_BY = "_sdkernels_patched_by"          # on a patched module: names of the patchers that patched it
_ORIGINAL_FORWARD = "_sdkernels_original_forward"
_SWAPPED_CHILDREN = "_sdkernels_swapped_children"
_SUMMARY = "_sdkernels_summary"                # on a patched model: its PatchSummary


@dataclass(frozen=True)
class Patcher:
    """One kind of replacement. ``find`` yields (qualified name, module) candidates; ``why_not`` says why a
    candidate cannot be patched (None when it can); ``apply`` patches it in place, keeping on the module what
    ``restore`` needs; ``covers`` names the submodules a patched module has taken over, which later patchers
    must leave alone."""
    name: str
    find: Callable[[nn.Module], Iterable[tuple]]
    apply: Callable[[nn.Module], None]
    restore: Callable[[nn.Module], None]
    why_not: Callable[[nn.Module], Optional[str]] = lambda module: None
    covers: Callable[[nn.Module], Iterable[nn.Module]] = lambda module: ()
    # Applied by patch() without ``ops``; False for a patcher whose kernels have not yet passed the GPU lane (it
    # then runs only where named in ``ops``).
    default: bool = True


_registry: list = []  # in priority order: an earlier patcher takes a module before a later one sees it


def register(patcher: Patcher, before: Optional[str] = None) -> Patcher:
    """Add a patcher last in the priority order, or right ahead of the registered patcher named ``before`` (to take
    modules that one would otherwise take)."""
    if any(p.name == patcher.name for p in _registry):
        raise ValueError(f"sdkernels.patch: a patcher named {patcher.name!r} is already registered")
    names = [p.name for p in _registry]
    if before is not None and before not in names:
        raise ValueError(f"sdkernels.patch: cannot register {patcher.name!r} before {before!r}, which is not "
                         f"registered; registered: {names}")
    _registry.insert(len(names) if before is None else names.index(before), patcher)
    return patcher


def patchers() -> list:
    """The registered patchers, in priority order."""
    _load_patchers()
    return list(_registry)


def default_ops() -> list:
    """Names of the patchers that patch() applies without ``ops`` (add opt-in ones to this list to run them too)."""
    return [p.name for p in patchers() if p.default]


@dataclass
class PatchSummary:
    """What patch() did to one model: modules patched per patcher, and the candidates left with the reason."""
    model: str
    replaced: dict = field(default_factory=dict)   # patcher name -> number of modules it has patched
    left: list = field(default_factory=list)       # (qualified module name, patcher name, reason)

    def __str__(self) -> str:
        replaced = ", ".join(f"{k} {v}" for k, v in self.replaced.items()) or "nothing selected"
        line = f"sdkernels.patch {self.model}: replaced {replaced}"
        if self.left:
            groups = Counter((p, reason) for _, p, reason in self.left)
            line += "; left " + "; ".join(f"{p} x{n} ({reason})" for (p, reason), n in groups.items())
        return line


def patch(pipe_or_model, *, ops: Optional[Iterable[str]] = None, cuda_graph: bool = False,
          channels_last: bool = True, tune: bool = True, low_memory: bool = False, flat: bool = False):
    """Apply the patchers named in ``ops`` (default: default_ops()) to every model of a pipeline, or to one nn.Module.
    Logs one line per model on the "sdkernels" logger and returns its argument; ``summary()`` reads the result.
    With ``channels_last``, each model's 4-D weights are laid out channels_last first (sdkernels.layout), so its
    activations are NHWC from the first conv on, as the kernels and cuDNN run fastest (what every measured number in
    README used); unpatch() puts the original layout back. On by default: the modules left unreplaced then compute on
    NHWC weights, equal to the unpatched model within cuDNN's own algorithm noise, not bit for bit (pass False for
    that). diffusers' save_pretrained packs each tensor before safetensors writes it, so it works while patched.
    With ``cuda_graph``, each UNet2DConditionModel and each AutoencoderKL's decode also run through CUDA graphs, one
    per input signature (sdkernels.graphs); on a model patched before, this adds just the graphs. With ``tune``
    (default), each op, the first time it meets an input shape on a GPU, times its backends and eager PyTorch and
    keeps the fastest, remembered on disk per GPU (sdkernels.tuning), so no patched op runs slower than eager; and
    without ``cuda_graph``, a UNet's first step of each input signature is timed with the patched modules and with
    the original ones, and the faster runs from then on (sdkernels.step_choice). With ``low_memory``, activations of
    64 MiB and more (the VAE decoder from 512 px on) go through their ResNet blocks and upsamplers in bands of rows
    (sdkernels.banded): the same result with a lower peak, at some speed. With ``flat`` (no ``cuda_graph``), each
    UNet's forward runs as one dynamo-traced graph per input signature, without diffusers' module code around the ops
    (sdkernels.flat): less host time a step, after a trace of seconds on the second call."""
    if flat and cuda_graph:
        raise ValueError("sdkernels.patch: flat=True and cuda_graph=True: choose one (a graph replays no Python)")
    selected = _select(ops)
    if tune:
        tuning.enable()
    for label, model in _models(pipe_or_model):
        if channels_last:
            layout.to_channels_last(model)
        result = _patch_model(model, label, selected)
        _mark_low_memory(model, low_memory)
        model.__dict__[_SUMMARY] = result
        logger.info("%s", result)
        if result.replaced.get("conv3x3"):  # its Winograd backend keeps transformed filters
            weights.install(model)  # fuse_lora and unfuse_lora then forget them
        if any(result.replaced.values()):  # innermost of the method's shadows: graphs and step choice call it
            precompile.install(model, _precompiled_method(model))
        if cuda_graph:
            step_choice.uninstall(model)  # graphs replay GPU time only, where the patched modules are the faster
            flat_steps.uninstall(model)
            if not graphs.install(model, label):
                logger.info("sdkernels.patch %s: no CUDA graphs: only UNet2DConditionModel and AutoencoderKL take "
                            "them", label)
        elif flat:
            graphs.uninstall(model)
            step_choice.uninstall(model)  # back on top of the flat call: it then weighs two flat steps
            flat_steps.install(model)
            if tune and any(result.replaced.values()):
                step_choice.install(model, flat=True)
        elif tune and any(result.replaced.values()) and graphs.graphed(model) is None:
            step_choice.install(model)
    return pipe_or_model


def unpatch(pipe_or_model):
    """Put back every module that patch() changed in these models, exactly as it was; returns its argument."""
    _load_patchers()
    by_name = {p.name: p for p in _registry}
    for _, model in _models(pipe_or_model):
        graphs.uninstall(model)
        step_choice.uninstall(model)  # outermost shadow first
        flat_steps.uninstall(model)
        precompile.uninstall(model)
        weights.uninstall(model)
        _mark_low_memory(model, False)
        for module in list(model.modules()):  # restoring may swap children back in, so walk a snapshot
            names = module.__dict__.get(_PATCHED_BY, ())
            for name in reversed(names):
                if name not in by_name:
                    raise RuntimeError(f"sdkernels.unpatch: {type(module).__name__} was patched by {name!r}, "
                                       "which is not registered")
                by_name[name].restore(module)
            module.__dict__.pop(_PATCHED_BY, None)
        layout.restore_layout(model)
        model.__dict__.pop(_SUMMARY, None)
    return pipe_or_model


def _precompiled_method(model: nn.Module) -> str:
    """The method whose first calls sdkernels.precompile prepares: the one graphs capture (UNet forward, VAE decode)."""
    t = graphs.target(model)
    return t.method if t is not None else "forward"


def _mark_low_memory(model: nn.Module, low_memory: bool) -> None:
    """Mark (or unmark) the patched modules of ``model`` for sdkernels.banded's band forwards."""
    for m in model.modules():
        if low_memory and patched_by(m):
            m.__dict__[banded.LOW_MEMORY] = True
        else:
            m.__dict__.pop(banded.LOW_MEMORY, None)


def summary(pipe_or_model):
    """The PatchSummary of a patched model (None if unpatched), or {attribute: PatchSummary} for a pipeline."""
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model.__dict__.get(_SUMMARY)
    return {label: model.__dict__.get(_SUMMARY) for label, model in _models(pipe_or_model)}


def patched_by(module: nn.Module) -> tuple:
    """Names of the patchers that patched this module (empty if none)."""
    return module.__dict__.get(_PATCHED_BY, ())


# ---- helpers for patchers ------------------------------------------------------------------------------------

def bind_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``forward(module, ...)`` the instance's forward, keeping the one it replaces for original_forward()
    and unbind_forward(). Hooks still run: nn.Module.__call__ looks forward up on the instance."""
    state = module.__dict__
    if _ORIGINAL_FORWARD in state:
        raise RuntimeError(f"sdkernels: the forward of this {type(module).__name__} is already replaced")
    # (the instance attribute it shadows, or None when forward came from the class; the callable to fall back to)
    state[_ORIGINAL_FORWARD] = (state.get("forward"), module.forward)
    state["forward"] = bound_to(forward, module)


def bound_to(function: Callable, module: nn.Module) -> Callable:
    """``function`` bound to ``module`` as a method: a functools.partial rather than a bound method, because a bound
    method pickles as a lookup of its name on the instance, which a function kept in the instance's __dict__ has
    not (``torch.save`` of a patched model would load as an error); a partial pickles the function by its name."""
    return functools.partial(function, module)


def forward_is(module: nn.Module, forward: Callable) -> bool:
    """Whether bind_forward made ``forward`` the instance's forward."""
    bound = module.__dict__.get("forward") if _ORIGINAL_FORWARD in module.__dict__ else None
    return getattr(bound, "func", None) is forward


def original_forward(module: nn.Module) -> Callable:
    return module.__dict__[_ORIGINAL_FORWARD][1]


def unbind_forward(module: nn.Module) -> None:
    shadowed, _ = module.__dict__.pop(_ORIGINAL_FORWARD)
    if shadowed is None:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = shadowed


def swap_child(parent: nn.Module, name: str, replacement: nn.Module) -> None:
    """Register ``replacement`` as ``parent.<name>``, keeping the child it replaces for restore_child()."""
    swapped = parent.__dict__.setdefault(_SWAPPED_CHILDREN, {})
    if name in swapped:
        raise RuntimeError(f"sdkernels: {type(parent).__name__}.{name} is already swapped")
    swapped[name] = parent._modules[name]
    parent._modules[name] = replacement


def restore_child(parent: nn.Module, name: str) -> None:
    swapped = parent.__dict__[_SWAPPED_CHILDREN]
    parent._modules[name] = swapped.pop(name)
    if not swapped:
        del parent.__dict__[_SWAPPED_CHILDREN]


def why_not_plain(module, cls: type, what: str, *, hooks_matter: bool) -> Optional[str]:
    """None when ``module`` is a ``cls`` running ``cls.forward`` unchanged (and, if ``hooks_matter``, with no
    hooks that a fused path would skip); otherwise why not, naming it ``what``."""
    if not isinstance(module, cls):
        return f"{what} is {type(module).__name__}, not {cls.__name__}"
    if type(module).forward is not cls.forward:
        return f"{what} is {type(module).__name__}, a {cls.__name__} with its own forward"
    if "forward" in module.__dict__:
        return f"{what}'s forward is replaced on the instance ({_replaced_by(module)})"
    if hooks_matter and (module._forward_hooks or module._forward_pre_hooks):
        return f"{what} has forward hooks, which the fused path would not call"
    return None


# Whether running_originals is on: a module global, not a threading.local, because dynamo before torch 2.13 reads a
# threading.local's class default instead of the thread's value, so the flat graph traced for the original modules
# (sdkernels.flat) ran the patched ones (seen with torch 2.11). Process-wide: another thread's patched calls inside
# the block run the original code too, which computes the same.
_running_originals = False


@contextlib.contextmanager
def running_originals():
    """Inside, every patched module runs its original code, as the unpatched model would (sdkernels.step_choice
    times a step both ways)."""
    global _running_originals
    previous = _running_originals
    _running_originals = True
    try:
        yield
    finally:
        _running_originals = previous


def originals_running() -> bool:
    return _running_originals


def must_run_original(*tensors) -> bool:
    """True when our ops cannot stand in for the original module: autograd has to record it (our ops have no
    backward), autocast is on for the tensors' device (it changes dtypes in ways the original module defines), or
    inside ``running_originals``."""
    if _running_originals:
        return True
    # Plain loops: torch.compile (2.11) cannot trace bool() of a list.
    grad = torch.is_grad_enabled()
    first = None
    for t in tensors:
        if t is None:
            continue
        if grad and t.requires_grad:
            return True
        first = t if first is None else first
    return first is not None and _autocast_enabled(first.device.type)


def _autocast_enabled_before_2_4(device_type: str) -> bool:
    """torch before 2.4 took no device type: the flag was CUDA's, and CPU had its own."""
    return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _takes_device_type() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        return False
    return True


# Asked on every patched module's call: torch's own function where it takes a device type, without a wrapper.
_autocast_enabled = torch.is_autocast_enabled if _takes_device_type() else _autocast_enabled_before_2_4


def _replaced_by(module) -> str:
    if _ORIGINAL_FORWARD in module.__dict__:
        names = patched_by(module)
        return f"by sdkernels {', '.join(names)}" if names else "by sdkernels, as part of its parent's patch"
    return "by another library, e.g. an accelerate offload hook"


# ---- internals -----------------------------------------------------------------------------------------------

def _load_patchers() -> None:
    from . import patchers  # noqa: F401  (importing it registers them)


def _select(ops) -> list:
    _load_patchers()
    if ops is None:
        ops = default_ops()
    if isinstance(ops, str):
        ops = [ops]
    wanted = list(ops)
    known = [p.name for p in _registry]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"sdkernels.patch: unknown ops {unknown}; known: {known}")
    return [p for p in _registry if p.name in wanted]


def _models(obj) -> list:
    """[(label, model)] for an nn.Module, a dict of components, or a pipeline-like object, each model once."""
    if isinstance(obj, nn.Module):
        return [(type(obj).__name__, obj)]
    source = obj if isinstance(obj, dict) else getattr(obj, "components", None)
    if not isinstance(source, dict):
        source = {name: getattr(obj, name, None) for name in MODEL_ATTRIBUTES}
    found, seen = [], set()
    for name in MODEL_ATTRIBUTES:
        model = source.get(name)
        if isinstance(model, nn.Module) and id(model) not in seen:
            seen.add(id(model))
            found.append((f"{name} ({type(model).__name__})", model))
    if not found:
        raise TypeError(f"sdkernels.patch: expected an nn.Module or a diffusers pipeline with any of "
                        f"{', '.join(MODEL_ATTRIBUTES)} as nn.Modules, got {type(obj).__name__}")
    return found


def _patch_model(model: nn.Module, label: str, selected: list) -> PatchSummary:
    result = PatchSummary(label, {p.name: 0 for p in selected})
    covered: set = set()  # ids of modules taken over by a patched module
    for patcher in selected:
        for qualified_name, module in patcher.find(model):
            if id(module) in covered:
                continue
            if patcher.name not in patched_by(module):
                reason = patcher.why_not(module)
                if reason is not None:
                    result.left.append((qualified_name, patcher.name, reason))
                    continue
                patcher.apply(module)
                module.__dict__[_PATCHED_BY] = patched_by(module) + (patcher.name,)
            result.replaced[patcher.name] += 1
            covered.update(id(m) for m in patcher.covers(module))
    return result
