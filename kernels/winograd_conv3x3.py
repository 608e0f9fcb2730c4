"""Winograd F(2x2, 3x3) 3x3 convolution (stride 1, zero padding 1) in Triton, every stage in one kernel: the math
of sdkernels/ops/winograd.py, the plan of csrc/winograd_conv3x3.cu with the transformed input kept in registers.

    out[n, :, h, w] = (bias + conv3x3(x, g)[n, :, h, w] [+ residual[n, :, h, w]]) * scale

A program owns TH x TW output tiles of 2x2 pixels of one image (T = TH * TW tiles, their 4x4 input patches
overlapping by 2, so neighbours' loads hit L1) by BLOCK_K output channels, and walks the input channels BLOCK_C at
a time:
  1. load the 16 pixels of each tile's patch as 16 (T, BLOCK_C) tensors (zeros outside the image and past C);
  2. V = B^T d B in fp32 registers, rounded to x's dtype (the CUDA kernel and the reference round there too);
  3. the 16 GEMMs M[e] += V[e] @ U[e] with U = G g G^T, (16, C, K), transformed once per weight
     (sdkernels.ops.winograd.transformed_filter): 16 fp32 accumulators of (T, BLOCK_K);
then Y = A^T M A, the epilogue in fp32, and one rounding to the output's dtype. Positions e = 4 * row + column of
the 4x4 patch. x, residual and out are read and written through their strides (channels_last is the fast case).
"""
import torch
import triton
import triton.language as tl

from .utils import cdiv, interpreting, fix_cache_keys
from .launch import cached_launch

# (TH, TW, BLOCK_K, BLOCK_C, num_warps, num_stages): the best of scripts/probe_winograd.py's sweep on an H200
# (Triton 3.6, session 20): 0.19x-0.24x cuDNN at the VAE and SD1.5 shapes (86-92 direct-conv-equivalent TFLOP/s),
# below the CUDA kernel's 0.21x-0.31x; the 16 accumulators and the transformed patch leave too few registers for
# wider tiles. (8, 8, 16, 16, 8, 1), which ptxas compiled without spilling for Triton 3.9, ran 4x slower.
CONFIG = (8, 8, 32, 16, 8, 2)
FP32_CONFIG = (4, 8, 32, 16, 4, 1)  # exact fp32 dots: operands in shared memory at twice the bytes, one stage
INTERPRETER_CONFIG = (4, 4, 16, 16, 1, 1)  # tl.dot needs 16 rows and columns


@triton.jit
def _pixel(x_ptr, row, h_ok, w, W, sxw, c, c_ok):
    """Pixel column w of a patch row (row: the element offset of (n, h, 0) per tile) as fp32 (T, BLOCK_C)."""
    ok = h_ok & (w >= 0) & (w < W)
    ptrs = x_ptr + (row + w.to(tl.int64) * sxw)[:, None] + c[None, :]
    return tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _patch_row(x_ptr, n_off, h, H, w0, W, t_ok, sxh, sxw, c, c_ok):
    """The 4 pixels of one patch row of every tile (h and w0 per tile)."""
    h_ok = t_ok & (h >= 0) & (h < H)
    row = n_off + h.to(tl.int64) * sxh
    return (_pixel(x_ptr, row, h_ok, w0, W, sxw, c, c_ok), _pixel(x_ptr, row, h_ok, w0 + 1, W, sxw, c, c_ok),
            _pixel(x_ptr, row, h_ok, w0 + 2, W, sxw, c, c_ok), _pixel(x_ptr, row, h_ok, w0 + 3, W, sxw, c, c_ok))


@triton.jit
def _bt(a, b, c, d):
    """One axis of B^T d B: (a - c, b + c, c - b, b - d)."""
    return a - c, b + c, c - b, b - d


@triton.jit
def _at(m0, m1, m2, m3):
    """One axis of A^T m A: (m0 + m1 + m2, m1 - m2 - m3)."""
    return m0 + m1 + m2, m1 - m2 - m3


@triton.jit
def _gemm(acc, v, u_ptr, e: tl.constexpr, C, K, c, c_ok, k, k_ok, DOT_IN_FP32: tl.constexpr):
    """acc + V[e] @ U[e][c, k]; V rounded to U's dtype (x's) first."""
    u = tl.load(u_ptr + ((e * C + c) * K)[:, None] + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
    v = v.to(u_ptr.dtype.element_ty)
    if DOT_IN_FP32:
        return tl.dot(v.to(tl.float32), u.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(v, u, acc)


@triton.jit
def _store_pixel(y, out_ptr, res_ptr, bias, scale, n, h, w, H, W, t_ok, k, k_ok, son, soh, sow, srn, srh, srw,
                 HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """(y + bias + residual) * scale at output pixel (n, h, w) of each tile, rounded once."""
    mask = (t_ok & (h < H) & (w < W))[:, None] & k_ok[None, :]
    if HAS_BIAS:
        y += bias[None, :]
    if HAS_RESIDUAL:
        r_off = n.to(tl.int64) * srn + h.to(tl.int64) * srh + w.to(tl.int64) * srw
        y += tl.load(res_ptr + r_off[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
    o_off = n.to(tl.int64) * son + h.to(tl.int64) * soh + w.to(tl.int64) * sow
    tl.store(out_ptr + o_off[:, None] + k[None, :], (y * scale).to(out_ptr.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _winograd_kernel(x_ptr, u_ptr, bias_ptr, res_ptr, out_ptr, H, W, C, K, blocks_h, blocks_w, scale,
                     sxn, sxh, sxw, srn, srh, srw, son, soh, sow,
                     TH: tl.constexpr, TW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // (blocks_h * blocks_w)
    block = pid - n * (blocks_h * blocks_w)
    t = tl.arange(0, TH * TW)
    th = (block // blocks_w) * TH + t // TW
    tw = (block % blocks_w) * TW + t % TW
    t_ok = (2 * th < H) & (2 * tw < W)
    h0 = 2 * th - 1  # the patch's first row and column in the image
    w0 = 2 * tw - 1
    n_off = n.to(tl.int64) * sxn
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K

    z = tl.zeros((TH * TW, BLOCK_K), dtype=tl.float32)
    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
        z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        # Patch rows 1 and 2 first: they make V's rows 1 and 2 (B^T's middle rows), then rows 0 and 3 one at a time,
        # so that at most three patch rows are live.
        d10, d11, d12, d13 = _patch_row(x_ptr, n_off, h0 + 1, H, w0, W, t_ok, sxh, sxw, c, c_ok)
        d20, d21, d22, d23 = _patch_row(x_ptr, n_off, h0 + 2, H, w0, W, t_ok, sxh, sxw, c, c_ok)
        v4, v5, v6, v7 = _bt(d10 + d20, d11 + d21, d12 + d22, d13 + d23)
        m4 = _gemm(m4, v4, u_ptr, 4, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m5 = _gemm(m5, v5, u_ptr, 5, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m6 = _gemm(m6, v6, u_ptr, 6, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m7 = _gemm(m7, v7, u_ptr, 7, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        v8, v9, v10, v11 = _bt(d20 - d10, d21 - d11, d22 - d12, d23 - d13)
        m8 = _gemm(m8, v8, u_ptr, 8, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m9 = _gemm(m9, v9, u_ptr, 9, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m10 = _gemm(m10, v10, u_ptr, 10, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m11 = _gemm(m11, v11, u_ptr, 11, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        d00, d01, d02, d03 = _patch_row(x_ptr, n_off, h0, H, w0, W, t_ok, sxh, sxw, c, c_ok)
        v0, v1, v2, v3 = _bt(d00 - d20, d01 - d21, d02 - d22, d03 - d23)
        m0 = _gemm(m0, v0, u_ptr, 0, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m1 = _gemm(m1, v1, u_ptr, 1, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m2 = _gemm(m2, v2, u_ptr, 2, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m3 = _gemm(m3, v3, u_ptr, 3, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        d30, d31, d32, d33 = _patch_row(x_ptr, n_off, h0 + 3, H, w0, W, t_ok, sxh, sxw, c, c_ok)
        v12, v13, v14, v15 = _bt(d10 - d30, d11 - d31, d12 - d32, d13 - d33)
        m12 = _gemm(m12, v12, u_ptr, 12, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m13 = _gemm(m13, v13, u_ptr, 13, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m14 = _gemm(m14, v14, u_ptr, 14, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)
        m15 = _gemm(m15, v15, u_ptr, 15, C, K, c, c_ok, k, k_ok, DOT_IN_FP32)

    # A^T M: combine the rows of each column; then (A^T M) A: the columns of each row.
    s00, s10 = _at(m0, m4, m8, m12)
    s01, s11 = _at(m1, m5, m9, m13)
    s02, s12 = _at(m2, m6, m10, m14)
    s03, s13 = _at(m3, m7, m11, m15)
    y00, y01 = _at(s00, s01, s02, s03)
    y10, y11 = _at(s10, s11, s12, s13)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_K,), dtype=tl.float32)
    h, w = 2 * th, 2 * tw
    _store_pixel(y00, out_ptr, res_ptr, bias, scale, n, h, w, H, W, t_ok, k, k_ok, son, soh, sow, srn, srh, srw,
                 HAS_BIAS, HAS_RESIDUAL)
    _store_pixel(y01, out_ptr, res_ptr, bias, scale, n, h, w + 1, H, W, t_ok, k, k_ok, son, soh, sow, srn, srh, srw,
                 HAS_BIAS, HAS_RESIDUAL)
    _store_pixel(y10, out_ptr, res_ptr, bias, scale, n, h + 1, w, H, W, t_ok, k, k_ok, son, soh, sow, srn, srh, srw,
                 HAS_BIAS, HAS_RESIDUAL)
    _store_pixel(y11, out_ptr, res_ptr, bias, scale, n, h + 1, w + 1, H, W, t_ok, k, k_ok, son, soh, sow, srn, srh,
                 srw, HAS_BIAS, HAS_RESIDUAL)


def launch_config(dtype):
    """(TH, TW, BLOCK_K, BLOCK_C, num_warps, num_stages)."""
    if interpreting():
        return INTERPRETER_CONFIG
    return FP32_CONFIG if dtype == torch.float32 else CONFIG


def winograd_conv3x3_triton(x, u, bias, residual, out, scale, config=None):
    """out = (conv3x3(x) + bias + residual) * scale with u = the transformed filter (16, C, K) in x's dtype; x,
    residual and out (N, C or K, H, W) with channel stride 1 (sdkernels::conv3x3's triton_winograd backend checks)."""
    N, C, H, W = x.shape
    K = u.shape[2]
    th, tw, block_k, block_c, warps, stages = config or launch_config(x.dtype)
    blocks_h, blocks_w = cdiv(cdiv(H, 2), th), cdiv(cdiv(W, 2), tw)
    sx, so = x.stride(), out.stride()
    sr = residual.stride() if residual is not None else (0, 0, 0, 0)
    _winograd_kernel[(N * blocks_h * blocks_w, cdiv(K, block_k))](
        x, u, bias if bias is not None else out, residual if residual is not None else out, out, H, W, C, K,
        blocks_h, blocks_w, float(scale), sx[0], sx[2], sx[3], sr[0], sr[2], sr[3], so[0], so[2], so[3],
        TH=th, TW=tw, BLOCK_K=block_k, BLOCK_C=block_c, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
        DOT_IN_FP32=x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16),
        num_warps=warps, num_stages=stages)
    return out


fix_cache_keys(globals())  # last: see its docstring
