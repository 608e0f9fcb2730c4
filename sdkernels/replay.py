"""Recorded op calls for flat graphs (sdkernels.flat): each sdkernels op node runs its implementation once more while
a recorder watches, and from then on replays what it saw, without the Python in between.

A flat graph's op node runs the same work every call: dynamo guards the graph's input shapes, strides, dtypes and
devices, the graph fixes every other argument, and an op's dispatch, plans and launch parameters are functions of
those and of its tensors' 16-byte alignment. What the Python of a call does that reaches the GPU or memory goes
through three doors, and the recorder stands at each: aten ops (a TorchDispatchMode: allocations, views, fills,
cuBLAS), Triton launches (kernels.launch's cached launches: the compiled kernel, grid and arguments), and the CUDA
extension's calls (sdkernels._ext). A replay runs those steps in order, with the call's own tensors in place of the
recorded ones; its Python is a loop over a few steps, where the implementation's is ~50 function calls (input
checks, dispatch, plans, launchers).

A recording is kept only where it is complete and repeatable; otherwise the node runs its implementation as before:
- every tensor a step used came from the call's arguments or from an earlier step (not from a cache kept across
  calls, such as Winograd's transformed filters);
- every dispatch reused its remembered selection (a fresh selection may measure backends, or be unsettled), and
  every Triton launch was a cached launch's repeat (a first launch compiles; launches outside kernels.launch, and
  the interpreter's, are not seen);
- no aten op's result depends on tensor values (a host read such as ``.item()``, a data-dependent shape), and no
  step returned anything but tensors, ints (sizes) and None.
Composite aten ops (SDPA) are recorded as the ops they run (the dispatch mode sees those); their choices, made in
C++ from shapes and global flags (torch.backends' SDPA switches), are fixed at the recording.
Recordings are kept per node and per tuple of its tensors' alignments (the one thing dynamo does not guard); a node
whose recording failed MAX_ATTEMPTS times runs its implementation for good. (An op that kept state across calls
would replay wrongly: sdkernels has none; flat graphs compute the linear groups and the shared time-embedding SiLU
as plain calls merged by sdkernels.flat.) Nothing is replayed while a backend is forced (``use_backend``,
SDKERNELS_BACKEND), a launch hook is set (a profiler), cached launches are off, or ``SDKERNELS_REPLAY=0``;
``allowed()`` says so and sdkernels.flat asks it once per graph call.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _ext, dispatch
from ._env import ENVIRON, getenv

MAX_ATTEMPTS = 3      # recordings tried per node and alignments before the node keeps to its implementation
MAX_PROGRAMS = 64     # per node; alignments that keep changing start over
_VALUE_DEPENDENT = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
active = False        # set by sdkernels.flat around a graph call: replay (and record) in this call


def _launch_module():
    """sdkernels.kernels.launch, or None without Triton (then no Triton launch can happen at all)."""
    try:
        from .kernels import launch
    except ImportError:  # pragma: no cover - triton ships with CUDA torch
        return None
    return launch


def allowed() -> bool:
    """Whether replays may run now (see the module docstring)."""
    if dispatch._local.stack or dispatch._BACKEND_KNOB in ENVIRON or getenv("SDKERNELS_REPLAY", "1") == "0":
        return False
    launch = _launch_module()
    return launch is None or (launch.ENABLED and not launch._hooked())


class _Recording(TorchDispatchMode):
    """Runs an op call and writes down its steps: (function, arguments with None where a tensor goes, ((position,
    tensor index), ...), keyword arguments, which results become tensors of their own: None, -1 for the result itself
    or a tuple of positions, and (stream getter, device) for a Triton launch's stream or None)."""

    def __init__(self, inputs):
        super().__init__()
        self.tensors = list(inputs)  # every tensor a step may use, by index (kept alive: their ids stay unique)
        self.index = {id(t): i for i, t in enumerate(self.tensors)}
        self.steps = []
        self.spoiled = None          # why the recording cannot be replayed, or None
        self.in_extension = False

    def spoil(self, why: str) -> None:
        if self.spoiled is None:
            self.spoiled = why

    def template(self, values, skip: int = 0):
        """(values with None where a tensor goes, ((position + skip, tensor index), ...))."""
        constants, where = [], []
        for position, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                index = self.index.get(id(value))
                if index is None:
                    self.spoil("a tensor from outside the call's arguments and steps")
                where.append((position + skip, index))
                value = None
            elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
                self.spoil("a list of tensors as an argument")
            constants.append(value)
        return constants, tuple(where)

    def keywords(self, kwargs) -> dict:
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            self.spoil("a tensor as a keyword argument")
        return dict(kwargs)

    def keep(self, result):
        """Index the new tensors of a step's result; returns the step's result spec (see the class docstring)."""
        if isinstance(result, torch.Tensor):
            return -1 if self._adopt(result) else None
        if isinstance(result, (tuple, list)):
            new = []
            for position, value in enumerate(result):
                if isinstance(value, torch.Tensor):
                    if self._adopt(value):
                        new.append(position)
                else:
                    self._check_plain(value)
            return tuple(new) or None
        self._check_plain(result)
        return None

    def _adopt(self, tensor) -> bool:
        """Index a step's result tensor; False where it is one already known (an in-place op returns its input)."""
        if id(tensor) in self.index:
            return False
        self.index[id(tensor)] = len(self.tensors)
        self.tensors.append(tensor)
        return True

    def _check_plain(self, value) -> None:
        """A step's result besides tensors may be None or an int (a size: SDPA's inner ops return the sequence
        lengths to SDPA's C++ code), never a bool or a float (a value read from a tensor, such as is_nonzero's)."""
        if value is not None and (type(value) is not int):
            self.spoil(f"a step returned a {type(value).__name__}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.in_extension:  # the extension call is the step
            return result
        if any(tag in func.tags for tag in _VALUE_DEPENDENT):
            self.spoil(f"{func} depends on tensor values")
        constants, where = self.template(args)
        # (the overload's own C++ callable: OpOverload.__call__ is a Python layer that only calls it)
        self.steps.append((getattr(func, "_op", func), constants, where, self.keywords(kwargs), self.keep(result),
                           None))
        return result

    def extension_call(self, call, function, args, kwargs):
        """Run an extension function (sdkernels._ext) and record it as one step, replayed through ``call``."""
        self.in_extension = True
        try:
            error = function(*args, **kwargs)
        finally:
            self.in_extension = False
        if error:
            raise RuntimeError(error)
        constants, where = self.template(args)
        self.steps.append((call, constants, where, self.keywords(kwargs), None, None))

    def launched(self, run, grid, device, tail):
        """A cached Triton launch (kernels.launch): ``run(*grid, stream, *tail)``."""
        constants, where = self.template(tail, skip=4)
        stream = (_launch_module()._stream, device)
        self.steps.append((run, [*grid, None, *constants], where, {}, None, stream))

    def output(self, result):
        """The op's result as tensor indices: an index, a tuple or list of them, or None."""
        if isinstance(result, torch.Tensor):
            index = self.index.get(id(result))
            if index is None:
                self.spoil("a result from outside the recorded steps")
            return index
        if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
            return type(result)(self.output(r) for r in result)
        if result is not None:
            self.spoil(f"the op returned a {type(result).__name__}")
        return None


def record(implementation, args, inputs):
    """Run ``implementation(*args)`` under a recorder; returns (its result, (steps, output) or None, why not)."""
    recording = _Recording(inputs)
    launch = _launch_module()
    spoiled_runs = _spoil_other_launches(recording)
    misses = dispatch.misses
    _ext.recorder = recording
    if launch is not None:
        launch.recorder = recording
    try:
        with recording:
            result = implementation(*args)
    finally:
        _ext.recorder = None
        if launch is not None:
            launch.recorder = None
        for cls, run in spoiled_runs:
            cls.run = run
    if dispatch.misses != misses:
        recording.spoil("a dispatch selected afresh")
    output = recording.output(result)
    if recording.spoiled is not None:
        return result, None, recording.spoiled
    return result, (tuple(recording.steps), output), None


def _spoil_other_launches(recording):
    """Make Triton's own launch paths (JITFunction.run: a first launch, an uncached kernel; the interpreter's) spoil
    the recording while it lasts; returns [(class, its run)] to put back."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - triton ships with CUDA torch
        pass
    saved = []
    for cls in classes:
        run = cls.__dict__["run"]

        def spoiling_run(self, *args, _run=run, **kwargs):
            recording.spoil("a Triton launch outside kernels.launch's cached ones")
            return _run(self, *args, **kwargs)
        cls.run = spoiling_run
        saved.append((cls, run))
    return saved


def replay(steps, output, tensors):
    """Run recorded steps on this call's tensors (the op's tensor arguments, in order); returns the op's result."""
    for function, args, where, kwargs, results, stream in steps:
        if where or stream is not None:
            args = args.copy()
            for position, index in where:
                args[position] = tensors[index]
            if stream is not None:
                args[3] = stream[0](stream[1])
        result = function(*args, **kwargs)
        if results is not None:
            if results == -1:
                tensors.append(result)
            else:
                for position in results:
                    tensors.append(result[position])
    if output.__class__ is int:
        return tensors[output]
    if output is None:
        return None
    return type(output)(tensors[i] for i in output)


class RecordedCall:
    """A flat graph's sdkernels op node: the op's implementation, recorded at a call and replayed after (see the
    module docstring)."""

    def __init__(self, op_name: str, implementation):
        self.op_name = op_name
        self.implementation = implementation
        self.__name__ = "replayed_" + op_name.split("::")[-1]  # FX's generated code names its targets
        self.__module__ = __name__
        self.positions = None  # the tensor arguments' positions (set at the first call), or False: never recorded
        self.programs = {}     # alignments -> (steps, output), or the failed attempts so far
        self.why_not = None    # why the last recording failed (for logs and tests)

    def __call__(self, *args, **kwargs):
        if not active or kwargs:
            return self.implementation(*args, **kwargs)
        positions = self.positions
        if positions is None:
            positions = self.positions = _tensor_positions(args)
        if positions is False:
            return self.implementation(*args)
        tensors, key = [], 0
        for i in positions:
            tensor = args[i]
            tensors.append(tensor)
            key = key << 4 | tensor.data_ptr() & 15
        program = self.programs.get(key, 0)
        if program.__class__ is tuple:
            return replay(program[0], program[1], tensors)
        if program >= MAX_ATTEMPTS:
            return self.implementation(*args)
        if len(self.programs) >= MAX_PROGRAMS:
            self.programs.clear()
        result, recorded, self.why_not = record(self.implementation, args, tensors)
        self.programs[key] = recorded if recorded is not None else program + 1
        return result


def _tensor_positions(args):
    """Positions of the plain tensor arguments, or False where another argument holds a tensor (a tensor subclass, a
    list of tensors): such a call is never recorded."""
    positions = []
    for i, a in enumerate(args):
        if type(a) in dispatch.PLAIN_TENSORS:
            positions.append(i)
        elif isinstance(a, torch.Tensor) or (isinstance(a, (list, tuple))
                                             and any(isinstance(v, torch.Tensor) for v in a)):
            return False
    return tuple(positions)
