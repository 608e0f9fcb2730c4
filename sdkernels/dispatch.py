"""Backend selection shared by every sdkernels op.

Each op owns an ordered list of backends (fastest first), and optionally a chooser that prefers one per input. A
backend declares what it supports through
``why_not(*args)``, which returns None when it can run the inputs and a short reason otherwise. Dispatch walks the
list; when nothing fits, the op's reference runs and one warning per (op, reasons) says why.

A backend can be forced with ``SDKERNELS_BACKEND=name`` (or ``op=name,op2=name``) or with ``use_backend``.
Forcing is a preference: an input the forced backend cannot run still takes the reference path with a warning,
unless ``strict=True`` (tests use that to be sure the backend they test really ran).
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

from ._env import getenv

REFERENCE = "reference"


class SdkernelsFallbackWarning(UserWarning):
    """An input ran on the eager reference because no fast backend supports it."""


@dataclass
class Backend:
    name: str
    run: Callable
    why_not: Callable[..., Optional[str]]
    # Why the whole backend is unavailable on this machine (no GPU, extension not built, ...), or None.
    available: Callable[[], Optional[str]] = lambda: None


@dataclass
class Op:
    name: str
    reference: Callable
    backends: list = field(default_factory=list)
    # A per-input preference among the backends (a rule from measurements, e.g. by size), consulted only when no
    # backend is forced: chooser(*args) -> a backend name, REFERENCE (run the reference, no warning), or None for the
    # priority order. A preferred backend that cannot run the inputs is passed over like any other.
    chooser: Optional[Callable[..., Optional[str]]] = None

    def register(self, backend: Backend) -> Backend:
        self.backends.append(backend)
        return backend

    def reasons(self, *args) -> dict:
        """Every backend's reason for not running these inputs (None where it would)."""
        out = {}
        for b in self.backends:
            out[b.name] = b.why_not(*args) or b.available()
        return out

    def select(self, *args) -> Backend | None:
        forced, strict = _forced(self.name)
        candidates = self.backends
        if forced is not None:
            if forced == REFERENCE:
                return None
            candidates = [b for b in self.backends if b.name == forced]
            if not candidates:
                known = ", ".join([b.name for b in self.backends] + [REFERENCE])
                raise ValueError(f"sdkernels::{self.name}: unknown backend {forced!r}; known: {known}")
        elif self.chooser is not None:
            preferred = self.chooser(*args)
            if preferred == REFERENCE:  # measured faster than every backend here (see sdkernels.tuning)
                return None
            if preferred is not None:
                candidates = sorted(candidates, key=lambda b: b.name != preferred)
        reasons = {}
        for b in candidates:
            reason = b.why_not(*args) or b.available()
            if reason is None:
                return b
            reasons[b.name] = reason
        detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        if strict:
            raise RuntimeError(f"sdkernels::{self.name}: forced backend {forced!r} cannot run these inputs ({detail})")
        _warn_once(self.name, detail)
        return None

    def __call__(self, *args):
        backend = self.select(*args)
        _last_backend[self.name] = backend.name if backend else REFERENCE
        if backend is None:
            return self.reference(*args)
        return backend.run(*args)


_ops: dict[str, Op] = {}
_last_backend: dict[str, str] = {}
_warned: set = set()
_local = threading.local()


def define(name: str, reference: Callable) -> Op:
    op = Op(name, reference)
    _ops[name] = op
    return op


def set_chooser(op_name: str, chooser: Optional[Callable[..., Optional[str]]]) -> None:
    """Install (or with None remove) an op's per-input backend preference (see Op.chooser)."""
    _ops[op_name].chooser = chooser


def ops() -> dict:
    return dict(_ops)


def last_backend(op_name: str) -> str | None:
    """Which backend ran the last call of an op in this process (for tests and logs)."""
    return _last_backend.get(op_name)


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None, strict: bool = False):
    """Force a backend (for one op, or all) inside the block."""
    stack = getattr(_local, "stack", [])
    _local.stack = stack + [(op, name, strict)]
    try:
        yield
    finally:
        _local.stack = stack


def forced_backend(op_name: str) -> str | None:
    """The backend forced for an op (use_backend or SDKERNELS_BACKEND), or None."""
    return _forced(op_name)[0]


def _forced(op_name: str):
    for op, name, strict in reversed(getattr(_local, "stack", ())):
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
                  stacklevel=4)
