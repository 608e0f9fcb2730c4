"""Linears that read the same input tensor, run as one GEMM.

A UNet step projects the same tensor through many small nn.Linear layers: every cross-attention's to_k and to_v read
the text states (32 GEMMs of 154 rows per SD1.5 step, 4-5 us launches each), every ResnetBlock2D's time_emb_proj
reads SiLU of the time embedding (22 GEMVs), each self-attention's to_q, to_k and to_v read one normalized
activation. A ``LinearGroup`` lays its members' weights side by side in one buffer, and each member's weight (and
bias) becomes a view of its rows: no memory is added, and in-place changes of a weight (``load_state_dict``,
``fuse_lora``'s merge, ``weight.data.copy_``) are changes of the buffer. The first member called on an input computes
every member's output with one ``F.linear`` over the buffer; each other member called on that very tensor (same
object, same version counter) in that forward takes its columns of the result, a strided view.

Each computed result serves each member once: the next call of a member it has served (the next forward) computes
again, so a CUDA graph captures the GEMM in every forward it records, and a result never outlives the forward that
made it. A member whose weight no longer is its view (``weight.data = ...``, ``model.to(...)``) makes the group lay
the current weights out again before it computes. Where a call cannot take the group's result (another input, a
member wrapped by LoRA or given hooks, autograd or autocast, torch.compile), the member runs as the module it is.
A flat graph (sdkernels.flat) keeps the group: its trace records each member's projection as a call of the op
``sdkernels::linear_group_all`` on the group's buffers (every member's output) and the member's columns of it, and
flat's backend merges the calls on one input into one.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import flat
from .patch import must_run_original

logger = logging.getLogger("sdkernels")

_LINK = "_sdkernels_linear_group"  # member.__dict__ key: (group, index)
# Results made and replaced before a second member took theirs: members that do not share their input after all.
_MAX_WASTED = 3
# Every LinearGroup alive (keep_intact's list: the groups flat graphs read).
_GROUPS = weakref.WeakSet()


class LinearGroup:
    """nn.Linear ``members`` of one in_features, dtype and device, all with a bias or all without, that read the same
    input. ``extras`` (optional, one per member, a 1-D parameter of the member's out_features or None) are added to
    the member's output in the same pass, e.g. the conv bias that joins a time embedding; they become views of one
    buffer too."""

    def __init__(self, name: str, members: Sequence[nn.Linear], extras: Optional[Sequence] = None):
        self.name = name
        self.members = list(members)
        self.extras = list(extras) if extras is not None else [None] * len(self.members)
        widths = [m.out_features for m in self.members]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self.columns = [slice(s, s + w) for s, w in zip(starts, widths)]
        self.weight = self.bias = self.extra = None
        self._result = None  # (weak reference to the input, its version, capturing, output, served flags)
        self._wasted = 0
        self.broken = None  # why the group no longer computes (its members then run as modules)
        self._register()
        self._link()

    def _register(self) -> None:
        _GROUPS.add(self)

    def __getstate__(self):
        # (a pickled model: a result held mid-forward refers to its input weakly, which does not pickle)
        return {**self.__dict__, "_result": None}

    def __setstate__(self, state):  # a copy (deepcopy, torch.load) is a group of its own, kept intact too
        self.__dict__.update(state)
        self._register()

    # ---- the buffers ----------------------------------------------------------------------------------------------

    def _link(self) -> bool:
        """Lay the members' current weights (biases, extras) into fresh buffers, each member's its view. False
        (and the group stops) when they no longer fit one buffer."""
        weights = [m.weight.detach() for m in self.members]
        kinds = {(w.dtype, w.device, w.shape[1]) for w in weights}
        biases = [m.bias for m in self.members]
        if len(kinds) != 1 or len({b is None for b in biases}) != 1:
            self.broken = "members' weights differ in dtype, device, in_features or bias"
            return False
        if any(e is not None and (e.shape != (m.out_features,) or e.dtype != weights[0].dtype
                                  or e.device != weights[0].device) for m, e in zip(self.members, self.extras)):
            self.broken = "an extra bias does not match its member's output"
            return False
        self.weight = _side_by_side(weights, [m.weight for m in self.members], self.columns)
        self.bias = None if biases[0] is None else _side_by_side(
            [b.detach() for b in biases], biases, self.columns)
        present = [e for e in self.extras if e is not None]
        if present:
            tensors = [e.detach() if e is not None else weights[0].new_zeros(m.out_features)
                       for m, e in zip(self.members, self.extras)]
            self.extra = _side_by_side(tensors, self.extras, self.columns)
        self._pointers = self._current_pointers()
        return True

    def _current_pointers(self) -> tuple:
        return tuple([t.data_ptr() for t in self._parameters()])  # a list, not a generator: one call, not one an item

    def _parameters(self) -> list:
        # (the modules' _parameters dicts, not m.weight: Module.__getattr__ is a Python call, asked every step)
        params = [m._parameters["weight"] for m in self.members]
        params += [b for b in [m._parameters.get("bias") for m in self.members] if b is not None]
        params += [e for e in self.extras if e is not None]
        return params

    def _intact(self) -> bool:
        if self._current_pointers() == self._pointers:
            return True
        logger.info("sdkernels: %s: a member's weight was replaced; its weights are laid out again", self.name)
        return self._link()

    def dissolve(self) -> None:
        """Give each member back a weight (bias, extra) of its own memory, and forget the group."""
        for p in self._parameters():
            p.data = p.data.clone()
        for m in self.members:
            m.__dict__.pop(_LINK, None)
        self.weight = self.bias = self.extra = self._result = None

    # ---- calls ------------------------------------------------------------------------------------------------------

    def output(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Member ``index``'s output for x (plus its extra), from the group's result for x, computed now if there is
        none this member has not yet taken; None where the group has stopped."""
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        version = -1 if x.is_inference() else x._version  # (an inference tensor keeps no version counter)
        result = self._result
        if (result is not None and result[0]() is x and result[1] == version and result[2] == capturing
                and not result[4][index]):
            served = result[4]
        else:
            if self.broken is not None or not self._intact():
                return None
            if result is not None and sum(result[4]) < 2:
                self._wasted += 1
                if self._wasted >= _MAX_WASTED:
                    self.broken = "its members were called on different inputs"
                    logger.info("sdkernels: %s: %s; they run one by one from now on", self.name, self.broken)
                    self._result = None
                    return None
            elif result is not None:
                self._wasted = 0
            out = F.linear(x, self.weight, self.bias)
            if self.extra is not None:
                out.add_(self.extra)
            served = [False] * len(self.members)
            result = self._result = (weakref.ref(x), version, capturing, out, served)
        served[index] = True
        if all(served):
            self._result = None  # every member has its columns: hold no memory past this forward
        return result[3][..., self.columns[index]]


@torch.library.custom_op("sdkernels::linear_group_all", mutates_args=())
def _group_all_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  extra: Optional[torch.Tensor]) -> torch.Tensor:
    """Every member's projection of x (plus its extra), side by side: F.linear over a group's buffers. A flat graph
    (sdkernels.flat) calls it at each member, and flat's backend merges the calls on one input into one."""
    out = F.linear(x, weight, bias)
    return out if extra is None else out.add_(extra)


@_group_all_op.register_fake
def _(x, weight, bias, extra):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def keep_intact() -> None:
    """Lay out again the weights of every group whose members' weights were replaced (a flat graph reads the
    groups' buffers, not the members' weights: sdkernels.flat calls this before each flat call)."""
    for group in list(_GROUPS):
        if group.broken is None and group.weight is not None:
            group._intact()


flat.BEFORE_CALL.append(keep_intact)


def _side_by_side(tensors, params, columns) -> torch.Tensor:
    """One buffer holding ``tensors`` one after the other along dim 0; each of ``params`` becomes its view."""
    buffer = torch.cat(tensors)
    for p, cols in zip(params, columns):
        if p is not None:
            p.data = buffer[cols]
    return buffer


def link(group: LinearGroup) -> None:
    for i, m in enumerate(group.members):
        m.__dict__[_LINK] = (group, i)


def group_of(module: nn.Module) -> Optional[LinearGroup]:
    entry = module.__dict__.get(_LINK)
    return entry[0] if entry is not None else None


def project(module: nn.Module, x: torch.Tensor, plus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """module(x), plus ``plus`` if given: from the module's group where it can be, else by calling the module."""
    entry = module.__dict__.get(_LINK)
    if entry is not None:
        group, index = entry
        if (plus is group.extras[index] and type(module) is nn.Linear and not module._forward_hooks
                and not module._forward_pre_hooks and isinstance(x, torch.Tensor)):
            weight = module.weight  # once: a Module attribute lookup is a Python call
            if (x.dtype == weight.dtype and x.device == weight.device
                    and x.dim() >= 1 and x.shape[-1] == module.in_features and not must_run_original(x, weight)):
                if not torch.compiler.is_compiling():
                    out = group.output(index, x)
                    if out is not None:
                        return out
                elif flat.tracing() and group.broken is None:
                    full = torch.ops.sdkernels.linear_group_all(x, group.weight, group.bias, group.extra)
                    return full[..., group.columns[index]]
    out = module(x)
    return out if plus is None else out + plus
