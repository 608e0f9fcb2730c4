"""A convolution's epilogue as one pass in place: y = (y + bias[channel] + residual) * scale, fp32 math, one
rounding. Memory-bound: y is read and written once, the residual read once, the bias from cache.

y (and the residual, which has y's strides) is dense NHWC or NCHW and seen as a (rows, cols) matrix with unit column
stride: NHWC rows are (n, h, w) positions and the channel is the column; NCHW rows are (n, c) planes and the channel
is the row modulo C.
"""
import triton
import triton.language as tl

from .geglu import row_col_tile, tile_shape
from .utils import cdiv, fix_cache_keys
from .launch import cached_launch


@cached_launch
@triton.jit
def _bias_residual_kernel(y_ptr, bias_ptr, res_ptr, rows, cols, C, scale, CHANNEL_IS_COLUMN: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALED: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, mask = row_col_tile(rows, cols, BLOCK_R, BLOCK_C)
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if CHANNEL_IS_COLUMN:
            y += tl.load(bias_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
        else:
            y += tl.load(bias_ptr + r % C, mask=r < rows, other=0.0).to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if SCALED:
        y = y * scale
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def bias_residual_triton(y, bias, residual, scale: float, channels_last: bool):
    """The epilogue in place on y (N, C, H, W), dense in the layout ``channels_last`` says; the residual (or None)
    has y's strides. The caller checked dtypes, devices and layouts."""
    N, C = y.shape[:2]
    spatial = y.numel() // max(N * C, 1)
    rows, cols = (N * spatial, C) if channels_last else (N * C, spatial)
    if rows == 0 or cols == 0:
        return y
    block_r, block_c, warps = tile_shape(rows, cols)
    grid = (cdiv(rows, block_r) * cdiv(cols, block_c),)
    b, res = (bias if bias is not None else y), (residual if residual is not None else y)  # unread when absent
    _bias_residual_kernel[grid](y, b, res, rows, cols, C, scale, CHANNEL_IS_COLUMN=channels_last,
                                HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SCALED=scale != 1.0,
                                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return y


fix_cache_keys(globals())  # last: see its docstring
