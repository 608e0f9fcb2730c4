"""GELU and GEGLU (a * gelu(g), with a and g the two halves of the last dim) in Triton: memory-bound, one read and
one write of every element, fp32 math whatever the storage dtype.

Both kernels see their tensors as (rows, cols) with unit column stride. A row index r is spread over up to three
leading dims (R0, R1, R2), each with its own stride in the input and the output, so views with any leading strides
(a slice of a wider tensor, a transposed batch) run without a copy. A program handles a BLOCK_R x BLOCK_C tile;
programs are numbered on one grid axis, so the tile count is not bound by CUDA's 65535 limit on the other axes.
"""
import functools

import triton
import triton.language as tl

from .utils import cdiv, next_power_of_2, fix_cache_keys
from .launch import cached_launch

# constexpr: a kernel may read only constexpr globals (Triton 3.3+ refuses plain ones on the GPU; the interpreter
# does not check).
SQRT_HALF = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)

TILE_ELEMENTS = 4096     # output elements per program: 8-16 KB of traffic, a few 16-byte vectors per thread
MIN_BLOCK_C = 128


@triton.jit
def gelu_fp32(x, APPROXIMATE_TANH: tl.constexpr):
    """GELU of an fp32 tensor: x * Phi(x) with the exact erf, or the tanh form. 0.5 * (1 + tanh(y)) equals
    sigmoid(2y), which keeps full relative precision where tanh(y) is close to -1."""
    if APPROXIMATE_TANH:
        y = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * y)
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))


@triton.jit
def _row_offsets(r, R1, R2, s0, s1, s2):
    """Element offset of the start of row r, with r = (i0 * R1 + i1) * R2 + i2, in int64."""
    i2 = r % R2
    t = r // R2
    i1 = t % R1
    i0 = t // R1
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2


@triton.jit
def row_col_tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_R x BLOCK_C tile of a (rows, cols) matrix, tiles numbered on one grid axis, columns
    fastest: its row indices, column indices and in-bounds mask."""
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(cols, BLOCK_C)
    tile_r = pid // col_tiles
    tile_c = pid - tile_r * col_tiles
    r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, c, (r < rows)[:, None] & (c < cols)[None, :]


@cached_launch
@triton.jit
def _gelu_rows_kernel(in_ptr, out_ptr, rows, cols, R1, R2, si0, si1, si2, so0, so1, so2,
                      GATED: tl.constexpr, APPROXIMATE_TANH: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, c] = gelu(in[r, c]), or with GATED out[r, c] = in[r, c] * gelu(in[r, cols + c])."""
    r, c, mask = row_col_tile(rows, cols, BLOCK_R, BLOCK_C)
    in_offs = _row_offsets(r, R1, R2, si0, si1, si2)[:, None] + c[None, :]
    out_offs = _row_offsets(r, R1, R2, so0, so1, so2)[:, None] + c[None, :]
    # Each input byte is read once: evict-first keeps the stream from pushing the output's lines out of L2.
    x = tl.load(in_ptr + in_offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if GATED:
        g = tl.load(in_ptr + in_offs + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        y = x * gelu_fp32(g, APPROXIMATE_TANH)
    else:
        y = gelu_fp32(x, APPROXIMATE_TANH)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=4096)  # asked on every launch; a model meets few shapes
def tile_shape(rows: int, cols: int):
    """(BLOCK_R, BLOCK_C, num_warps): about TILE_ELEMENTS outputs per program. BLOCK_C is the widest power of two
    whose column tiles leave at most 1/8 of their lanes masked (1280 -> 256, 2560 -> 512, 5120 -> 1024), else the
    one that wastes least."""
    widest = min(next_power_of_2(cols), TILE_ELEMENTS)
    candidates = [widest >> i for i in range(8) if (widest >> i) >= min(MIN_BLOCK_C, widest)]

    def waste(b):
        return 1 - cols / (cdiv(cols, b) * b)

    block_c = next((b for b in candidates if waste(b) <= 0.125), None) or min(candidates, key=waste)
    block_r = max(1, min(TILE_ELEMENTS // block_c, next_power_of_2(rows)))
    return block_r, block_c, 8 if block_r * block_c >= 4096 else 4


def gelu_rows_triton(inp, out, rows: int, cols: int, row_sizes, in_strides, out_strides, gated: bool,
                     approximate_tanh: bool):
    """Launch on (rows, cols) views of inp and out. ``row_sizes`` = (R0, R1, R2) with R0 * R1 * R2 == rows and
    ``in_strides``/``out_strides`` their element strides; columns have stride 1. With ``gated`` the input row holds
    2 * cols values (a, then g). The caller checked dtypes, devices and layouts."""
    if rows == 0 or cols == 0:
        return out
    if row_sizes[0] == 1 and row_sizes[1] == 1:
        # Rows one stride apart: as (rows, 1, 1) Triton specializes the 1s and drops the per-row div/mod (H200,
        # 8192 x 2560 fp16, one sweep run: 24.4 -> 23.5 us; with the evict-first loads 23.0 us).
        row_sizes, in_strides, out_strides = (rows, 1, 1), (in_strides[2], 0, 0), (out_strides[2], 0, 0)
    block_r, block_c, warps = tile_shape(rows, cols)
    grid = (cdiv(rows, block_r) * cdiv(cols, block_c),)
    _gelu_rows_kernel[grid](inp, out, rows, cols, row_sizes[1], row_sizes[2], *in_strides, *out_strides,
                            GATED=gated, APPROXIMATE_TANH=approximate_tanh, BLOCK_R=block_r, BLOCK_C=block_c,
                            num_warps=warps)
    return out


fix_cache_keys(globals())  # last: see its docstring
