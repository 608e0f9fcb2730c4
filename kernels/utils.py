"""Small helpers shared by the Triton launchers. They run on every launch, so they stay cheap: plain Python
integer math (triton.cdiv and triton.next_power_of_2 are constexpr functions, ~2 us a call from host code) and
cached device queries."""
import functools

import torch

from .._env import getenv


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU in its interpreter (TRITON_INTERPRET=1)."""
    return getenv("TRITON_INTERPRET", "0") not in ("", "0")


def device_ok(*tensors) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter."""
    if interpreting():
        return all(t is None or t.device.type == "cpu" for t in tensors)
    return all(t is None or t.is_cuda for t in tensors)  # is_cuda: a tenth of device.type's cost


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _cuda_multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)  # a device's properties do not change; querying them costs microseconds
def _cuda_multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << (max(int(n), 1) - 1).bit_length()
