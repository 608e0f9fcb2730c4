"""Small helpers shared by the Triton launchers. They run on every launch, so they stay cheap: plain Python
integer math (triton.cdiv and triton.next_power_of_2 are constexpr functions, ~2 us a call from host code) and
cached device queries."""
import functools

import torch

from .._env import ENVIRON, env_key, getenv

# Variables read on every launch, asked `in ENVIRON` before getenv: no call where they are unset (sdkernels._env).
_INTERPRET = env_key("TRITON_INTERPRET")
POISON_KNOB = env_key("SDKERNELS_POISON_OUTPUTS")  # (ops/_common.new_output asks it too)
_KNOBS: dict = {}  # programmatic_dependent's knobs -> env_key


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU in its interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRET in ENVIRON and getenv("TRITON_INTERPRET", "0") not in ("", "0")


def device_ok(*tensors) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter."""
    # Plain loops: this runs on every call, and a generator costs a call per item.
    if interpreting():
        for t in tensors:
            if t is not None and t.device.type != "cpu":
                return False
        return True
    for t in tensors:
        if t is not None and not t.is_cuda:  # is_cuda: a tenth of device.type's cost
            return False
    return True


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _cuda_multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)  # a device's properties do not change; querying them costs microseconds
def _cuda_multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def capability_major(device: torch.device) -> int:
    """The CUDA device's compute capability major (9: Hopper), 0 for other devices; cached like the SM count."""
    if device.type != "cuda":
        return 0
    return _cuda_capability_major(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def programmatic_dependent(knob: str, device: torch.device, wanted: bool = True) -> bool:
    """Whether a kernel launches as a programmatic dependent of the kernel before it (Hopper's griddepcontrol):
    never in the interpreter or where the env knob is "0", always where it is "1" (compile_check's sm_90 scenarios
    run on the CPU), else where the launcher wants it on an sm_90+ device."""
    try:
        key = _KNOBS[knob]
    except KeyError:
        key = _KNOBS[knob] = env_key(knob)
    value = getenv(knob) if key in ENVIRON else None
    if value == "0" or (_INTERPRET in ENVIRON and interpreting()):
        return False
    return value == "1" or (wanted and capability_major(device) >= 9)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4096)  # launchers ask it for a model's few sizes on every launch; a hit costs no call
def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def fix_cache_keys(module_globals: dict) -> None:
    """Compute, at import, the cache key of each Triton function a kernels module defines, in definition order.

    Triton (3.6, seen) derives a function's key from its callees' keys and global values, and the result depends on
    which keys were computed before: partial_softmax's _softmax_times_v had one key in a process that launched it
    first and another where _attention_row_stats came first. sdkernels.precompile's workers compile into Triton's
    disk cache under their process's keys and the calling process looks up under its own, so every process must
    compute them in the same order: this one, at the end of each module (a kernels module imports the modules whose
    helpers it calls first). ~0.4 ms a function."""
    from triton.runtime.jit import JITFunction
    if interpreting():  # no keys: the interpreter runs the Python functions
        return
    for value in list(module_globals.values()):
        if isinstance(value, JITFunction) and value.fn.__module__ == module_globals["__name__"]:
            value.cache_key  # noqa: B018  (computed and kept on first access)


def poisoned(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself, filled with NaN under SDKERNELS_POISON_OUTPUTS=1 (the tests set it), so that an element a
    kernel forgets to write fails the comparison; the ops' outputs and the launchers' own buffers (statistics,
    partials) go through it. (It fills the tensor it is given: allocating another output beside it would hold two
    at once.)"""
    if POISON_KNOB in ENVIRON and getenv("SDKERNELS_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out
