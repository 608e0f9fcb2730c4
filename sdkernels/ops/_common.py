"""Input checks and layout helpers shared by the op definitions."""
from __future__ import annotations

import functools
import importlib
import sys

import torch

from .._env import ENVIRON
from ..dispatch import PLAIN_TENSORS, SCALARS
from ..kernels import utils as kernel_utils  # imports no Triton
from ..kernels.utils import POISON_KNOB, poisoned  # noqa: F401  (the ops import poisoned from here)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class SdkernelsInputError(ValueError):
    """Invalid input to an sdkernels op (as opposed to a valid input that only the reference supports)."""


def _nothing_intercepts(args) -> bool:
    """True when no one but the op itself needs to see this call: no compiling or tracing (dynamo, fake, functional
    and proxy dispatch modes, torch function modes, functorch transforms, the JIT tracer), only plain tensors, and
    nothing for autograd to record (the ops have no backward: torch.ops says so)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        cls = type(a)
        if cls in PLAIN_TENSORS:
            if grad and a.requires_grad:
                return False
        elif cls not in SCALARS and isinstance(a, torch.Tensor):
            return False
    return True


def call_op(op, *args):
    """torch.ops.sdkernels.<op.name>(*args), or op(*args) (its dispatch) straight away where nothing intercepts the
    call: the same backend runs, without torch.library.custom_op's Python layers (autograd, redispatch, a dynamo
    disable wrapper), which cost more host time per call (~50 us) than a small kernel takes on the GPU. Under
    torch.compile this traces to the op. The op's check (op.check) runs in its dispatch where the call key is new,
    and before torch.ops, whose schema would refuse some invalid inputs with an error of its own (the op's
    implementation, or its fake, checks again)."""
    if _nothing_intercepts(args):
        return op(*args)
    if op.check is not None:
        op.check(*args)
    return getattr(torch.ops.sdkernels, op.name)(*args)


def describe(t) -> str:
    if t is None:
        return "None"
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"
    return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}, stride={t.stride()})"


def fail(op: str, reason: str, **inputs) -> None:
    detail = ", ".join(f"{k}={describe(v)}" for k, v in inputs.items())
    raise SdkernelsInputError(f"sdkernels::{op}: {reason} (got {detail})")


def requirements(op: str, **inputs):
    """``need(ok, reason)`` for an op's input checks: fail(op, reason, **inputs) where not ok. ``reason`` is a string or
    a function that formats one: checks run on every call, and a message formatting dtypes, devices or shapes costs
    microseconds that only a failing call should pay."""
    def need(ok, reason):
        if not ok:
            fail(op, reason() if callable(reason) else reason, **inputs)
    return need


def layout_cached(fn):
    """fn, a pure function of shapes, strides and other hashables, remembered per arguments: backends plan their
    launch from the layout on every call, which costs microseconds of Python, and a model meets few layouts.
    Symbolic sizes (fake tensors under torch.compile) are not hashable: those are computed each time."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def lookup(*args):
        try:
            return cached(*args)
        except TypeError:
            return fn(*args)

    return lookup


def nsc_strides(t: torch.Tensor):
    """Strides (sN, sC, sS) of t seen as (N, C, S) with its spatial dims flattened, or None where the spatial
    dims cannot be flattened into one stride without a copy."""
    return nsc_strides_of(t.shape, t.stride())


@layout_cached
def nsc_strides_of(shape, stride):
    """nsc_strides of a tensor of this shape and stride."""
    spatial = [(n, s) for n, s in zip(shape[2:], stride[2:]) if n != 1]
    if not spatial:  # one spatial position: NCHW and NHWC are the same memory; with unit channel stride, call it NHWC
        return stride[0], stride[1], shape[1] if stride[1] == 1 else 1
    s_stride = spatial[-1][1]
    expected = s_stride
    for n, s in reversed(spatial):
        if s != expected:
            return None
        expected = s * n
    return stride[0], stride[1], s_stride


def is_channels_last_like(t: torch.Tensor) -> bool:
    """Channels vary fastest in memory (NHWC-style): channel stride 1 and spatial stride at least C."""
    return channels_last_like(t.shape, nsc_strides(t))


def channels_last_like(shape, nsc) -> bool:
    """is_channels_last_like of a tensor of this shape and nsc_strides."""
    return nsc is not None and nsc[1] == 1 and shape[1] > 1 and nsc[2] >= shape[1]



def new_output(like: torch.Tensor, shape=None) -> torch.Tensor:
    """An output with ``like``'s dtype and device: with its shape and layout, or contiguous of ``shape`` (poisoned)."""
    out = torch.empty_like(like) if shape is None else like.new_empty(shape)
    return poisoned(out) if POISON_KNOB in ENVIRON else out  # (poisoned only where the variable is set: no call here)


@functools.lru_cache(maxsize=None)  # asked on every call; an import statement costs microseconds
def triton_available():
    """None where Triton can be imported, else why not (a Backend's ``available``)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton ships with CUDA torch
        return f"triton is not importable ({e})"
    return None


def triton_device_why_not(*tensors):
    """Why Triton cannot run on these tensors' device, or None: CUDA tensors, or CPU ones under the interpreter."""
    if kernel_utils.device_ok(*tensors):
        return None
    return (f"tensor on {tensors[0].device.type}: Triton runs CUDA tensors"
            + ("" if kernel_utils.interpreting() else " (or CPU tensors under TRITON_INTERPRET=1)"))


_KERNELS = __name__.rsplit(".", 2)[0] + ".kernels"


def kernels(module: str):
    """The launcher module sdkernels.kernels.<module>, imported on first use (sdkernels imports without Triton): an
    import statement in the backend would cost ~3 us on every call, this a dict lookup."""
    name = f"{_KERNELS}.{module}"
    try:
        found = sys.modules[name]  # a subscript: no call
    except KeyError:
        found = None
    return found if found is not None else importlib.import_module(name)
