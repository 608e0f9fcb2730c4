"""Residual add + LayerNorm over the last dim in one pass (diffusers' BasicTransformerBlock:
``hidden = attn_output + hidden; norm_hidden = norm2(hidden)``).

x and residual are contiguous (rows, C); each program takes ROWS whole rows of BLOCK_C (C padded to a power of two,
masked) lanes. It loads x and residual once, stores total = x + residual rounded to x's dtype (what eager's add
gives), and normalizes that rounded total in fp32 from registers: mean, then the variance as the mean of
(t - mean)^2 (two-pass: no E[t^2] - E[t]^2 cancellation), then the affine. Eager takes two kernels and reads the
sum back; this reads 2 and writes 2 tensors.
"""
import functools

import torch
import triton
import triton.language as tl

from .._env import ENVIRON, env_key, getenv
from .utils import cdiv, interpreting, next_power_of_2, fix_cache_keys
from .launch import cached_launch

# Elements per program (ROWS x BLOCK_C), and the padded width from which a program takes one row. H200 (bench
# --tiles, fp16, GB/s of 2 reads + 2 writes): 320 wide, 4 rows a program (2048) 2918 against 8 rows 2682 and one
# row 2527; 640 wide, one row 2431 against 2 rows 2266 (SDXL's 8192 x 640: 3610 against 3301 at 4096); 768 and
# 1280 wide, one row best too.
TILE_ELEMENTS = 2048
ONE_ROW_WIDTH = 1024
TILE_KNOB = "SDKERNELS_ADD_LN_TILE"  # overrides TILE_ELEMENTS, for benchmarks comparing tilings
_TILE_KNOB_KEY = env_key(TILE_KNOB)  # read per launch: `in ENVIRON` first, no call where it is unset


@triton.jit
def _rounded(v, ROUND_BF16: tl.constexpr):
    """fp32 v, or with ROUND_BF16 the nearest bf16 value (ties to even) as fp32. Triton's interpreter truncates
    fp32 -> bf16 where the GPU and eager PyTorch round to nearest: rounded first, its cast is exact, so the CPU lane
    checks the bits the GPU stores. GPU launches leave it off."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v


@cached_launch
@triton.jit
def _add_layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, total_ptr, out_ptr, rows, C, eps, ROWS: tl.constexpr,
                           BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ROUND_BF16: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = (row < rows)[:, None] & c_ok[None, :]
    offs = row.to(tl.int64)[:, None] * C + c[None, :]
    # x and residual are read once here and never again: evict-first keeps the two outputs in L2 for their readers.
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    # Eager adds fp16/bf16 in fp32 and rounds once, as here: the same bits.
    total = _rounded(x + r, ROUND_BF16).to(total_ptr.dtype.element_ty)
    tl.store(total_ptr + offs, total, mask=mask)
    t = total.to(tl.float32)  # statistics of what was stored, as eager's LayerNorm sees it
    mean = tl.sum(t, axis=1) / C
    d = tl.where(mask, t - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, _rounded(y, ROUND_BF16).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=4096)  # asked on every launch; a model meets few shapes
def tile_plan(rows: int, C: int, tile: int = TILE_ELEMENTS):
    """(ROWS, BLOCK_C, num_warps): whole rows, about ``tile`` elements a program (one row from ONE_ROW_WIDTH on),
    warps as the group_norm kernels scale them (4 to 16, one per 256 elements)."""
    block_c = next_power_of_2(C)
    rows_per = 1 if block_c >= ONE_ROW_WIDTH else max(1, min(tile // block_c, next_power_of_2(rows)))
    return rows_per, block_c, max(4, min(16, rows_per * block_c // 256))


def add_layer_norm_triton(x, residual, weight, bias, eps: float, total, out):
    """total = x + residual and out = layer_norm(total) written into the given contiguous outputs; x and residual
    are contiguous (..., C), weight and bias (C,) contiguous or None. The caller checked shapes, dtypes, devices and
    that C fits one program. Returns (total, out)."""
    C = x.shape[-1]
    rows = x.numel() // C if C else 0
    if rows == 0:
        return total, out
    knob = getenv(TILE_KNOB) if _TILE_KNOB_KEY in ENVIRON else None
    block_r, block_c, warps = tile_plan(rows, C, int(knob) if knob else TILE_ELEMENTS)
    # Unused pointers still need a tensor; nothing is read through them while the flags are off.
    w, b = (weight if weight is not None else x), (bias if bias is not None else x)
    _add_layer_norm_kernel[(cdiv(rows, block_r),)](x, residual, w, b, total, out, rows, C, eps, ROWS=block_r,
                                                    BLOCK_C=block_c, HAS_WEIGHT=weight is not None,
                                                    HAS_BIAS=bias is not None,
                                                    ROUND_BF16=x.dtype == torch.bfloat16 and interpreting(),
                                                    num_warps=warps)
    return total, out


fix_cache_keys(globals())  # last: see its docstring
