"""Linear + GEGLU in one Triton matmul: out = a * gelu(g) with [a | g] = x @ W.T + b, W = [Wa; Wg] of shape
(2N, K) as nn.Linear stores it.

A program owns a BLOCK_M x BLOCK_N tile of the output and runs two tensor-core dots per K step, one on the rows
n of W (the value half) and one on the rows N + n (the gate half), into two fp32 accumulators. The epilogue adds
the bias, applies the gate and stores only the (M, N) result: the (M, 2N) projection never reaches memory (a
split-K launch stores fp32 partial sums of its few tail columns instead), and W is read in place (two row
pointers or, on Hopper, two tensor-descriptor boxes; no re-layout).

Tile configs are autotuned per (M, N, K, dtypes) on the first call outside CUDA-graph capture (configs whose
tiles do not fit the GPU's shared memory drop out there). Then plans that end a partly filled last wave with a
second launch of smaller or split-K tiles are timed against the single launch, by the tuning objective (GPU time
under CUDA graphs, a call's time otherwise), and the fastest is kept for the shape (split_plans), in memory and
in sdkernels' per-GPU tuning file, so a later process starts from it. A capture that meets an untuned shape runs
a default config that fits instead, because autotuning times kernels and synchronizes, which a capture forbids.
SDKERNELS_AUTOTUNE=0 runs the default config everywhere (the test suite sets it: it meets hundreds of shapes).
"""
import inspect
import json
import warnings

import torch
import triton
import triton.language as tl

from .. import tuning
from .._env import ENVIRON, env_key, getenv
from .geglu import gelu_fp32
from .utils import capability_major, cdiv, interpreting, fix_cache_keys
from .launch import cached_launch

_AUTOTUNE_KNOB = env_key("SDKERNELS_AUTOTUNE")  # read per launch: `in ENVIRON` first, no call where it is unset


def _set_block_shapes(nargs):
    """Pre-launch hook of a TMA config: the descriptors' boxes are its tiles (the autotuner calls it per config)."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _config(bm, bn, bk, stages, warps, group_m=8, tma=False, split_k=1):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "USE_TMA": tma,
                          "SPLIT_K": split_k},
                         num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes if tma else None)


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
# Hopper's copy engine (TMA) loads the tiles through tensor descriptors: the loads cost no threads' registers or
# address arithmetic, and the wgmma pipeline overlaps them better (BLOCK_K * 2 bytes stays within the 128-byte
# swizzle). Only for 16-bit x and W whose rows are 16-byte aligned (see tma_ok).
# The H200 sweep (scripts/sweep_geglu.py) kept these: 128 x 128 won every SD shape from M = 512 up; 128 x 64 came
# next at M = 512 to 2048; 64 x 128, 128 x 64 on 4 warps and 64 x 64 never led, and each costs a compile and a
# timing per shape when a model is first patched.
TMA_CONFIGS = [
    _config(128, 128, 64, 3, 8, tma=True),
    _config(128, 128, 64, 4, 8, tma=True),
    _config(128, 64, 64, 4, 8, tma=True),
]
# Smaller tiles for the columns after a split plan's whole waves (split_plans); the last two need no TMA. The tail
# is a lone partial wave of few tiles, each as deep in K as the big ones: split-K cuts that depth (fp32 partial
# sums, then _split_k_epilogue_kernel). H200, M = 512, K = 1280, N = 2 x 5120: one launch of 128 x 128 tiles
# 41.4 us, with a 64 x 64 tail 36.3 us (TMA) or 36.9-37.3 us (pointers); 128 x 64 tails came 3 us behind.
TAIL_CONFIGS = [_config(64, 64, 64, 5, 4, tma=True), _config(64, 64, 64, 5, 4, tma=True, split_k=2),
                CONFIGS[5], _config(64, 64, 64, 4, 4, split_k=2)]
EPILOGUE_TILE = (16, 128)  # (rows, columns) per program of _split_k_epilogue_kernel
# For a shape first met inside a CUDA-graph capture: the first of these whose tiles fit the GPU's shared memory.
DEFAULT_CONFIGS = [CONFIGS[2], CONFIGS[5], _config(64, 64, 32, 2, 4)]
INTERPRETER_CONFIG = _config(16, 16, 16, 1, 1, group_m=2)


@cached_launch
@triton.jit
def _linear_geglu_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, out_ptr, ws_ptr, M, N, K, n_begin, n_end,
                         k_per_split, stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_om,
                         HAS_BIAS: tl.constexpr, APPROXIMATE_TANH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         DOT_IN_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, SPLIT_K: tl.constexpr):
    # The launch covers output columns [n_begin, n_end) (a plan may split them over two launches). With SPLIT_K > 1
    # each tile's K range is cut into SPLIT_K slices of k_per_split (a multiple of BLOCK_K), one program each; they
    # store fp32 partial sums to ws_ptr for _split_k_epilogue_kernel. Programs walk GROUP_M row tiles per column
    # tile, so neighbours share W tiles in L2.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(n_end - n_begin, BLOCK_N)
    split = tl.program_id(0) // (tiles_m * tiles_n)
    pid = tl.program_id(0) - split * (tiles_m * tiles_n)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    first_n = n_begin + tile_n * BLOCK_N
    rn = first_n + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < n_end
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_lo + rk)[None, :] * stride_xk
    # (BLOCK_K, BLOCK_N) tiles of W.T: element [k, n] is W[n, k] (value) and W[N + n, k] (gate).
    wa_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + (k_lo + rk)[:, None] * stride_wk
    wg_ptrs = wa_ptrs + N * stride_wn  # the caller keeps W under 2**31 elements

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if USE_TMA:
            # The copy engine zero-fills rows past M and columns past K. Value rows past n_end read other rows:
            # they only feed output columns past n_end, which are never stored.
            x = x_desc.load([tile_m * BLOCK_M, k0])
            wa = w_desc.load([first_n, k0]).T
            wg = w_desc.load([N + first_n, k0]).T
        else:
            k_ok = (k0 + rk) < k_hi
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

    if SPLIT_K == 1:
        _epilogue(acc_a, acc_g, rm, rn, m_ok, n_ok, b_ptr, out_ptr, N, stride_b, stride_om, HAS_BIAS,
                  APPROXIMATE_TANH)
    else:
        # ws is (SPLIT_K, 2, M, n_end - n_begin) fp32: this slice's value and gate partial sums.
        width = n_end - n_begin
        offs = rm.to(tl.int64)[:, None] * width + (rn - n_begin)[None, :]
        ws = ws_ptr + split.to(tl.int64) * 2 * M * width
        tl.store(ws + offs, acc_a, mask=m_ok[:, None] & n_ok[None, :])
        tl.store(ws + M * width + offs, acc_g, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _epilogue(acc_a, acc_g, rm, rn, m_ok, n_ok, b_ptr, out_ptr, N, stride_b, stride_om, HAS_BIAS: tl.constexpr,
              APPROXIMATE_TANH: tl.constexpr):
    """Adds the bias to the fp32 value and gate sums, gates, stores out[rm, rn]."""
    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rn * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + (N + rn) * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc_a * gelu_fp32(acc_g, APPROXIMATE_TANH)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_k_epilogue_kernel(ws_ptr, b_ptr, out_ptr, M, N, n_begin, n_end, stride_b, stride_om,
                             HAS_BIAS: tl.constexpr, APPROXIMATE_TANH: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums the SPLIT_K partial sums of a split-K launch in a fixed order (the result does not depend on which
    slice finished first), then the bias and the gate, as the single-launch epilogue does."""
    width = n_end - n_begin
    tiles_n = tl.cdiv(width, BLOCK_N)
    rm = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = n_begin + (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < n_end
    mask = m_ok[:, None] & n_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * width + (rn - n_begin)[None, :]
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        ws = ws_ptr + split * 2 * M * width
        acc_a += tl.load(ws + offs, mask=mask, other=0.0)
        acc_g += tl.load(ws + M * width + offs, mask=mask, other=0.0)
    _epilogue(acc_a, acc_g, rm, rn, m_ok, n_ok, b_ptr, out_ptr, N, stride_b, stride_om, HAS_BIAS, APPROXIMATE_TANH)


def _config_ms(kernel_call, quantiles):
    """The autotuner's timing of one config: tuning.device_ms (9 calls, L2 cold), not Triton's do_bench (125 ms a
    config: 5.6 s of an SD1.5 UNet's first call on an H200). Its pick only seeds the plans _tuned_plan times."""
    ms = tuning.device_ms(kernel_call)
    return [ms] * len(quantiles)


# (Triton 3.0, torch 2.4's, has no do_bench argument: it keeps do_bench there)
_quick = {"do_bench": _config_ms} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
_autotuned = triton.autotune(configs=CONFIGS, key=["M", "N", "K"], **_quick)(_linear_geglu_kernel)
_autotuned_tma = triton.autotune(configs=CONFIGS + TMA_CONFIGS, key=["M", "N", "K"], **_quick)(_linear_geglu_kernel)
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
    properties = _device_properties(device)
    return properties is None or shared_memory_bytes(config, dtype) <= properties["max_shared_mem"]


def _device_properties(device: torch.device):
    """The GPU's properties from Triton's driver, or None where there is no GPU to ask (the interpreter, or a
    host-overhead run with launches stubbed out). A CPU device with a driver is sdkernels.compile_check's stand-in
    GPU, which reports its target's limits."""
    if interpreting():
        return None
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 0
    try:
        return triton.runtime.driver.active.utils.get_device_properties(index)
    except RuntimeError:  # no active driver
        return None


def default_config(dtype: torch.dtype, device: torch.device):
    return next((c for c in DEFAULT_CONFIGS if fits(c, dtype, device)), DEFAULT_CONFIGS[-1])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _grid(meta, M, columns):
    return (cdiv(M, meta["BLOCK_M"]) * cdiv(columns, meta["BLOCK_N"]),)


def tma_ok(x2d, weight) -> bool:
    """Whether the TMA configs can load x2d and weight: a Hopper-or-newer GPU (not the interpreter), 16-bit
    dtypes, unit column stride, 16-byte aligned base and row stride."""
    if interpreting() or capability_major(x2d.device) < 9:
        return False
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x2d, weight))


def _descriptors(x2d, weight, config):
    """(x_desc, w_desc) for the kernel: tensor descriptors with the config's boxes, or the tensors themselves
    where the kernel takes the pointer path (the arguments are then unused)."""
    if config is not None and not config.kwargs["USE_TMA"]:
        return x2d, weight
    from triton.tools.tensor_descriptor import TensorDescriptor
    c = (config or TMA_CONFIGS[0]).kwargs
    return (TensorDescriptor.from_tensor(x2d, [c["BLOCK_M"], c["BLOCK_K"]]),
            TensorDescriptor.from_tensor(weight, [c["BLOCK_N"], c["BLOCK_K"]]))


def linear_geglu_triton(x2d, weight, bias, out, approximate_tanh: bool, config=None):
    """out (M, N) = GEGLU(x2d (M, K) @ weight.T + bias) for weight (2N, K). The caller checked shapes, dtypes,
    devices and that out is a contiguous (M, N) tensor; x2d, weight and bias may have any strides. ``config``
    (a triton.Config) skips the autotuner (tests run every config with it)."""
    M, K = x2d.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return out
    b = bias if bias is not None else weight  # never read when HAS_BIAS is off
    # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
    dot_in_fp32 = interpreting() and x2d.dtype == torch.bfloat16
    flags = dict(HAS_BIAS=bias is not None, APPROXIMATE_TANH=approximate_tanh,
                 INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(x2d.dtype), DOT_IN_FP32=dot_in_fp32)
    if config is not None and config.kwargs["USE_TMA"] and not tma_ok(x2d, weight):
        raise ValueError(f"linear_geglu: TMA config {config} needs 16-bit, 16-byte aligned x and weight rows on a "
                         "Hopper GPU")
    launch = _Launch(x2d, weight, b, out, flags)
    launch.run(((config, 0, N),) if config is not None else _pick_plan(launch))
    return out


class _Launch:
    """The arguments of one linear_geglu call, launched by plans: tuples of (config, n_begin, n_end) segments
    that together cover the N output columns."""

    def __init__(self, x2d, weight, b, out, flags):
        self.x2d, self.weight, self.flags = x2d, weight, flags
        (self.M, self.K), self.N = x2d.shape, out.shape[1]
        self.strides = (x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), b.stride(0),
                        out.stride(0))
        self.b, self.out = b, out

    def args(self, config, n_begin, n_end, ws=None, k_per_split=None):
        return (self.x2d, self.weight, *_descriptors(self.x2d, self.weight, config), self.b, self.out,
                self.out if ws is None else ws, self.M, self.N, self.K, n_begin, n_end,
                self.K if k_per_split is None else k_per_split, *self.strides)

    def run(self, plan):
        """Launch each segment; plans with TMA configs come only where tma_ok holds (the caller checked)."""
        for config, n_begin, n_end in plan:
            split_k, block_k = config.kwargs["SPLIT_K"], config.kwargs["BLOCK_K"]
            ws, k_per_split = None, None
            if split_k > 1:
                ws = torch.empty(split_k * 2 * self.M * (n_end - n_begin), device=self.out.device,
                                 dtype=torch.float32)
                k_per_split = cdiv(cdiv(self.K, block_k), split_k) * block_k
            (tiles,) = _grid(config.kwargs, self.M, n_end - n_begin)
            _linear_geglu_kernel[(tiles * split_k,)](
                *self.args(config, n_begin, n_end, ws, k_per_split), **self.flags, **config.kwargs,
                num_warps=config.num_warps, num_stages=config.num_stages)
            if split_k > 1:
                epilogue = EPILOGUE_TILE
                _split_k_epilogue_kernel[(cdiv(self.M, epilogue[0]) * cdiv(n_end - n_begin, epilogue[1]),)](
                    ws, self.b, self.out, self.M, self.N, n_begin, n_end, self.strides[4], self.strides[5],
                    HAS_BIAS=self.flags["HAS_BIAS"], APPROXIMATE_TANH=self.flags["APPROXIMATE_TANH"],
                    SPLIT_K=split_k, BLOCK_M=epilogue[0], BLOCK_N=epilogue[1], num_warps=4)


def _pick_plan(launch):
    """The plan to launch: tuned for this shape once per process (and kept in the tuning file), or a default."""
    x2d, weight, M, N, K = launch.x2d, launch.weight, launch.M, launch.N, launch.K
    if interpreting():
        return ((INTERPRETER_CONFIG, 0, N),)
    # SDKERNELS_AUTOTUNE=0: e.g. tests over many shapes: one compile, no timing
    if _AUTOTUNE_KNOB in ENVIRON and getenv("SDKERNELS_AUTOTUNE", "1") == "0":
        return ((default_config(x2d.dtype, x2d.device), 0, N),)
    tma = tma_ok(x2d, weight)
    # Plans are timed by the current objective: a split's second launch costs host time that CUDA graphs hide.
    key = (_TUNED, M, N, K, x2d.dtype, weight.dtype, launch.b.dtype, launch.flags["INPUT_PRECISION"], tma,
           tuning.objective())
    autotuned = _autotuned_tma if tma else _autotuned
    tuned = autotuned.cache.get(key)
    if tuned is not None:
        return tuned
    if not _capturing(x2d.device):
        autotuned.cache[key] = _tuned_plan(launch, autotuned, tma, key[1:-1])
        return autotuned.cache[key]
    if key not in _warned_capture:
        _warned_capture.add(key)
        warnings.warn(f"sdkernels linear_geglu: shape M={M}, N={N}, K={K} first seen during CUDA-graph capture, "
                      "where autotuning cannot run; the graph uses the default tile config. Run the model once "
                      "before capturing to use the tuned one.", stacklevel=4)
    return ((default_config(x2d.dtype, x2d.device), 0, N),)


def split_plans(M: int, N: int, config, tail_configs, sms: int):
    """Plans that end the tuned config's last, partly filled wave early: its tiles cover the columns of its whole
    waves (1 or 2 resident programs per multiprocessor), smaller tiles the rest in a second launch. At M = 512,
    N = 5120 the 160 tiles of 128 x 128 fill 132 multiprocessors 1.2 times: the second wave costs a whole tile's
    time for 28 tiles."""
    tiles_m = cdiv(M, config.kwargs["BLOCK_M"])
    block_n = config.kwargs["BLOCK_N"]
    tiles = tiles_m * cdiv(N, block_n)
    plans = []
    for resident in (1, 2):
        wave = sms * resident
        if tiles <= wave or tiles % wave == 0:
            continue
        n_split = (tiles // wave * wave) // tiles_m * block_n
        if 0 < n_split < N:
            plans += [((config, 0, n_split), (tail, n_split, N)) for tail in tail_configs]
    return plans


# Plans measured once per shape and objective, kept in the per-GPU tuning file: a later process skips the
# autotuner and the plan timing (2.6 s of a warm SD1.5 setup's 3.9 s on an H200).
_plan_choices = tuning.MeasuredChoice("linear_geglu_plans", can_measure=lambda *key: True)


def _tuned_plan(launch, autotuned, tma, key):
    """The plan for this shape: stored, or the fastest by the current objective (GPU time under CUDA graphs, a
    call's host-inclusive time otherwise) of single launches and split plans, with the autotuner's pick and the big
    tiles as main configs. The autotuner's own timing (do_bench of plain launches) is host-bound at these sizes and
    can pick a 64 x 64 tile where 128 x 128 runs 15% faster (H200, M = 512, K = 1280, N = 2 x 5120)."""
    def autotune_then_candidates():
        autotuned[lambda meta: _grid(meta, launch.M, launch.N)](
            *launch.args(None if tma else CONFIGS[0], 0, launch.N), **launch.flags)
        return _candidate_plans(launch, autotuned.best_config, tma)

    if launch.x2d.device.type != "cuda":  # compile_check or a stubbed host-overhead run: launches recorded, not timed
        plans = autotune_then_candidates()
        for plan in plans:
            launch.run(plan)
        return plans[0]
    def ways():
        return {_plan_name(plan): (lambda plan=plan: launch.run(plan)) for plan in autotune_then_candidates()}
    return _plan_from_name(_plan_choices.choose(tuple(str(k) for k in key), ways))


def _candidate_plans(launch, best, tma):
    device, dtype = launch.x2d.device, launch.x2d.dtype
    tails = [c for c in TAIL_CONFIGS if (tma or not c.kwargs["USE_TMA"]) and fits(c, dtype, device)]
    candidates = [best] + [c for c in (TMA_CONFIGS[:2] if tma else CONFIGS[:2]) if c is not best]
    mains = [c for c in candidates if fits(c, dtype, device)] or [default_config(dtype, device)]
    properties = _device_properties(device)
    plans = []
    for main in mains:
        plans.append(((main, 0, launch.N),))
        if properties is not None:
            plans += split_plans(launch.M, launch.N, main, tails, properties["multiprocessor_count"])
    return plans


_CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps", "GROUP_M", "USE_TMA", "SPLIT_K")


def _plan_name(plan) -> str:
    """A plan as JSON text, the tuning file's name for it: each segment's _config arguments and columns."""
    return json.dumps([[[c.kwargs.get(f, getattr(c, f, None)) for f in _CONFIG_FIELDS], n_begin, n_end]
                       for c, n_begin, n_end in plan])


def _plan_from_name(name: str):
    return tuple((_config(*fields), n_begin, n_end) for fields, n_begin, n_end in json.loads(name))


def tuned_plan(M: int, N: int, K: int, dtype: torch.dtype):
    """The plan tuning picked for a shape (fp16/bf16/fp32 x and weight of one dtype), or None, as text for the
    benchmark's report: each launch's config and its output columns."""
    for autotuned in (_autotuned_tma, _autotuned):
        for key, plan in autotuned.cache.items():
            if key[0] == _TUNED and tuple(key[1:4]) == (M, N, K) and dtype in key:
                return " + ".join(f"[{config}] columns {n_begin}..{n_end}" for config, n_begin, n_end in plan)
    return None


fix_cache_keys(globals())  # last: see its docstring
