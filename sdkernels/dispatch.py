"""Backend selection shared by every sdkernels op.

Each op owns an ordered list of backends (fastest first), and optionally a chooser that prefers one per input. A
backend declares what it supports through
``why_not(*args)``, which returns None when it can run the inputs and a short reason otherwise. Dispatch walks the
list; when nothing fits, the op's reference runs and one warning per (op, reasons) says why.

A backend can be forced with ``SDKERNELS_BACKEND=name`` (or ``op=name,op2=name``) or with ``use_backend``.
Forcing is a preference: an input the forced backend cannot run still takes the reference path with a warning,
unless ``strict=True`` (tests use that to be sure the backend they test really ran).

An op remembers its selection per call key (each tensor's dtype, shape, strides, device and 16-byte alignment, the
other arguments by type and value, the op's and the chooser's scope): the backends' why_not and the chooser cost
microseconds of Python per call, which a step without CUDA graphs pays for every op, while a model meets few keys
(at most MAX_SELECTIONS are kept per op). This assumes that
``why_not``, ``available`` and a plain chooser are functions of that key; a chooser that is not (a measured one
before it has measured) says so through ``settled(*args)``, and nothing is remembered while a backend is forced.
Whatever changes a rule (a test patching a module constant) calls ``forget_selections()``.

An op's input check (``check(*args)``, which raises for invalid inputs) runs in the dispatch where the call key
misses or where there is none: a remembered key passed it, so it must be a function of the key as well (what it
reads of a tensor: dtype, shape, strides, device; of another argument: its type and value). An invalid input is
never remembered, so it fails the same way at every call.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._env import ENVIRON, env_key, getenv

REFERENCE = "reference"
_BACKEND_KNOB = env_key("SDKERNELS_BACKEND")  # (`in ENVIRON` before getenv: no call where it is unset)
MAX_SELECTIONS = 4096
# Tensor types a backend may run directly on (a Parameter is a plain tensor to the kernels); any other subclass (a
# fake or functional tensor, DTensor, ...) goes through torch.ops, where its own dispatch handles it.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# Argument types known not to be tensors: keyed without an isinstance check.
SCALARS = (int, float, bool, str, type(None))


class SdkernelsFallbackWarning(UserWarning):
    """An input ran on the eager reference because no fast backend supports it."""


@dataclass
class Backend:
    name: str
    run: Callable
    why_not: Callable[..., Optional[str]]
    # Why the whole backend is unavailable on this machine (no GPU, extension not built, ...), or None.
    available: Callable[[], Optional[str]] = lambda: None
    # Whether measured dispatch (sdkernels.tuning) times it; False: it runs only where forced or first to take an
    # input, e.g. a backend slower everywhere it was measured whose first call also caches per-weight state.
    measured: bool = True
    # Called with the inputs when measured dispatch timed this backend and chose another: let go of what its runs
    # kept for later calls (Winograd's transformed filter), or None.
    release: Optional[Callable] = None


class Op:
    """An op's backends (``register``, fastest first), its reference and its chooser (see the module docstring)."""

    def __init__(self, name: str, reference: Callable, scope: Optional[Callable[[], object]] = None,
                 in_place: bool = False, check: Optional[Callable[..., None]] = None):
        self.name = name
        self.reference = reference
        # Writes into its inputs: running it again on the same arguments gives another result, so it must never be
        # timed on a model's live tensors (sdkernels.tuning leaves it to its rule).
        self.in_place = in_place
        # What the backends' rules read besides the inputs (a hashable, part of the call key), or None
        self.scope = scope
        # The op's input check (raises for invalid inputs), or None: run where the call key misses (see the module
        # docstring), before any backend is selected.
        self.check = check
        self.backends: list = []
        self._chooser: Optional[Callable[..., Optional[str]]] = None
        self._chooser_scope: Optional[Callable[[], object]] = None  # the chooser's ``scope``, read when it is set
        self._selections: dict = {}  # call key -> (backend or None for the reference, fallback warning or None)

    # A per-input preference among the backends (a rule from measurements, e.g. by size), consulted only when no
    # backend is forced: chooser(*args) -> a backend name, REFERENCE (run the reference, no warning), or None for the
    # priority order. A preferred backend that cannot run the inputs is passed over like any other.
    @property
    def chooser(self) -> Optional[Callable[..., Optional[str]]]:
        return self._chooser

    @chooser.setter
    def chooser(self, chooser) -> None:
        self._chooser = chooser
        self._chooser_scope = getattr(chooser, "scope", None)
        self._selections.clear()

    def register(self, backend: Backend) -> Backend:
        self.backends.append(backend)
        self._selections.clear()
        return backend

    def reasons(self, *args) -> dict:
        """Every backend's reason for not running these inputs (None where it would)."""
        out = {}
        for b in self.backends:
            out[b.name] = b.why_not(*args) or b.available()
        return out

    def select(self, *args) -> Backend | None:
        return self._select(args)[0]

    def _select(self, args) -> tuple:
        """(the backend to run, or None for the reference; the fallback warning's text, or None)."""
        forced, strict = _forced(self.name)
        candidates = self.backends
        if forced is not None:
            if forced == REFERENCE:
                return None, None
            candidates = [b for b in self.backends if b.name == forced]
            if not candidates:
                known = ", ".join([b.name for b in self.backends] + [REFERENCE])
                raise ValueError(f"sdkernels::{self.name}: unknown backend {forced!r}; known: {known}")
        elif self._chooser is not None:
            preferred = self._chooser(*args)
            if preferred == REFERENCE:  # measured faster than every backend here (see sdkernels.tuning)
                return None, None
            if preferred is not None:
                candidates = sorted(candidates, key=lambda b: b.name != preferred)
        reasons = {}
        for b in candidates:
            reason = b.why_not(*args) or b.available()
            if reason is None:
                return b, None
            reasons[b.name] = reason
        detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        if strict:
            raise RuntimeError(f"sdkernels::{self.name}: forced backend {forced!r} cannot run these inputs ({detail})")
        return None, detail

    def __call__(self, *args):
        global misses
        try:
            key = self._call_key(args)
        except Exception:  # an input without strides (a sparse tensor, say): the check's error first, as before
            if self.check is not None:
                self.check(*args)
            raise
        selection = None
        if key is not None:
            try:
                selection = self._selections[key]
            except KeyError:
                pass
            except TypeError:  # an unhashable argument (a list, say): selected each time
                key = None
        if selection is None:
            misses += 1
            if self.check is not None:
                self.check(*args)
            selection = self._select(args)
            if key is not None and self._settled(args):
                if len(self._selections) >= MAX_SELECTIONS:  # shapes that keep changing: start over
                    self._selections.clear()
                self._selections[key] = selection
        backend, fallback = selection
        if backend is None:
            _last_backend[self.name] = REFERENCE
            if fallback is not None:
                _warn_once(self.name, fallback)
            return self.reference(*args)
        _last_backend[self.name] = backend.name
        return backend.run(*args)

    def _call_key(self, args):
        """What the selection depends on (see the module docstring), or None where it must not be remembered."""
        if _local.stack or (_BACKEND_KNOB in ENVIRON and getenv("SDKERNELS_BACKEND")):
            return None
        # Each argument's part; a tensor subclass (a fake or functional tensor, ...) is not keyed; the others with
        # their type: 1, 1.0 and True are one dict key, but a check may tell them apart. (A plain loop: a list
        # comprehension is a call of its own.)
        parts = ()
        for a in args:
            cls = type(a)
            if cls in PLAIN_TENSORS:
                parts += ((a.dtype, a.shape, a.stride(), a.device, a.data_ptr() % 16),)
            elif cls in SCALARS or not isinstance(a, torch.Tensor):
                parts += ((cls, a),)
            else:
                return None
        scope = self._chooser_scope
        return (scope() if scope is not None else None, self.scope() if self.scope is not None else None, *parts)

    def _settled(self, args) -> bool:
        settled = getattr(self._chooser, "settled", None)
        return settled is None or settled(*args)

    def forget_selections(self) -> None:
        self._selections.clear()


_ops: dict[str, Op] = {}
misses = 0  # calls that selected afresh (sdkernels.replay records only calls whose every dispatch remembered)
_last_backend: dict[str, str] = {}
_warned: set = set()
class _Local(threading.local):
    stack = ()  # a class default: read on every op call, without getattr's call


_local = _Local()


def define(name: str, reference: Callable, scope: Optional[Callable[[], object]] = None, in_place: bool = False,
           check: Optional[Callable[..., None]] = None) -> Op:
    op = Op(name, reference, scope, in_place, check)
    _ops[name] = op
    return op


def set_chooser(op_name: str, chooser: Optional[Callable[..., Optional[str]]]) -> None:
    """Install (or with None remove) an op's per-input backend preference (see Op.chooser)."""
    _ops[op_name].chooser = chooser


def forget_selections() -> None:
    """Every op selects afresh at its next call (after a change to what its backends' rules read)."""
    for op in _ops.values():
        op.forget_selections()


def ops() -> dict:
    return dict(_ops)


def last_backend(op_name: str) -> str | None:
    """Which backend ran the last call of an op in this process (for tests and logs)."""
    return _last_backend.get(op_name)


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None, strict: bool = False):
    """Force a backend (for one op, or all) inside the block."""
    stack = _local.stack
    _local.stack = stack + ((op, name, strict),)
    try:
        yield
    finally:
        _local.stack = stack


def forced_backend(op_name: str) -> str | None:
    """The backend forced for an op (use_backend or SDKERNELS_BACKEND), or None."""
    return _forced(op_name)[0]


def _forced(op_name: str):
    for op, name, strict in reversed(_local.stack):
        if op is None or op == op_name:
            return name, strict
    env = getenv("SDKERNELS_BACKEND", "").strip()
    if not env:
        return None, False
    for part in env.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            return key.strip(), False
        if key.strip() == op_name:
            return value.strip(), False
    return None, False


def _warn_once(op_name: str, detail: str) -> None:
    key = (op_name, detail)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"sdkernels::{op_name} runs on the eager reference: {detail}", SdkernelsFallbackWarning,
                  stacklevel=3)
