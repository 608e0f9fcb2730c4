"""Linear + GEGLU in one Triton matmul: out = a * gelu(g) with [a | g] = x @ W.T + b, W = [Wa; Wg] of shape
(2N, K) as nn.Linear stores it.

A program owns a BLOCK_M x BLOCK_N tile of the output and runs two tensor-core dots per K step, one on the rows
n of W (the value half) and one on the rows N + n (the gate half), into two fp32 accumulators. The epilogue adds
the bias, applies the gate and stores only the (M, N) result: the (M, 2N) projection never reaches memory, and W
is read in place (two row pointers, no re-layout).

Tile configs are autotuned per (M, N, K, dtypes) on the first call outside CUDA-graph capture (configs whose
tiles do not fit the GPU's shared memory drop out there). A capture that meets an untuned shape runs a default
config that fits instead, because autotuning times kernels and synchronizes, which a capture forbids.
SDKERNELS_AUTOTUNE=0 runs the default config everywhere (the test suite sets it: it meets hundreds of shapes).
"""
import warnings

import torch
import triton
import triton.language as tl

from .._env import getenv
from .geglu import gelu_fp32
from .utils import cdiv, interpreting


def _config(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# BLOCK_N counts columns of the output; each program computes 2 * BLOCK_N columns of the projection.
CONFIGS = [
    _config(128, 128, 64, 3, 8),
    _config(128, 128, 32, 4, 8),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 64, 3, 8),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 5, 2),
]
# For a shape first met inside a CUDA-graph capture: the first of these whose tiles fit the GPU's shared memory.
DEFAULT_CONFIGS = [CONFIGS[2], CONFIGS[5], _config(64, 64, 32, 2, 4)]
INTERPRETER_CONFIG = _config(16, 16, 16, 1, 1, group_m=2)


@triton.jit
def _linear_geglu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_om,
                         HAS_BIAS: tl.constexpr, APPROXIMATE_TANH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         DOT_IN_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    # Programs walk GROUP_M row tiles per column tile, so neighbours share W tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    # (BLOCK_K, BLOCK_N) tiles of W.T: element [k, n] is W[n, k] (value) and W[N + n, k] (gate).
    wa_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
    wg_ptrs = wa_ptrs + N * stride_wn  # the caller keeps W under 2**31 elements

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wa = tl.load(wa_ptrs, mask=w_mask, other=0.0)
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            wa = wa.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_a = tl.dot(x, wa, acc_a, input_precision=INPUT_PRECISION)
        acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wa_ptrs += BLOCK_K * stride_wk
        wg_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rn * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + (N + rn) * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc_a * gelu_fp32(acc_g, APPROXIMATE_TANH)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_autotuned = triton.autotune(configs=CONFIGS, key=["M", "N", "K"])(_linear_geglu_kernel)
# A shape the autotuner has tuned is remembered in its own cache under this tag, with the config it picked: later
# calls launch that config directly, without the autotuner's per-call Python (~10 us), even inside a CUDA-graph
# capture; whatever empties the autotuner's cache (to tune again) forgets these with it.
_TUNED = "sdkernels:tuned"
_warned_capture = set()


def input_precision(dtype: torch.dtype) -> str:
    """The tl.dot input precision: fp32 follows torch's own matmul setting (tf32 only where
    torch.backends.cuda.matmul.allow_tf32 allows it, never under the interpreter); fp16/bf16 take Triton's
    default, "tf32", which for 16-bit operands just means tensor cores with fp32 accumulation."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def shared_memory_bytes(config, dtype: torch.dtype) -> int:
    """Shared memory of the pipelined loads, about: num_stages x (one x tile + two W tiles)."""
    m, n, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return config.num_stages * (m * k + 2 * k * n) * torch.empty((), dtype=dtype).element_size()


def fits(config, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the config's tiles fit the device's shared memory (fp32 needs twice fp16's)."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return shared_memory_bytes(config, dtype) <= limit


def default_config(dtype: torch.dtype, device: torch.device):
    return next((c for c in DEFAULT_CONFIGS if fits(c, dtype, device)), DEFAULT_CONFIGS[-1])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _grid(meta, M, N):
    tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    return (tiles,)


def linear_geglu_triton(x2d, weight, bias, out, approximate_tanh: bool, config=None):
    """out (M, N) = GEGLU(x2d (M, K) @ weight.T + bias) for weight (2N, K). The caller checked shapes, dtypes,
    devices and that out is a contiguous (M, N) tensor; x2d, weight and bias may have any strides. ``config``
    (a triton.Config) skips the autotuner (tests run every config with it)."""
    M, K = x2d.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return out
    b = bias if bias is not None else weight  # never read when HAS_BIAS is off
    args = (x2d, weight, b, out, M, N, K, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
            b.stride(0), out.stride(0))
    # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
    dot_in_fp32 = interpreting() and x2d.dtype == torch.bfloat16
    flags = dict(HAS_BIAS=bias is not None, APPROXIMATE_TANH=approximate_tanh,
                 INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(x2d.dtype), DOT_IN_FP32=dot_in_fp32)
    if config is None:
        config = _pick_config(M, N, K, x2d, weight, b, flags, args)
        if config is None:  # the autotuner ran it
            return out
    _linear_geglu_kernel[_grid(config.kwargs, M, N)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                                     num_stages=config.num_stages)
    return out


def _pick_config(M, N, K, x2d, weight, b, flags, args):
    """The config to launch, or None after launching through the autotuner (which tunes a new shape first)."""
    if interpreting():
        return INTERPRETER_CONFIG
    if getenv("SDKERNELS_AUTOTUNE", "1") == "0":  # e.g. tests over many shapes: one compile, no timing
        return default_config(x2d.dtype, x2d.device)
    key = (_TUNED, M, N, K, x2d.dtype, weight.dtype, b.dtype, flags["INPUT_PRECISION"])
    tuned = _autotuned.cache.get(key)
    if tuned is not None:
        return tuned
    if not _capturing(x2d.device):
        _autotuned[lambda meta: _grid(meta, M, N)](*args, **flags)
        _autotuned.cache[key] = _autotuned.best_config
        return None
    if key not in _warned_capture:
        _warned_capture.add(key)
        warnings.warn(f"sdkernels linear_geglu: shape M={M}, N={N}, K={K} first seen during CUDA-graph capture, "
                      "where autotuning cannot run; the graph uses the default tile config. Run the model once "
                      "before capturing to use the tuned one.", stacklevel=4)
    return default_config(x2d.dtype, x2d.device)


def tuned_config(M: int, N: int, K: int, dtype: torch.dtype):
    """The config the autotuner picked for a shape (fp16/bf16/fp32 x and weight of one dtype), or None (for the
    benchmark's report)."""
    for key, config in _autotuned.cache.items():
        if tuple(key[:3]) == (M, N, K) and str(dtype) in key:
            return config
    return None
