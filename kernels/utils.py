"""Small helpers shared by the Triton launchers."""
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_ok(*tensors) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter."""
    want = "cpu" if interpreting() else "cuda"
    return all(t is None or t.device.type == want for t in tensors)


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
