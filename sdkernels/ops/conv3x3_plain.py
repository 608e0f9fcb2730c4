"""sdkernels::conv3x3: a plain 3x3 convolution (stride 1, zero padding 1, one group) with its epilogue fused.

    out = (conv2d(x, weight, padding=1) + bias[:, None, None] + residual) * scale        (bias, residual optional)

x is (N, C, H, W), weight (K, C, 3, 3), bias (K,), residual (N, K, H, W), all of one dtype (fp16, bf16, fp32 or
fp64) on one device; the output has x's dtype, and x's memory format: channels_last (NHWC) in, channels_last out,
else contiguous. channels_last is the native layout of the fast backends; an NCHW x is converted to channels_last
for them and their output converted back, which costs a copy of each.

Backends, in priority order (the first that takes the inputs runs, unless a chooser or SDKERNELS_BACKEND says
otherwise):
  cudnn_epilogue  with a residual: F.conv2d without the bias, then bias, residual and scale in one pass rounded
                once (sdkernels::add_bias_residual_, Triton), where eager takes a pass for each; the patched
                ResnetBlock2D passes its shortcut here when the conv3x3 patcher took its conv2.
  cudnn         F.conv2d in x's dtype, then the epilogue in eager PyTorch: the definition of the op (cuDNN on GPUs,
                TF32 for fp32 where torch.backends.cudnn.allow_tf32 allows it), and the default until measurements
                say another backend is faster for some shapes (``dispatch.set_chooser("conv3x3", ...)``).
  winograd      the CUDA extension's Winograd F(2x2, 3x3) (math in winograd.py): fp16/bf16 on tensor cores with fp32
                accumulation (csrc/winograd_conv3x3_mma.cu: mma.sync, V built in registers; or, with
                SDKERNELS_WINOGRAD_KERNEL=wmma, csrc/winograd_conv3x3.cu: WMMA, V through shared memory), fp32 on FMA
                units (winograd_conv3x3.cu); C and K multiples of 8; sm_80 or newer.
                Its filters are transformed once per weight version (winograd.transformed_filter). Measured
                dispatch times it and, where another backend wins (everywhere so far), lets its filter go.
  triton_igemm  the Triton implicit-GEMM convolution of sdkernels::conv3x3_fused (kernels/conv3x3.py), no prologue.
  triton_tma    a Triton implicit GEMM whose operands Hopper's copy engine loads (kernels/conv3x3_tma.py), split-K
                on small images: channels_last fp16/bf16 x and weight, C a multiple of 8, sm_90 or newer. On an
                H100 it ran the VAE decoder's 128- and 256-channel layers 1.1x-1.4x faster than cuDNN
                (scripts/sweep_conv3x3_tma.py); measured dispatch (sdkernels.tuning) takes it where it wins.
  triton_winograd  Winograd F(2x2, 3x3) in Triton (kernels/winograd_conv3x3.py): the CUDA kernel's math with the
                transformed input in registers instead of shared memory; any C and K; forced only: 0.12x-0.24x cuDNN's
                speed on an H200 (bench_winograd_conv3x3), below the CUDA kernel.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, dispatch
from .._env import getenv
from ._common import (KERNEL_DTYPES, call_op, is_channels_last_like, kernels, poisoned, requirements,
                      triton_available, triton_device_why_not)
from .bias_add import add_bias_residual_, operands_why_not as epilogue_operands_why_not
from .winograd import forget_filter, tile_grid, transformed_filter

OP = "conv3x3"
INT32_MAX = 2**31 - 1


def output_like(x: torch.Tensor, out_channels: int, memory_format=None, poison: bool = True) -> torch.Tensor:
    """An (N, K, H, W) output of x's dtype and device, in x's memory format unless one is given (NaN-poisoned under
    the tests when ``poison``)."""
    fmt = memory_format or (torch.channels_last if is_channels_last_like(x) else torch.contiguous_format)
    out = torch.empty((x.shape[0], out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return poisoned(out) if poison else out


def _dense_strides(x: torch.Tensor, out_channels: int) -> tuple:
    """The strides of output_like(x, out_channels), without allocating it (torch's dense strides, size-1 dims too)."""
    N, _, H, W = x.shape
    K = out_channels
    return (H * W * K, 1, W * K, K) if is_channels_last_like(x) else (K * H * W, H * W, W, 1)


def _in_layout_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y with exactly the strides output_like(x) has: the op's outputs must match its fake's."""
    if y.stride() == _dense_strides(x, y.shape[1]):
        return y
    return output_like(x, y.shape[1], poison=False).copy_(y)


def conv3x3_eager(x, weight, bias=None, residual=None, scale=1.0):
    """The definition, in eager PyTorch: F.conv2d in x's dtype (its bias added there), then ``+ residual`` and
    ``* scale`` in x's dtype, each rounded as eager rounds it. Output in x's memory format."""
    y = F.conv2d(x, weight, bias, padding=1)
    if residual is not None:
        y.add_(residual)
    if scale != 1.0:
        y.mul_(scale)
    return _in_layout_of(y, x)


# ---- input checks ---------------------------------------------------------------------------------------------

def check_inputs(x, weight, bias, residual, scale) -> None:
    inputs = dict(x=x, weight=weight, bias=bias, residual=residual)
    need = requirements(OP, **inputs)

    need(isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor), "x and weight must be tensors")
    need(x.dim() == 4, lambda: f"x must be (N, C, H, W), not rank {x.dim()}")
    need(x.is_floating_point(), lambda: f"x must be floating point, not {x.dtype}")
    N, C, H, W = x.shape
    need(weight.dim() == 4 and tuple(weight.shape[1:]) == (C, 3, 3),
         lambda: f"weight must be (K, {C}, 3, 3) for x's {C} channels (a 3x3 kernel, one group)")
    K = weight.shape[0]
    expected = {"weight": tuple(weight.shape), "bias": (K,), "residual": (N, K, H, W)}
    for name, t in inputs.items():
        if t is None or name == "x":
            continue
        need(isinstance(t, torch.Tensor), lambda: f"{name} must be a tensor or None")
        need(t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")
        need(t.dtype == x.dtype, lambda: f"{name} has dtype {t.dtype} but x has {x.dtype} (one dtype, as F.conv2d)")
        need(tuple(t.shape) == expected[name], lambda: f"{name} must have shape {expected[name]}")
    need(isinstance(scale, (int, float)) and math.isfinite(scale), lambda: f"scale={scale!r} must be a finite number")


def _empty(x, weight):
    return x.numel() == 0 or weight.shape[0] == 0


def _last_offset(t: torch.Tensor) -> int:
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


# ---- cudnn backend (= the definition) --------------------------------------------------------------------------

def _cudnn_why_not(x, weight, bias, residual, scale):
    return None  # F.conv2d takes everything check_inputs lets through


# ---- winograd backend (CUDA extension) -------------------------------------------------------------------------

def _winograd_available():
    reason = _ext.unavailable_reason()
    if reason is None and not hasattr(_ext.load(), "winograd_conv3x3"):
        return "the built CUDA extension predates winograd_conv3x3 (rebuild it)"
    return reason


def _winograd_why_not(x, weight, bias, residual, scale):
    # What the kernel cannot do first, the device last: the reason a CPU tensor gets names its shape's problem too.
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of fp16, bf16, fp32"
    if _empty(x, weight):
        return "empty tensor"
    N, C, H, W = x.shape
    K = weight.shape[0]
    unaligned = [f"{name}={n}" for name, n in (("C", C), ("K", K)) if n % 8]
    if unaligned:
        return f"{' and '.join(unaligned)} not a multiple of 8 (the kernel moves 8-channel vectors)"
    th, tw = tile_grid(H, W)
    if (N * H * W * max(C, K) > INT32_MAX or 16 * C * K > INT32_MAX or N * th * tw > INT32_MAX - 32
            or any(_last_offset(t) >= INT32_MAX for t in (x, residual) if t is not None)):
        return "a tensor of 2**31 elements or more (the kernel's offsets are 32-bit)"
    if x.device.type != "cuda":
        return f"tensor on {x.device.type}, not CUDA"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs compute capability 8.0 or newer (bf16 tensor cores, cp.async)"
    return None


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: channel stride 1, 16-byte aligned, (n, h, w) strides multiples of 8 elements. A
    channels_last tensor, or a channel slice of one, is read in place; anything else is copied to channels_last."""
    steps_ok = all(x.stride(d) % 8 == 0 for d in (0, 2, 3) if x.shape[d] > 1)
    if x.stride(1) == 1 and steps_ok and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.channels_last)


def _run_winograd_kernel(launch, x, weight, bias, residual, scale):
    """launch(x, u, bias, residual, out, scale), the Winograd kernels' convention: channel stride 1 for x, residual
    and out (other layouts are converted), the transformed filter u (16, C, K) cached per weight."""
    K = weight.shape[0]
    out = output_like(x, K)
    # NCHW in: the kernel writes channels_last, copied into x's format at the end.
    nhwc_out = out if out.stride(1) == 1 else output_like(x, K, torch.channels_last)
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous(memory_format=torch.channels_last)
    launch(_kernel_input(x), transformed_filter(weight), None if bias is None else bias.contiguous(), residual,
           nhwc_out, float(scale))
    return out if nhwc_out is out else out.copy_(nhwc_out)


# SDKERNELS_WINOGRAD_KERNEL picks the CUDA kernel: "wmma" (csrc/winograd_conv3x3.cu, V through shared memory) or
# "mma" (csrc/winograd_conv3x3_mma.cu, fp16/bf16: mma.sync, V built in registers); default: mma where it applies.
WINOGRAD_KERNELS = {"": 0, "auto": 0, "wmma": 1, "mma": 2}


def _winograd_run(x, weight, bias, residual, scale):
    knob = getenv("SDKERNELS_WINOGRAD_KERNEL", "")
    if knob not in WINOGRAD_KERNELS:
        raise ValueError(f"SDKERNELS_WINOGRAD_KERNEL={knob!r}: expected one of {sorted(WINOGRAD_KERNELS)}")
    launch = functools.partial(_ext.load().winograd_conv3x3, kernel=WINOGRAD_KERNELS[knob])
    return _run_winograd_kernel(launch, x, weight, bias, residual, scale)


# ---- triton_winograd backend (kernels/winograd_conv3x3.py) ------------------------------------------------------

def _triton_winograd_why_not(x, weight, bias, residual, scale):
    reason = _triton_kernel_why_not(x, weight, bias, residual)
    if reason:
        return reason
    if 16 * x.shape[1] * weight.shape[0] > INT32_MAX:
        return "a transformed filter of 2**31 elements or more (the kernel's filter offsets are 32-bit)"
    return None


def _triton_winograd_run(x, weight, bias, residual, scale):
    launch = kernels("winograd_conv3x3").winograd_conv3x3_triton
    return _run_winograd_kernel(launch, x, weight, bias, residual, scale)


# ---- triton_igemm backend (kernels/conv3x3.py without its prologue) --------------------------------------------

def _triton_kernel_why_not(x, weight, bias, residual):
    """What every Triton backend of the op needs: a device Triton runs on, a kernel dtype, a non-empty problem."""
    reason = triton_device_why_not(*(t for t in (x, weight, bias, residual) if t is not None))
    if reason:
        return reason
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of fp16, bf16, fp32"
    if _empty(x, weight):
        return "empty tensor"
    return None


def _triton_why_not(x, weight, bias, residual, scale):
    reason = _triton_kernel_why_not(x, weight, bias, residual)
    if reason:
        return reason
    if scale == 0:
        return "scale 0 (the kernel divides by 1 / scale)"
    out_numel = x.shape[0] * weight.shape[0] * x.shape[2] * x.shape[3]
    if max(out_numel, x.numel(), weight.numel()) > INT32_MAX:  # its channel offsets are 32-bit
        return "more than 2**31 elements in one tensor"
    return None


def _triton_run(x, weight, bias, residual, scale):
    from ..kernels.conv3x3 import conv3x3_triton
    out = output_like(x, weight.shape[0])
    conv3x3_triton(x, weight, bias, None, None, residual, 1.0 / scale, 0, 0.0, out)
    return out


# ---- triton_tma backend (kernels/conv3x3_tma.py) ---------------------------------------------------------------

def tma_operands_why_not(x, weight, read_x=True) -> Optional[str]:
    """Why the copy-engine (TMA) convs cannot take x and weight as their descriptors' operands, or None: 16-bit,
    C a multiple of 8, channels_last and 16-byte aligned (x only where ``read_x``: the bordered conv reads a copy of
    it), compute capability 9.0 or newer."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not fp16 or bf16 (the copy engine feeds 16-bit tensor-core dots)"
    if x.shape[1] % 8:
        return f"C={x.shape[1]} is not a multiple of 8 (the weight's rows must be 16-byte aligned)"
    operands = (("x", x), ("weight", weight)) if read_x else (("weight", weight),)
    layouts = [name for name, t in operands if not t.is_contiguous(memory_format=torch.channels_last)]
    if layouts:
        return f"{' and '.join(layouts)} not channels_last (the tensor descriptors read NHWC boxes)"
    if any(t.data_ptr() % 16 for _, t in operands):
        return f"{' or '.join(name for name, _ in operands)} not 16-byte aligned"
    major, minor = torch.cuda.get_device_capability(x.device) if x.is_cuda else (9, 0)
    if 10 * major + minor < kernels("conv3x3_tma").MIN_COMPUTE_CAPABILITY:
        return "needs compute capability 9.0 or newer (TMA)"
    return None


def _tma_why_not(x, weight, bias, residual, scale):
    return _triton_why_not(x, weight, bias, residual, scale) or tma_operands_why_not(x, weight)


def _tma_run(x, weight, bias, residual, scale):
    return kernels("conv3x3_tma").conv3x3_tma(x, weight, bias, residual, scale, output_like(x, weight.shape[0]))


# ---- cudnn_epilogue backend: cuDNN's convolution, then the epilogue in one pass (sdkernels::add_bias_residual_) ----

def _cudnn_epilogue_why_not(x, weight, bias, residual, scale):
    if residual is None:
        return "no residual (a bias alone costs PyTorch's bias pass one pass too: the cudnn backend)"
    if residual.stride() != _dense_strides(x, weight.shape[0]):
        return "residual's strides differ from the output's (x's memory format, dense)"
    return epilogue_operands_why_not(x, bias, residual)  # the output will have x's dtype and device


def _cudnn_epilogue_run(x, weight, bias, residual, scale):
    return add_bias_residual_(_in_layout_of(F.conv2d(x, weight, None, padding=1), x), bias, residual, scale)


conv3x3_dispatch = dispatch.define(OP, conv3x3_eager, check=check_inputs)
# Ahead of cudnn: with a residual (ResnetBlock2D's skip-add) eager's epilogue takes two passes over the output (the
# bias, then the residual; three with a scale), this one pass, rounded once.
conv3x3_dispatch.register(dispatch.Backend("cudnn_epilogue", _cudnn_epilogue_run, _cudnn_epilogue_why_not,
                                           available=triton_available))
conv3x3_dispatch.register(dispatch.Backend("cudnn", conv3x3_eager, _cudnn_why_not))
# Measured (0.17x-0.47x cuDNN's speed at every 3x3 shape of SD1.5, SDXL and the VAE on an H100: README); where it
# loses, its transformed filter (16/9 of the weight: 600 MiB over SD1.5's UNet) is let go after the timing.
conv3x3_dispatch.register(dispatch.Backend("winograd", _winograd_run, _winograd_why_not,
                                           available=_winograd_available,
                                           release=lambda x, weight, *rest: forget_filter(weight)))
conv3x3_dispatch.register(dispatch.Backend("triton_igemm", _triton_run, _triton_why_not, available=triton_available))
conv3x3_dispatch.register(dispatch.Backend("triton_tma", _tma_run, _tma_why_not, available=triton_available))
# Not measured by dispatch: 0.12x-0.24x cuDNN's speed at every SD shape on an H200 (README); forced only.
conv3x3_dispatch.register(dispatch.Backend("triton_winograd", _triton_winograd_run, _triton_winograd_why_not,
                                           available=triton_available, measured=False))


# ---- the torch op ---------------------------------------------------------------------------------------------

@torch.library.custom_op("sdkernels::conv3x3", mutates_args=())
def _conv3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    return conv3x3_dispatch(x, weight, bias, residual, scale)


@_conv3x3_op.register_fake
def _(x, weight, bias, residual, scale=1.0):
    check_inputs(x, weight, bias, residual, scale)
    return output_like(x, weight.shape[0], poison=False)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            residual: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """(conv2d(x, weight, bias, padding=1) + residual) * scale in one op; see the module docstring."""
    if type(scale) is not float:  # checked as given, then converted (the op checks that)
        check_inputs(x, weight, bias, residual, scale)
        scale = float(scale)
    return call_op(conv3x3_dispatch, x, weight, bias, residual, scale)
