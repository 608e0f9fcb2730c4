"""Input checks and layout helpers shared by the op definitions."""
from __future__ import annotations

import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class SdkernelsInputError(ValueError):
    """Invalid input to an sdkernels op (as opposed to a valid input that only the reference supports)."""


def describe(t) -> str:
    if t is None:
        return "None"
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"
    return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}, stride={t.stride()})"


def fail(op: str, reason: str, **inputs) -> None:
    detail = ", ".join(f"{k}={describe(v)}" for k, v in inputs.items())
    raise SdkernelsInputError(f"sdkernels::{op}: {reason} (got {detail})")


def nsc_strides(t: torch.Tensor):
    """Strides (sN, sC, sS) of t seen as (N, C, S) with its spatial dims flattened, or None where the spatial
    dims cannot be flattened into one stride without a copy."""
    spatial = list(zip(t.shape[2:], t.stride()[2:]))
    spatial = [(n, s) for n, s in spatial if n != 1]
    if not spatial:  # one spatial position: NCHW and NHWC are the same memory; with unit channel stride, call it NHWC
        return t.stride(0), t.stride(1), t.shape[1] if t.stride(1) == 1 else 1
    s_stride = spatial[-1][1]
    expected = s_stride
    for n, s in reversed(spatial):
        if s != expected:
            return None
        expected = s * n
    return t.stride(0), t.stride(1), s_stride


def is_channels_last_like(t: torch.Tensor) -> bool:
    """Channels vary fastest in memory (NHWC-style): channel stride 1 and spatial stride at least C."""
    strides = nsc_strides(t)
    return strides is not None and strides[1] == 1 and t.shape[1] > 1 and strides[2] >= t.shape[1]


def new_output(like: torch.Tensor) -> torch.Tensor:
    """An output with ``like``'s shape, dtype and layout. With SDKERNELS_POISON_OUTPUTS=1 (the tests set it) it is
    filled with NaN first, so an element a kernel forgets to write fails the comparison."""
    if os.environ.get("SDKERNELS_POISON_OUTPUTS") == "1":
        return torch.full_like(like, float("nan"))
    return torch.empty_like(like)


def triton_available():
    """None where Triton can be imported, else why not (a Backend's ``available``)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton ships with CUDA torch
        return f"triton is not importable ({e})"
    return None


def triton_device_why_not(*tensors):
    """Why Triton cannot run on these tensors' device, or None: CUDA tensors, or CPU ones under the interpreter."""
    from ..kernels.utils import device_ok, interpreting
    if device_ok(*tensors):
        return None
    return (f"tensor on {tensors[0].device.type}: Triton runs CUDA tensors"
            + ("" if interpreting() else " (or CPU tensors under TRITON_INTERPRET=1)"))
