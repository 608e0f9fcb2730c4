"""Exact low-memory forwards for the VAE decoder's high-resolution layers: work in bands of image rows.

At 1024 px the decoder's last blocks hold activations of 256-512 MiB each, and eager keeps several alive at once
(the block's input, GroupNorm+SiLU's output, conv1's output, the shortcut, conv2's output). A band forward keeps
only the input and one full-size tensor, plus a few bands:

  ResnetBlock2D   stats1 = GroupNorm statistics of the whole x (one pass), then per band of rows (with a one-row
                  halo, zero rows only at the image's edges): normalize + SiLU -> conv1 -> rows of h. Then stats2
                  of h, and per band: normalize + SiLU -> conv2 -> + shortcut(x rows) -> / scale, written back into
                  h's own rows one band late (the next band still reads the last row of this one as its halo).
  Upsample2D      per band of output rows: nearest-upsample the few input rows it needs, conv, copy into out.

Statistics always cover the whole tensor, so the result is the unbanded computation's, up to the convolution
algorithm cuDNN picks for a band's shape. Which modules qualify is checked by the callers (the GroupNorm
patchers); a band holds about BAND_BYTES of the normalized input. Bands are opt-in: sdkernels.patch(pipe,
low_memory=True), or SDKERNELS_BAND_MIN_MIB for every model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._env import getenv
from .ops.group_norm import group_norm_apply, group_norm_stats

BAND_BYTES = 64 << 20
MIN_BYTES = 64 << 20  # with low_memory, activations at least this large take the band forwards
LOW_MEMORY = "_sdkernels_low_memory"  # on a patched module: patch(..., low_memory=True) asked for bands


def min_bytes(module) -> int:
    """Activations of at least this many bytes take the band forwards in ``module`` (0: never). The environment's
    SDKERNELS_BAND_MIN_MIB decides for every module; otherwise bands are on where patch(..., low_memory=True)
    marked the module. Off by default: on an H200 (bench/results/vae_decode_low_memory.json) the bands made the
    1024 px VAE decode 17% slower (36.6 vs 31.3 ms; eager 129 ms) for a 13% lower peak (1256 vs 1447 MiB; eager
    1831)."""
    mib = getenv("SDKERNELS_BAND_MIN_MIB")
    if mib not in (None, ""):
        return int(mib) << 20
    return MIN_BYTES if module.__dict__.get(LOW_MEMORY) else 0


def wants_bands(module, x: torch.Tensor, growth: int = 1) -> bool:
    """Whether ``module`` should run x in bands: x (times ``growth``: 4 for an upsampler, whose output is what is
    large) is at least min_bytes(module)."""
    limit = min_bytes(module)
    return limit > 0 and x.dim() == 4 and x.shape[2] > 1 and growth * x.numel() * x.element_size() >= limit


def band_rows(x: torch.Tensor, channels: int) -> int:
    """Rows per band: about BAND_BYTES of ``channels`` channels of x's rows, at least one."""
    row_bytes = x.shape[0] * channels * x.shape[3] * x.element_size()
    return max(1, BAND_BYTES // max(row_bytes, 1))


def is_same_conv3x3(conv) -> bool:
    """A 3x3 convolution with stride 1 and zero padding 1: each output row reads only its input row and the two
    next to it, so a band of rows with a one-row halo gives the whole image's rows."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def is_pointwise_conv(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0))


def _bands(H: int, rows: int):
    """(r0, r1, b0, b1): output rows [r0, r1) and the input rows [b0, b1) a 3x3 conv reads for them."""
    for r0 in range(0, H, rows):
        r1 = min(r0 + rows, H)
        yield r0, r1, max(r0 - 1, 0), min(r1 + 1, H)


def _empty_like_layout(x: torch.Tensor, channels: int, H: int, W: int) -> torch.Tensor:
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((x.shape[0], channels, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)


def _norm_silu_conv_rows(x, stats, norm, conv, r0, r1, b0, b1):
    """conv(silu(norm(x))) at rows [r0, r1), from x's rows [b0, b1) normalized with the whole image's stats."""
    a = group_norm_apply(x[:, :, b0:b1], stats, norm.weight, norm.bias, silu=True)
    return conv(a)[:, :, r0 - b0:r1 - b0]


def resnet_forward(block, x: torch.Tensor, temb) -> torch.Tensor:
    """diffusers ResnetBlock2D's forward in bands (see the module docstring), for a block without up/down-sampling
    whose norms are GroupNorms followed by SiLU, convs pass is_same_conv3x3, conv_shortcut is None or pointwise,
    time embedding "default" (or none) and dropout inactive: the caller checked."""
    N, _, H, W = x.shape
    norm1, norm2, conv1, conv2 = block.norm1, block.norm2, block.conv1, block.conv2
    rows = band_rows(x, max(x.shape[1], conv1.out_channels))

    stats1 = group_norm_stats(x, norm1.num_groups, norm1.eps)
    h = _empty_like_layout(x, conv1.out_channels, H, W)
    for r0, r1, b0, b1 in _bands(H, rows):
        h[:, :, r0:r1] = _norm_silu_conv_rows(x, stats1, norm1, conv1, r0, r1, b0, b1)
    if block.time_emb_proj is not None and temb is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        h.add_(block.time_emb_proj(temb)[:, :, None, None])

    stats2 = group_norm_stats(h, norm2.num_groups, norm2.eps)
    pending = None
    for r0, r1, b0, b1 in _bands(H, rows):
        out = _norm_silu_conv_rows(h, stats2, norm2, conv2, r0, r1, b0, b1)
        shortcut = x[:, :, r0:r1]
        if block.conv_shortcut is not None:
            shortcut = block.conv_shortcut(shortcut)
        out = shortcut + out
        if block.output_scale_factor != 1.0:
            out = out.div_(block.output_scale_factor)
        if pending is not None:  # this band has read the previous band's last row: its rows are free now
            h[:, :, pending[0]:pending[1]] = pending[2]
        pending = (r0, r1, out)
    h[:, :, pending[0]:pending[1]] = pending[2]
    return h


def upsample_forward(up, x: torch.Tensor) -> torch.Tensor:
    """diffusers Upsample2D's forward (nearest, factor 2, then the 3x3 conv) in bands of output rows, for an
    Upsample2D the caller checked (use_conv, no norm, no transposed conv, interpolate, no output_size)."""
    N, C, H, W = x.shape
    conv = up.conv
    out = _empty_like_layout(x, conv.out_channels, 2 * H, 2 * W)
    rows = band_rows(out, max(C, conv.out_channels))
    for r0, r1, _, _ in _bands(2 * H, rows):
        i0, i1 = max(r0 - 1, 0) // 2, min(r1 // 2 + 1, H)  # input rows whose copies cover rows r0 - 1 .. r1
        band = F.interpolate(x[:, :, i0:i1], scale_factor=2.0, mode="nearest")
        out[:, :, r0:r1] = conv(band)[:, :, r0 - 2 * i0:r1 - 2 * i0]
    return out
