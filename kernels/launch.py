"""Launching a Triton kernel again without Triton's per-call bookkeeping.

``kernel[grid](*args)`` goes through JITFunction.run on every call: binding and specializing the arguments, building
the compile options from Triton's knobs, the cache key, a check of the kernel's globals, the launch metadata. On an
H100 host that is 24 us a launch, of which the launch itself (CompiledKernel.run) is 9 (scripts/probe_launch_cost.py),
and a patched UNet step without CUDA graphs is bound by such host time (issue 5).

``@cached_launch`` over ``@triton.jit`` makes a kernel remember, per launch signature, the compiled kernel that
Triton's own path returned, and launch it directly when the signature comes again. The signature is everything
Triton specializes on, or more: each tensor's dtype and whether its address is 16-byte aligned, every other
argument by type and value (floats by type: Triton never specializes on a float's value), the keyword arguments
(constexprs, num_warps, ...) by value, and the device. Anything else (a TMA descriptor, a callable grid, a launch hook
set by a profiler, a warm-up) takes Triton's path. In Triton's interpreter the decorator changes nothing.
``SDKERNELS_CACHED_LAUNCH=0`` turns it off (read at import; ``ENABLED`` at run time)."""
import inspect

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .._env import getenv

ENABLED = getenv("SDKERNELS_CACHED_LAUNCH", "1") != "0"
# While sdkernels.replay records an op call: the recorder, told of every launch (see CachedLaunchJITFunction.run)
recorder = None
MAX_SIGNATURES = 1024  # per kernel; shapes that keep changing start the cache over
_PLAIN = (int, bool, str, type(None))
_PLAIN_CLASSES = frozenset(_PLAIN)


def _device():
    """The current device, as Triton's own path asks for it (sdkernels.compile_check stands in a driver there)."""
    return driver.active.get_current_device()


def _stream(device):
    return driver.active.get_current_stream(device)


def signature_key(args, kwargs):
    """The launch signature of (args, kwargs), or None where an argument is of a kind not keyed here. (By exact type
    first: most arguments are ints, and this runs on every launch.)"""
    parts = []
    for a in args:
        cls = a.__class__
        if cls in _PLAIN_CLASSES:
            parts.append((cls, a))
        elif cls is float:
            parts.append(float)
        elif isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, float):
            parts.append(float)
        elif isinstance(a, _PLAIN):  # a subclass of int or str (an IntEnum, say): keyed by its class and value
            parts.append((cls, a))
        else:
            return None
    return _device(), tuple(parts), tuple(kwargs.items())


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's): Triton 3.6 keeps None there when none is, later versions an
    empty HookChain."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


class CachedLaunchJITFunction(JITFunction):
    """A JITFunction whose repeated launches skip JITFunction.run (see the module docstring)."""

    def run(self, *args, grid, warmup, **kwargs):
        if warmup or not ENABLED or callable(grid) or _hooked():
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        key = signature_key(args, kwargs)
        try:
            hit = self.__dict__.get("_launches", {}).get(key) if key is not None else None
        except TypeError:  # an unhashable keyword value
            key = hit = None
        if hit is None:
            if recorder is not None:
                recorder.spoil("a kernel's first launch of a signature")
            kernel = super().run(*args, grid=grid, warmup=warmup, **kwargs)
            if key is not None and kernel is not None:
                self._remember(key, kernel, len(args), kwargs)
            return kernel
        kernel, tail = hit
        values = (*args, *[kwargs[name] if name in kwargs else default for name, default in tail])
        grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        kernel.run(*grid, _stream(key[0]), kernel.function, kernel.packed_metadata, None, None, None, *values)
        if recorder is not None:
            recorder.launched(kernel.run, grid, key[0], (kernel.function, kernel.packed_metadata, None, None, None,
                                                         *values))
        return kernel

    def _remember(self, key, kernel, n_args, kwargs):
        """Store the compiled kernel with how to complete a call's positional arguments to the kernel's parameter
        list: the rest of the parameters in order, each from the call's keywords or its default."""
        launches = self.__dict__.setdefault("_launches", {})
        if len(launches) >= MAX_SIGNATURES:
            launches.clear()
        parameters = list(inspect.signature(self.fn).parameters.values())[n_args:]
        if any(p.name not in kwargs and p.default is inspect.Parameter.empty for p in parameters):
            return  # Triton's own error for a missing argument comes from its path
        launches[key] = (kernel, [(p.name, p.default) for p in parameters])


def cached_launch(kernel):
    """Decorator over @triton.jit (see the module docstring); the interpreter's kernels are returned unchanged."""
    if type(kernel) is JITFunction:
        kernel.__class__ = CachedLaunchJITFunction
    return kernel
