"""Per-shape backend choice by measurement, once per GPU: the chooser that keeps a patched model from ever running an
op slower than the fastest way this machine has (including the eager reference itself).

``measured_chooser(op)`` returns a chooser for ``dispatch.set_chooser``. The first time it meets an input signature
(dtypes, shapes and strides of the tensors, values of the small arguments) on a GPU, it times every backend that can
run those inputs and the op's reference with CUDA events (median of a few calls after a warm-up), keeps the fastest,
and stores it in memory and in a JSON file per GPU and software versions (``~/.cache/sdkernels/tuning``, or
``$SDKERNELS_CACHE/tuning``), so a later process starts from the choices of an earlier one. It never measures
inside a CUDA-graph capture or torch.compile tracing, nor on a CPU, nor with ``SDKERNELS_TUNING=0``: there it defers
to the op's rule (the chooser it had before), as it does for a signature it has not measured.

``MeasuredChoice`` is the same for any set of equivalent computations that are not one op's backends, e.g. the
resnet_block patcher's fused block against the unfused one.

What a choice minimizes depends on how the call will run (``optimizing_for``): "call" (the default), one call's time
from its launch on an idle GPU, host overhead included, which is what a step without CUDA graphs pays (launch-bound
at SD sizes); "device", the GPU time alone (calls queued behind a sleeping kernel, each after an L2 flush, as inside a
step), which is what a CUDA-graph replay pays. sdkernels.graphs measures its warm-up calls for "device". Each
signature is measured once per objective.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import re
import statistics
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from . import dispatch
from ._env import ENVIRON, cache_dir, env_key, getenv
from .benchmarking import l2_cache_bytes

WARMUP_CALLS = 2
TIMED_CALLS = 7
_lock = threading.Lock()


def signature(*args) -> tuple:
    """What decides which backend is fastest: each tensor's dtype, shape and strides, small arguments by value,
    floats by type only (an eps or a scale does not change the speed)."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((str(a.dtype), tuple(a.shape), a.stride()))
        elif a is None or isinstance(a, (bool, int, str)):
            parts.append(a)
        else:
            parts.append(type(a).__name__)
    return tuple(parts)


def _event_ms(fn: Callable[[], object]) -> float:
    """One call of fn() in ms from its launch on an idle GPU to its end, host time included (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def cuda_event_ms(fn: Callable[[], object]) -> float:
    """Median time of fn() in ms, CUDA events around each call after a warm-up. Not benchmarking.bench_ms: its
    do_bench allocates an L2-flush buffer and runs for ~100 ms per call, too much inside a model's first call."""
    for _ in range(WARMUP_CALLS):
        fn()
    return statistics.median(_event_ms(fn) for _ in range(TIMED_CALLS))


def alternating_ms(ways: dict) -> dict:
    """{name: ms} for {name: zero-argument callable}: each way's median time as cuda_event_ms takes it, but the ways
    timed in alternation, one call of each per round and the order reversed every other round. A shared host's speed
    drifts by tens of percent within seconds, which ways timed one after the other read as a difference between them
    where a call is host-bound (a whole UNet step without CUDA graphs: sdkernels.step_choice). Under the "device"
    objective (GPU time alone, no host in it) each way is timed by device_ms."""
    if objective() == "device":
        return {name: device_ms(run) for name, run in ways.items()}
    for run in ways.values():
        for _ in range(WARMUP_CALLS):
            run()
    times = {name: [] for name in ways}
    order = list(ways)
    for i in range(TIMED_CALLS):
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(_event_ms(ways[name]))
    return {name: statistics.median(t) for name, t in times.items()}


OBJECTIVES = ("call", "device")


class _Objective(threading.local):
    value = "call"  # a class default: getattr with a fallback raises and catches inside, ~1.4 us per op call


_objective = _Objective()


def objective() -> str:
    """What choices made now minimize: "call" or "device" (see the module docstring)."""
    return _objective.value


@contextlib.contextmanager
def optimizing_for(name: str):
    """Choices made inside minimize ``name`` ("call" or "device"), e.g. the warm-up calls before a CUDA-graph
    capture, whose replays pay GPU time only."""
    if name not in OBJECTIVES:
        raise ValueError(f"sdkernels.tuning: unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    previous = objective()
    _objective.value = name
    try:
        yield
    finally:
        _objective.value = previous


ASSUMED_MAX_CLOCK_HZ = 2.0e9  # above the boost clock of A100/H100/H200: a sleep of n cycles lasts at least n / this


def device_ms(fn: Callable[[], object]) -> float:
    """GPU time of one call of fn() in ms (median), host overhead excluded and the L2 cache cold, as inside a
    model's step where other layers' data evicted this call's weights: TIMED_CALLS calls, each after an L2 flush and
    between two CUDA events of its own, are queued behind a kernel that sleeps for longer than queuing them takes."""
    host_s = math.inf
    for _ in range(WARMUP_CALLS):  # the fastest warm-up call bounds the host time (the first may compile)
        start_host = time.perf_counter()
        fn()
        host_s = min(host_s, time.perf_counter() - start_host)
    flush = torch.empty(2 * l2_cache_bytes(), dtype=torch.int8, device="cuda")
    flush.zero_()  # its kernel loaded now: a module loaded lazily behind the sleep would wait for the sleep to end
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(TIMED_CALLS)]
    torch.cuda._sleep(int(2 * TIMED_CALLS * (host_s + FLUSH_HOST_S) * ASSUMED_MAX_CLOCK_HZ) + 100_000)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


FLUSH_HOST_S = 50e-6  # host time of queuing one flush and two events, generously


def measure_ms(fn: Callable[[], object]) -> float:
    """fn's time by the current objective: cuda_event_ms for "call", device_ms for "device"."""
    return device_ms(fn) if objective() == "device" else cuda_event_ms(fn)


def cache_path() -> Path:
    """One file per GPU model and software versions (sdkernels' own too: its kernels and plans change between
    versions): a choice measured elsewhere says nothing here."""
    root = Path(cache_dir()) / "tuning"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import triton
    from . import __version__
    name = f"{gpu}-sdkernels{__version__}-torch{torch.__version__}-triton{triton.__version__}"
    return root / (re.sub(r"[^A-Za-z0-9.+-]+", "_", name) + ".json")


class MeasuredChoice:
    """Choices among named ways of computing the same thing, one per input signature, measured where
    ``can_measure`` allows and stored under ``name`` in the per-GPU file. ``timer`` and ``can_measure`` are
    replaceable for tests on machines without a GPU; ``alternate`` times the ways in alternation (alternating_ms), for
    host-bound ways on a drifting host."""

    def __init__(self, name: str, timer: Callable = measure_ms, can_measure: Optional[Callable[..., bool]] = None,
                 path: Optional[Path] = None, alternate: bool = False):
        self.name = name
        self.timer = timer
        self.alternate = alternate  # with the default timer: time the ways in alternation (alternating_ms)
        self.can_measure = can_measure or _can_measure
        self.path = path
        self.choices: dict = {}
        self.timings: dict = {}  # signature -> {way: ms}, for reports
        self._loaded = False

    def choose(self, key_args: tuple, ways: Callable[[], dict], default=None):
        """The fastest of ``ways()`` ({name: zero-argument callable}) for inputs like ``key_args``, measured the first
        time; ``default`` (a value or a callable of key_args) where nothing was measured and nothing may be."""
        key = (objective(),) + signature(*key_args)
        choice = self.choices.get(key)
        if choice is not None:
            return choice
        if not self.can_measure(*key_args):
            return default(*key_args) if callable(default) else default
        self._load()
        choice = self.choices.get(key)
        if choice is None and _dry[0]:
            return _call_each_once(ways())
        if choice is None:
            choice = self._measure(key, ways())
        return choice

    def _measure(self, key, ways: dict) -> str:
        if self.alternate and self.timer is measure_ms:
            times = alternating_ms(ways)
        else:
            times = {name: self.timer(run) for name, run in ways.items()}
        choice = min(times, key=times.get)
        with _lock:
            self.choices[key] = choice
            self.timings[key] = times
            self._save()
        self._changed()
        return choice

    def _file(self) -> Path:
        return self.path or cache_path()

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            stored = json.loads(self._file().read_text()).get(self.name, {})
        except (OSError, ValueError):
            return
        for entry in stored:
            self.choices.setdefault(_as_key(entry["signature"]), entry["choice"])
        self._changed()

    def _changed(self) -> None:
        """Called after choices were added."""

    def _save(self) -> None:
        path = self._file()
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            data = {}
        data[self.name] = [{"signature": key, "choice": choice, "ms": self.timings.get(key)}
                           for key, choice in self.choices.items()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)  # atomic: processes tuning at once never leave half a file
        except OSError:
            pass  # a read-only home: the choices stay in memory


class MeasuredChooser(MeasuredChoice):
    """A dispatch chooser (``dispatch.set_chooser``) that measures the op's backends that can run an input and its
    reference (see the module docstring); ``rule`` (the op's previous chooser) answers where it does not measure."""

    def __init__(self, op_name: str, rule: Optional[Callable] = None, **kwargs):
        super().__init__(op_name, **kwargs)
        self.op_name = op_name
        self.rule = rule

    def __call__(self, *args) -> Optional[str]:
        timed = []  # the backends ways() offered: those not chosen let go of what their runs kept
        choice = self.choose(args, lambda: self._ways(args, timed), default=self.rule)
        for backend in timed:
            if backend.release is not None and backend.name != choice:
                backend.release(*args)
        return choice

    # dispatch remembers a selection per objective and per whether measuring is off, and only once it is final: the
    # measured choice, or the rule's answer where the default can_measure never measures these inputs (measuring off,
    # or no CUDA tensor first: the device is in dispatch's call key). A choice added later can answer for a remembered
    # signature (signatures leave out the device), so it makes the op select afresh (_changed).
    @staticmethod
    def scope():  # _measuring_off() written out: this runs on every op call
        return _objective.value, (not _enabled[0]
                                  or (_TUNING_KNOB in ENVIRON and getenv("SDKERNELS_TUNING", "1") == "0"))

    def settled(self, *args) -> bool:
        if (objective(),) + signature(*args) in self.choices:
            return True
        if self.can_measure is not _can_measure:
            return False
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return _measuring_off() or first is None or not first.is_cuda

    def _changed(self) -> None:
        op = dispatch.ops().get(self.op_name)
        if op is not None:
            op.forget_selections()

    def _ways(self, args, timed: list) -> dict:
        op = dispatch.ops()[self.op_name]
        timed += [b for b in op.backends if b.measured and (b.why_not(*args) or b.available()) is None]
        ways = {b.name: (lambda run=b.run: run(*args)) for b in timed}
        ways[dispatch.REFERENCE] = lambda: op.reference(*args)
        return ways


_dry = [False]


@contextlib.contextmanager
def dry_run():
    """Inside, a choice that would be measured calls each way once instead, untimed, keeps nothing and answers the
    first way: sdkernels.precompile's dry call, which records the kernels every way launches (and launches none)."""
    previous = _dry[0]
    _dry[0] = True
    try:
        yield
    finally:
        _dry[0] = previous


def _call_each_once(ways: dict) -> str:
    for run in ways.values():
        run()
    return next(iter(ways))


def _as_key(value):
    """JSON turned the signature's tuples into lists: back to (hashable) tuples."""
    return tuple(_as_key(v) for v in value) if isinstance(value, list) else value


_enabled = [False]  # set by enable(): measuring is what patch() asks for (tune=True), not a side effect of importing
_TUNING_KNOB = env_key("SDKERNELS_TUNING")  # read per op call: `in ENVIRON` first, no call where it is unset


def _measuring_off() -> bool:
    return not _enabled[0] or (_TUNING_KNOB in ENVIRON and getenv("SDKERNELS_TUNING", "1") == "0")


def _can_measure(*args) -> bool:
    if _measuring_off():
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not tensors[0].is_cuda:
        return False
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return False
    return not any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors)


def enable(op_names=None) -> dict:
    """Install a measured chooser on the given ops (default: every op but those that write into their inputs), each
    keeping the op's own rule for what it has not measured; returns {op name: chooser}. Idempotent. From then on
    other MeasuredChoices may measure too."""
    _enabled[0] = True
    installed = {}
    for name, op in dispatch.ops().items():
        if (op_names is not None and name not in op_names) or op.in_place:  # timing would rewrite live tensors
            continue
        if not isinstance(op.chooser, MeasuredChooser):
            dispatch.set_chooser(name, MeasuredChooser(name, rule=op.chooser))
        installed[name] = op.chooser
    return installed
