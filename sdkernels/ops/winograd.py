"""Winograd F(2x2, 3x3) for a 3x3 convolution (stride 1, zero padding 1) in PyTorch: the transform matrices, the
three transforms, a reference built from them that computes what csrc/winograd_conv3x3.cu computes, the error
bound that follows, and the cache of transformed filters the CUDA backend reads.

Each 2x2 output tile comes from a 4x4 input patch d (neighbouring patches overlap by 2) and the 3x3 filter g of
each (k, c) pair:

    Y = A^T [ sum_c (G g G^T) .* (B^T d B) ] A          (.* elementwise: 16 products per tile where direct takes 36)

With V[e, tile, c] = (B^T d B)[e] and U[e, c, k] = (G g G^T)[e] at the 16 positions e = 4 * xi + nu, the sum over c
is 16 independent GEMMs M[e] = V[e] @ U[e], and each tile's output is A^T M A. The image gets one zero row and
column on each side, and one more at the bottom / right when H / W is odd, so that whole tiles cover it; outputs
past H, W are cropped. Tiles are numbered (n, tile row, tile column), as the kernel numbers them.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .group_norm import compute_dtype

# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), F(2, 3) as a correlation (what
# F.conv2d computes): y0 = d0 g0 + d1 g1 + d2 g2, y1 = d1 g0 + d2 g1 + d3 g2.
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


@dataclasses.dataclass(frozen=True)
class Variant:
    """A Winograd F(m x m, 3 x 3): m x m output tiles from (m + 2) x (m + 2) input patches, (m + 2)^2 GEMMs."""
    name: str
    B_T: tuple
    G: tuple
    A_T: tuple

    @property
    def m(self) -> int:  # outputs per tile side
        return len(self.A_T)

    @property
    def a(self) -> int:  # input patch side
        return len(self.B_T)


F2X2 = Variant("F(2x2,3x3)", B_T, G, A_T)  # what the CUDA kernel computes
# F(4x4, 3x3) on 6x6 patches (the same paper; what mobile GPU delegates use): 36 products per 16 outputs where
# direct takes 144 (4x fewer against F(2x2)'s 2.25x), but transform entries up to 8 and 5 amplify the operands'
# rounding more (issue 6's stretch: its error is measured against F(2x2)'s, no kernel computes it).
F4X4 = Variant("F(4x4,3x3)",
               ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
               ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
               ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))


def apply_along(rows, t: torch.Tensor, dim: int, absolute: bool = False) -> torch.Tensor:
    """out_i = sum_j rows[i][j] * t_j along ``dim``, summed left to right as the kernel does, with elementwise
    arithmetic: no matmul, so no TF32 whatever torch.backends allows (|rows| with ``absolute``)."""
    parts = t.unbind(dim)
    out = []
    for row in rows:
        terms = [abs(c) * p if absolute else c * p for c, p in zip(row, parts) if c != 0]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        out.append(total)
    return torch.stack(out, dim)


def filter_transform(weight: torch.Tensor, absolute: bool = False, variant: Variant = F2X2) -> torch.Tensor:
    """U (a^2, C, K) = G g G^T for each filter g = weight[k, c] of a (K, C, 3, 3) weight (a = 4 for F(2x2)), in
    compute_dtype (fp32, fp64 for fp64). ``absolute`` uses |G| (for the error bound)."""
    g = weight.to(compute_dtype(weight))
    u = apply_along(variant.G, apply_along(variant.G, g, 2, absolute), 3, absolute)  # (K, C, a, a)
    K, C = weight.shape[:2]
    return u.reshape(K, C, variant.a**2).permute(2, 1, 0).contiguous()


def tile_grid(H: int, W: int, m: int = 2) -> tuple:
    """(tile rows, tile columns): m x m output tiles covering H x W."""
    return -(-H // m), -(-W // m)


def input_tiles(x: torch.Tensor, variant: Variant = F2X2) -> torch.Tensor:
    """(N, C, tiles_h, tiles_w, a, a): the a x a patches of x (a = m + 2, neighbours overlapping by 2), zero outside
    the image."""
    H, W = x.shape[2:]
    m = variant.m
    th, tw = tile_grid(H, W, m)
    padded = F.pad(x, (1, m * tw + 1 - W, 1, m * th + 1 - H))  # m * tiles + 2 rows and columns
    return padded.unfold(2, variant.a, m).unfold(3, variant.a, m)


def input_transform(tiles: torch.Tensor, absolute: bool = False, variant: Variant = F2X2) -> torch.Tensor:
    """V (a^2, N * tiles_h * tiles_w, C) = B^T d B of every patch and channel (|B^T| |d| |B| with ``absolute``):
    rows first, then columns, as the kernel."""
    v = apply_along(variant.B_T, apply_along(variant.B_T, tiles, -2, absolute), -1, absolute)
    return v.permute(4, 5, 0, 2, 3, 1).reshape(variant.a**2, -1, tiles.shape[1])


def output_transform(m: torch.Tensor, N: int, H: int, W: int, absolute: bool = False,
                     variant: Variant = F2X2) -> torch.Tensor:
    """(N, K, H, W) from the GEMM results M (a^2, tiles, K): A^T M A per tile and channel, cropped to H x W
    (|A^T| M |A| with ``absolute``)."""
    a, side = variant.a, variant.m
    th, tw = tile_grid(H, W, side)
    K = m.shape[-1]
    per_tile = m.reshape(a, a, N, th, tw, K).permute(2, 5, 3, 4, 0, 1)       # (N, K, th, tw, a, a)
    y = apply_along(variant.A_T, apply_along(variant.A_T, per_tile, -2, absolute), -1, absolute)  # (.., m, m)
    return y.permute(0, 1, 2, 4, 3, 5).reshape(N, K, side * th, side * tw)[:, :, :H, :W]


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of V and U in the GEMMs: the input's for fp16/bf16 (tensor cores), else the compute dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else (torch.float64 if dtype == torch.float64
                                                                    else torch.float32)


def winograd_conv3x3_reference(x, weight, bias=None, residual=None, scale=1.0, u=None, variant: Variant = F2X2):
    """(conv3x3(x) + bias + residual) * scale the way the CUDA kernel computes it: the transforms in compute_dtype
    (fp32; fp64 for fp64) with the kernel's operations in its order, V and U rounded to the operand dtype, the GEMMs
    summed in float64 and rounded to compute_dtype (the kernel's fp32 sums differ from that by their own rounding),
    output transform and epilogue in compute_dtype, one rounding to x's dtype at the end. ``u``: a precomputed
    filter_transform(weight). ``variant``: F2X2 (the kernel's) or F4X4. Contiguous NCHW out."""
    compute, operands = compute_dtype(x), operand_dtype(x.dtype)
    N, _, H, W = x.shape
    v = input_transform(input_tiles(x.to(compute), variant), variant=variant).to(operands).double()
    u = (filter_transform(weight, variant=variant) if u is None else u).to(operands).double()
    y = output_transform(torch.bmm(v, u).to(compute), N, H, W, variant=variant)
    if bias is not None:
        y = y + bias.to(compute)[:, None, None]
    if residual is not None:
        y = y + residual.to(compute)
    return (y * scale).to(x.dtype).contiguous()


# ---- the error bound ------------------------------------------------------------------------------------------
#
# Per output element, against the exact (float64) result of the same inputs, a Winograd result in dtype differs by
# at most
#
#     Z * S * (sqrt(2) * u_operand + sqrt(C) * u_accumulate) + u_output * |exact| + 3 * u_accumulate * E
#
#   S  = |scale| * sqrt( sum_{e feeding the element} sum_c (|B^T| |d| |B|)_e^2 (|G| |g| |G^T|)_e^2 ):
#        the size of the products the rounded operands enter. Rounding V and U to the operand dtype (relative error
#        at most u_operand each; two roundings per product, hence sqrt(2)) perturbs each product; the errors of the
#        9 positions e x C channels behind one output are independent, so their sum stays below Z times its
#        standard deviation but for a probability of 2 exp(-Z^2 / 2) (Hoeffding): 2.5e-14 at Z = 8. The absolute
#        transforms bound the transforms' own fp32 rounding too (at most ~4 roundings of magnitude |B^T||d||B|,
#        folded into fp32's u_operand), and sqrt(C) * u_accumulate is the fp32 sum over the channels.
#   E  = |scale| * (|conv| + |bias| + |residual|): the epilogue's fp32 additions and product.
#
# The sqrt terms assume rounding errors that vary from term to term, as they do for real activations and weights
# (the project's other tolerances assume the same). Constant inputs make them add up coherently, C times one term
# instead of sqrt(C) times: fp32 at C = 512 with every x and g equal exceeds the bound 5-fold; fp16/bf16 stay inside.
#
# In numbers, for unit-variance inputs and unit-gain weights (outputs of unit variance): the bound of one element is
# about 60 u_operand (fp16 0.03, bf16 0.23, fp32 5e-5 at C = 256), and the largest error seen over 65k outputs is
# 4 to 5 u_operand, 8% of it (tests/test_conv3x3_winograd.py measures both).
#
# Against a direct convolution, F(2x2, 3x3) amplifies operand rounding by the transforms' norms: for unit-variance
# inputs and unit-gain weights, the 9 positions feeding one output have E[sum_e V_e^2 U_e^2] =
# (sum_xi |B^T_xi|^2 |G_xi|^2)^2 = 25 where the direct sum has 9 products of unit size, so the error's rms is
# sqrt(2 * 25 / 9) = 2.4 times the rms relative rounding error times the output's rms. A direct convolution (exact
# products, fp32 sums) has only its output rounding, 1 times: Winograd's error is about 2.4x cuDNN's in fp16 and
# bf16 (measured 2.5x), the price of rounding the transformed operands. The fp32 path has no such term worth naming.
#
# One row per dtype: (u_operand, u_output, u_accumulate).
ROUNDING = {
    torch.float16: (2.0**-11, 2.0**-11, 2.0**-24),
    torch.bfloat16: (2.0**-8, 2.0**-8, 2.0**-24),
    torch.float32: (2.0**-22, 2.0**-24, 2.0**-24),
    torch.float64: (2.0**-51, 2.0**-53, 2.0**-53),
}
TAIL_Z = 8.0
TINY = 1e-30  # keeps a bound of exact zeros (all-zero inputs) from being 0 where rounding of 0 is exact anyway


def error_bound(x, weight, bias=None, residual=None, scale=1.0, operands_rounded=True, output_roundings=1,
                variant: Variant = F2X2):
    """(exact, bound): the float64 result (contiguous NCHW, on x's device) and the per-element bound above for a
    Winograd result in x's dtype. ``operands_rounded=False`` leaves out the operand rounding (two results that
    share the same rounded V and U: the kernel against winograd_conv3x3_reference); ``output_roundings`` counts
    the results rounded to x's dtype (2 when comparing two such results)."""
    u_operand, u_output, u_accumulate = ROUNDING[x.dtype]
    N, C, H, W = x.shape
    xd, wd = x.double(), weight.double()
    conv = F.conv2d(xd, wd, padding=1)
    exact = conv
    magnitude = conv.abs()
    if bias is not None:
        exact = exact + bias.double()[:, None, None]
        magnitude = magnitude + bias.double().abs()[:, None, None]
    if residual is not None:
        exact = exact + residual.double()
        magnitude = magnitude + residual.double().abs()
    exact = exact * scale
    v2 = input_transform(input_tiles(xd.abs(), variant), absolute=True, variant=variant).square()
    u2 = filter_transform(wd.abs(), absolute=True, variant=variant).square()
    # The output transform sums independent errors: their variances add with the squares of A's entries (for
    # F(2x2) these are its absolute values, 0 and 1).
    squared = dataclasses.replace(variant, A_T=tuple(tuple(c * c for c in row) for row in variant.A_T))
    size = output_transform(torch.bmm(v2, u2), N, H, W, absolute=True, variant=squared).sqrt() * abs(scale)
    per_product = (math.sqrt(2) * u_operand if operands_rounded else 0.0) + math.sqrt(C) * u_accumulate
    bound = (TAIL_Z * per_product * size + output_roundings * u_output * exact.abs()
             + 3 * u_accumulate * abs(scale) * magnitude + TINY)
    return exact.contiguous(), bound.contiguous()


def rounding_errors(x, weight, variant: Variant = F2X2) -> dict:
    """For inputs x, weight (no bias): the float64 convolution ``exact``, the errors against it of the Winograd
    reference (``winograd``) and of a direct convolution with exact products and sums rounded once to x's dtype
    (``direct``), and the per-element ``bound`` (error_bound), all float64."""
    exact, bound = error_bound(x, weight, variant=variant)
    return dict(exact=exact, bound=bound, direct=exact.to(x.dtype).double() - exact,
                winograd=winograd_conv3x3_reference(x, weight, variant=variant).double() - exact)


# ---- transformed filters, cached per weight ------------------------------------------------------------------

class _Entry:
    __slots__ = ("key", "u", "captured")

    def __init__(self, key, u):
        self.key, self.u, self.captured = key, u, False


_filters = WeakIdKeyDictionary()  # weight -> _Entry; an entry goes with its weight
_kept_for_graphs = []             # U tensors a captured CUDA graph reads: never freed under it


def _capturing(weight) -> bool:
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


def transformed_filter(weight: torch.Tensor) -> torch.Tensor:
    """filter_transform(weight) rounded to weight's dtype (what the kernel reads), computed once per weight and
    reused while the weight's storage, version counter and dtype stay the same: an in-place change (LoRA fusing
    with ``weight.add_``) bumps ``weight._version``, and ``weight.data = ...`` moves its storage, so either makes
    the next call transform it again. Not seen: writes through ``weight.data`` in place (``weight.data += d``,
    peft's default LoRA merge), which give the tensor a new version counter of its own: sdkernels.patch wraps
    diffusers' fuse_lora and unfuse_lora to forget them (sdkernels.weights), other such code must call
    ``sdkernels.weights_changed(model)`` or ``forget_filter(weight)``.
    Inference tensors (made under torch.inference_mode) have no version counter and are transformed every call.

    Under CUDA-graph capture a cached U is read in place and kept alive for good (the graph holds its address);
    a U missing from the cache is computed inside the graph, so every replay transforms the weight anew."""
    if weight.is_inference():
        return filter_transform(weight).to(weight.dtype)
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    entry = _filters.get(weight)
    capturing = _capturing(weight)
    if entry is not None and entry.key == key:
        entry.captured |= capturing
        return entry.u
    u = filter_transform(weight).to(weight.dtype)
    if capturing:
        return u
    if entry is not None and entry.captured:
        _kept_for_graphs.append(entry.u)
    _filters[weight] = _Entry(key, u)
    return u


def forget_filter(weight: torch.Tensor) -> None:
    """Drop weight's cached transform (after writing it in place through ``weight.data``)."""
    entry = _filters.pop(weight, None)
    if entry is not None and entry.captured:
        _kept_for_graphs.append(entry.u)
