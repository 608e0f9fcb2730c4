"""3x3 convolution (stride 1, zero padding 1) as an implicit GEMM in Triton, with the ResNet block's neighbours fused
in: a GroupNorm + SiLU prologue on its input and a bias / time-embedding / statistics / shortcut epilogue.

    out[n, :, h, w] = ( bias + add[n] + sum_{kh, kw, ci} W[:, ci, kh, kw] * a[n, ci, h+kh-1, w+kw-1]
                        [+ residual[n, :, h, w]] ) / output_scale_factor
    a = silu(group_norm_affine(x; mean, rstd given per (n, group)))  with the prologue, else x; a = 0 outside the image

The GEMM is (pixels of one sample) x (output channels) x (9 taps * input channels). A program owns BLOCK_M pixels of
one sample n by BLOCK_N output channels and walks the K dimension tap by tap, BLOCK_K input channels at a time: it
loads the shifted pixel rows straight from x (any strides; channels_last makes them contiguous rows), normalizes
them in registers when the prologue is on, rounds them to x's dtype (what eager's conv would read) and runs a
tensor-core dot into an fp32 accumulator. The weight is read in place from its (Cout, Cin, 3, 3) strides: in
channels_last (as model.to(memory_format=torch.channels_last) leaves it) its input channels are contiguous; a
contiguous NCHW weight is read with a stride of 9 elements.

Tiles never straddle two samples, so per-sample values (the GroupNorm statistics, the time embedding) are vectors
per program, and the output statistics come out per (sample, channel, pixel tile): the epilogue stores (count,
mean, M2) partials in the layout of the GroupNorm rows plan and its finalize kernel merges them into (mean, rstd)
per group (Chan's formula: deterministic, and exact for a large mean where sum / sum of squares is not).
"""
import torch
import triton
import triton.language as tl

from .group_norm import channel_partials, finalize_partials
from .utils import cdiv, interpreting, next_power_of_2, fix_cache_keys
from .launch import cached_launch

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Starting points for fp16/bf16 on sm_80/sm_90, NOT measured
# yet: the GPU run of bench/bench_resnet_block.py is the place to tune them.
HALF_CONFIG = (128, 128, 64, 8, 3)
SMALL_M_CONFIG = (64, 128, 64, 4, 3)    # a sample with <= 256 pixels (SD1.5's 16x16 and 8x8 blocks): more programs
FP32_CONFIG = (64, 64, 32, 4, 2)        # exact (ieee) dots run on CUDA cores
# The interpreter spends its time per program and per op, not per element: tiles as large as the small test
# images, so most launches are one program per sample (tests force small tiles to reach several and their tails).
INTERPRETER_CONFIG = (128, 64, 64, 1, 1)


@triton.jit
def _silu(y, FAST: tl.constexpr):
    """y * sigmoid(y) in fp32. FAST: sigmoid(y) = (1 + tanh(y / 2)) / 2 with the hardware tanh.approx.f32, one
    special-function op per element where the exact form takes two (ex2 and a reciprocal): the prologue runs on
    every (tap, output-channel tile) reading an input element, and those ops, not the tensor cores, bound it.
    tanh.approx's error (about 2^-11 absolute) makes silu's at most |y| * 2^-12 absolute."""
    if FAST:
        hy = 0.5 * y
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [hy], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return hy * t + hy
    return y * tl.sigmoid(y)


@triton.jit
def _gn_silu(a, n, c, c_ok, stats_ptr, nw_ptr, nb_ptr, G, Cg, C, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
             CHANNEL_AFFINE: tl.constexpr, SILU: tl.constexpr, FAST_SILU: tl.constexpr):
    """silu((a - mean) * rstd * weight + bias) in fp32 for the channels c of sample n, as one scale and shift:
    read from a (N, C, 2) table when CHANNEL_AFFINE, else made from the (N, G, 2) (mean, rstd) and the affine."""
    if CHANNEL_AFFINE:
        nc = n * C + c
        scale = tl.load(stats_ptr + 2 * nc, mask=c_ok, other=0.0)
        shift = tl.load(stats_ptr + 2 * nc + 1, mask=c_ok, other=0.0)
    else:
        ng = n * G + c // Cg
        rstd = tl.load(stats_ptr + 2 * ng + 1, mask=c_ok, other=0.0)
        scale = rstd
        shift = -tl.load(stats_ptr + 2 * ng, mask=c_ok, other=0.0) * rstd
        if HAS_WEIGHT:
            gamma = tl.load(nw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            scale = scale * gamma
            shift = shift * gamma
        if HAS_BIAS:
            shift = shift + tl.load(nb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    y = a.to(tl.float32) * scale[None, :] + shift[None, :]
    if SILU:
        y = _silu(y, FAST_SILU)
    return y


@cached_launch
@triton.jit
def _conv3x3_kernel(x_ptr, w_ptr, bias_ptr, nstats_ptr, nw_ptr, nb_ptr, add_ptr, res_ptr, out_ptr, part_ptr,
                    H, W, Cin, Cout, G_in, Cg_in, G_out, Cg_out, tiles_m, tiles_n, K_total, output_scale_factor,
                    sxN, sxC, sxH, sxW, swO, swI, swH, swW, saN, saC, srN, srC, srH, srW, soN, soC, soH, soW,
                    NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_ADD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, CHANNEL_AFFINE: tl.constexpr,
                    NORM_SILU: tl.constexpr, FAST_SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Neighbouring programs take the column tiles of one pixel tile: its input rows are read once into L2.
    pid = tl.program_id(0)
    n = tl.program_id(1)
    tile_m = pid // tiles_n
    tile_n = pid - tile_m * tiles_n
    HW = H * W
    r = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    h = r // W
    w = r - h * W
    m_ok = r < HW
    co = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = co < Cout
    rk = tl.arange(0, BLOCK_K)

    x_pix = x_ptr + n.to(tl.int64) * sxN + h.to(tl.int64) * sxH + w.to(tl.int64) * sxW
    w_cols = w_ptr + co.to(tl.int64) * swO
    chunks = tl.cdiv(Cin, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One loop over (tap, channel chunk), so the compiler pipelines every load of the K walk.
    for step in range(0, 9 * chunks):
        tap = step // chunks
        c = (step - tap * chunks) * BLOCK_K + rk
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        c_ok = c < Cin
        ih = h + dh
        iw = w + dw
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_mask = pix_ok[:, None] & c_ok[None, :]
        a = tl.load(x_pix[:, None] + (dh * sxH + dw * sxW) + c[None, :] * sxC, mask=a_mask, other=0.0)
        if NORM:
            # The zero padding is of the normalized activation: re-zero it after the affine shift and SiLU.
            a = _gn_silu(a, n, c, c_ok, nstats_ptr, nw_ptr, nb_ptr, G_in, Cg_in, Cin, NORM_WEIGHT, NORM_BIAS,
                         CHANNEL_AFFINE, NORM_SILU, FAST_SILU)
            a = tl.where(a_mask, a, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_cols[None, :] + c[:, None] * swI + (tap // 3) * swH + (tap % 3) * swW,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + n.to(tl.int64) * saN + co * saC, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    pix = n.to(tl.int64) * soN + h.to(tl.int64) * soH + w.to(tl.int64) * soW
    if HAS_RESIDUAL:
        res_pix = n.to(tl.int64) * srN + h.to(tl.int64) * srH + w.to(tl.int64) * srW
        acc += tl.load(res_ptr + res_pix[:, None] + co[None, :] * srC, mask=mask, other=0.0).to(tl.float32)
    y = (acc / output_scale_factor).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pix[:, None] + co[None, :] * soC, y, mask=mask)
    if STATS:
        # Statistics of the output as stored (rounded), which is what the next GroupNorm normalizes.
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        cnt = tl.minimum(HW - tile_m * BLOCK_M, BLOCK_M).to(tl.float32)
        channel_partials(yf, mask, cnt, co, n_ok, part_ptr, n, tile_m, G_out, Cg_out, tiles_m, K_total)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's own conv setting (TF32 only where torch.backends.cudnn.allow_tf32 allows it, never in
    the interpreter); for fp16/bf16 "tf32" means plain tensor cores with fp32 accumulation."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def launch_config(dtype: torch.dtype, HW: int, Cin: int, Cout: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), tiles shrunk to the problem (tl.dot needs >= 16)."""
    if interpreting():
        bm, bn, bk, warps, stages = INTERPRETER_CONFIG
    elif dtype == torch.float32:
        bm, bn, bk, warps, stages = FP32_CONFIG
    else:
        bm, bn, bk, warps, stages = SMALL_M_CONFIG if HW <= 256 else HALF_CONFIG
    fit = lambda block, n: max(16, min(block, next_power_of_2(n)))  # noqa: E731
    return fit(bm, HW), fit(bn, Cout), fit(bk, Cin), warps, stages


def _strides4(t):
    return t.stride() if t is not None else (0, 0, 0, 0)


def conv3x3_triton(x, weight, bias, norm, add, residual, output_scale_factor, stats_groups, stats_eps, out,
                   config=None, fast_silu=False, norm_silu=True):
    """out (N, Cout, H, W) = the fused conv of x (N, Cin, H, W); all tensors in any strides. ``norm`` is None or
    (stats (N, G, 2) fp32 contiguous, weight or None, bias or None) for the prologue, or (table (N, C, 2) fp32
    contiguous of per-channel (scale, shift),) . Returns the (N*G', 2) fp32 (mean, rstd) of out's groups when
    stats_groups = G' > 0, else None. ``config`` overrides launch_config; ``fast_silu`` takes the tanh.approx
    SiLU; ``norm_silu=False`` leaves SiLU out of the prologue. The caller checked shapes, dtypes and devices."""
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    HW = H * W
    bm, bn, bk, warps, stages = config or launch_config(x.dtype, HW, Cin, Cout)
    channel_affine = norm is not None and len(norm) == 1
    if channel_affine:
        norm = (norm[0], None, None)
    tiles_m, tiles_n = cdiv(HW, bm), cdiv(Cout, bn)
    nstats, nw, nb = norm if norm is not None else (None, None, None)
    G_in = nstats.shape[-2] if nstats is not None and not channel_affine else 1
    G_out = max(stats_groups, 1)
    K_total = N * tiles_m * Cout
    partials = (torch.empty((3, K_total), device=x.device, dtype=torch.float32) if stats_groups else None)
    # The interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32, so it runs that instead.
    dot_in_fp32 = interpreting() and x.dtype == torch.bfloat16
    unused = x  # a pointer for absent tensors; the flags keep the kernel from reading it
    _conv3x3_kernel[(tiles_m * tiles_n, N)](
        x, weight, bias if bias is not None else unused, nstats if nstats is not None else unused,
        nw if nw is not None else unused, nb if nb is not None else unused, add if add is not None else unused,
        residual if residual is not None else unused, out, partials if partials is not None else unused,
        H, W, Cin, Cout, G_in, Cin // G_in, G_out, Cout // G_out, tiles_m, tiles_n, K_total,
        float(output_scale_factor), *x.stride(), *weight.stride(),
        *(add.stride() if add is not None else (0, 0)), *_strides4(residual), *out.stride(),
        NORM=norm is not None, NORM_WEIGHT=nw is not None, NORM_BIAS=nb is not None, HAS_BIAS=bias is not None,
        HAS_ADD=add is not None, HAS_RESIDUAL=residual is not None, STATS=bool(stats_groups),
        INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(x.dtype), DOT_IN_FP32=dot_in_fp32,
        CHANNEL_AFFINE=channel_affine, NORM_SILU=norm_silu, FAST_SILU=bool(fast_silu) and not interpreting(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if not stats_groups:
        return None
    return finalize_partials(partials, tiles_m * (Cout // G_out), stats_eps)


fix_cache_keys(globals())  # last: see its docstring
