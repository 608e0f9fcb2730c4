"""Exact low-memory forwards for the VAE decoder's high-resolution layers: work in bands of image rows.

At 1024 px the decoder's last blocks hold activations of 256-512 MiB each, and eager keeps several alive at once
(the block's input, GroupNorm+SiLU's output, conv1's output, the shortcut, conv2's output). A band forward keeps
only the input and one full-size tensor, plus a few bands:

  ResnetBlock2D   stats1 = GroupNorm statistics of the whole x (one pass), then per band of rows (with a one-row
                  halo, zero rows only at the image's edges): normalize + SiLU -> conv1 -> rows of h. Then stats2
                  of h, and per band: normalize + SiLU -> conv2 -> + shortcut(x rows) -> / scale, written back into
                  h's own rows one band late (the next band still reads the last row of this one as its halo).
  Upsample2D      per band of output rows: nearest-upsample the few input rows it needs, conv, copy into out.

With the decoder's handoff (sdkernels.patchers.bands), a ResNet block whose input nothing else will read again
(donated: see ``donated``) and whose output is no larger than its input adds only bands to what is alive: where the
input's storage has free room beside it (left by an earlier such block), h and the output go there; else, from
IN_PLACE_MIN_BYTES up, the output is written over the input's own memory:

  ResnetBlock2D, in place   stats1 of x; then h's statistics from bands of h computed and dropped; then per band,
                  sample by sample: h's rows (with the halo conv2 needs) computed again from x's rows, conv2,
                  + shortcut, / scale, and the band written over x's memory one band late: an output row takes
                  fewer bytes than an input row and lands before it (channels_last), so the rows still to be read are
                  never overwritten. conv1 runs twice: the price of never holding h whole.

Statistics always cover the whole tensor, so the result is the unbanded computation's, up to the convolution
algorithm cuDNN picks for a band's shape. Which modules qualify is checked by the callers (the GroupNorm
patchers); a band holds about BAND_BYTES of the normalized input. Bands are opt-in: sdkernels.patch(pipe,
low_memory=True), or SDKERNELS_BAND_MIN_MIB for every model.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ._env import getenv
from .ops.group_norm import group_norm_apply, group_norm_stats

BAND_BYTES = 64 << 20
# The upsampler's bands sit beside the decoder's largest pair of tensors (its input and its 4x larger output: 640
# MiB at 1024 px), so they are kept smaller there.
UPSAMPLE_BAND_BYTES = 16 << 20
# A donated ResNet block input of at least this size, with no free room beside it in its storage, takes the in-place
# forward (conv1 twice; the block's output beside its input would set the decode's peak: at 1024 px the last up
# block's 512 MiB input and 256 MiB h); its bands are smaller, as they sit beside that input. Not from 256 MiB: the
# 1024 px decode's 512 -> 256 channel block at 512 px would then leave its 128 MiB output in a 256 MiB storage,
# which the upsampler after it holds beside its 512 MiB output (H200: 843 MiB peak against 936 without in place).
IN_PLACE_MIN_BYTES = 512 << 20
IN_PLACE_BAND_BYTES = 32 << 20
_BAND_STORAGE = "_sdkernels_band_storage"
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


def band_rows(x: torch.Tensor, channels: int, band_bytes: int = 0) -> int:
    """Rows per band: about ``band_bytes`` (default BAND_BYTES) of ``channels`` channels of x's rows, at least
    one."""
    row_bytes = x.shape[0] * channels * x.shape[3] * x.element_size()
    return max(1, (band_bytes or BAND_BYTES) // max(row_bytes, 1))


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


class _Donation(threading.local):
    tensor = None  # weakref to the donated tensor, and its version counter when donated
    version = -1


_donation = _Donation()


@contextlib.contextmanager
def donated(x: torch.Tensor):
    """Inside, a band forward called on exactly ``x`` (unchanged since) may overwrite x's memory with its result:
    the caller promises that nothing reads x, or any view of its memory, afterwards."""
    _donation.tensor, _donation.version = weakref.ref(x), x._version
    try:
        yield
    finally:
        _donation.tensor, _donation.version = None, -1


def _take_donation(x: torch.Tensor) -> bool:
    if _donation.tensor is None or _donation.tensor() is not x or x._version != _donation.version:
        return False
    _donation.tensor = None  # one forward takes it
    return True


def _band_storage(t: torch.Tensor) -> torch.Tensor:
    """Mark t, a band forward's result for a donated input, as one whose storage is all its chain's: what t does not
    cover is free for the next donated band forward (_room_beside)."""
    t.__dict__[_BAND_STORAGE] = True
    return t


def _owns_storage(x: torch.Tensor) -> bool:
    """Whether all of x's storage is x's (or its chain's, see _band_storage): a donated x that is, say, one sample of
    a larger tensor leaves the rest of its storage to that tensor."""
    return bool(x.__dict__.get(_BAND_STORAGE)) or (
        x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.numel() * x.element_size())


def _room_beside(x: torch.Tensor, channels: int):
    """An NHWC tensor of x's size with ``channels`` channels in the part of x's storage that x does not cover, or
    None: only for a donated x marked by _band_storage (its storage holds nothing else alive)."""
    if not x.__dict__.get(_BAND_STORAGE):
        return None
    N, _, H, W = x.shape
    size, start, end = N * channels * H * W, x.storage_offset(), x.storage_offset() + x.numel()
    if x.untyped_storage().nbytes() // x.element_size() - end >= size:
        offset = end
    elif start >= size:
        offset = 0
    else:
        return None
    return x.as_strided((N, channels, H, W), (H * W * channels, 1, W * channels, channels), offset)


def _fits_in_place(block, x: torch.Tensor) -> bool:
    """Whether the in-place band forward can write block's output over x: one NHWC-contiguous tensor whose rows
    (per sample) are at least as wide as the output's."""
    return (x.is_contiguous(memory_format=torch.channels_last) and block.conv2.out_channels <= x.shape[1]
            and x.shape[2] >= 2 and x.numel() > 0)


def _merged_stats(parts, eps: float) -> torch.Tensor:
    """(N, G, 2) (mean, rstd) of a tensor from the statistics of its bands of rows: ``parts`` = [(rows, stats)].
    Each band's variance is recovered from its rstd (1 / rstd^2 - eps) and merged with the spread of the band
    means, in float64."""
    dtype = parts[0][1].dtype
    total = float(sum(rows for rows, _ in parts))
    weights = torch.empty((len(parts), 1, 1), dtype=torch.float64, device=parts[0][1].device)
    for i, (rows, _) in enumerate(parts):
        weights[i].fill_(rows / total)  # a fill, not a host-to-device copy: CUDA graphs can capture it
    stats = torch.stack([part for _, part in parts]).double()
    means, variances = stats[..., 0], (stats[..., 1].pow(-2) - eps).clamp_min(0)
    mean = (weights * means).sum(0)
    variance = (weights * (variances + (means - mean).square())).sum(0)
    return torch.stack([mean, torch.rsqrt(variance + eps)], dim=-1).to(dtype)


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
    time_shift = _time_shift(block, temb)
    stats1 = group_norm_stats(x, norm1.num_groups, norm1.eps)
    h = None
    if _take_donation(x) and _fits_in_place(block, x):
        # Both ways keep the decode's largest tensors alive beside the bands: smaller bands.
        small = max(band_rows(x, max(x.shape[1], conv1.out_channels), IN_PLACE_BAND_BYTES), 2)
        h = _room_beside(x, conv1.out_channels)
        if h is None and x.numel() * x.element_size() >= IN_PLACE_MIN_BYTES:
            out = _resnet_forward_in_place(block, x, stats1, time_shift, small)
            return _band_storage(out) if _owns_storage(x) else out
        if h is not None:
            _band_storage(h)
            rows = small

    if h is None:
        h = _empty_like_layout(x, conv1.out_channels, H, W)
    for r0, r1, b0, b1 in _bands(H, rows):
        h[:, :, r0:r1] = _norm_silu_conv_rows(x, stats1, norm1, conv1, r0, r1, b0, b1)
    if time_shift is not None:
        h.add_(time_shift)

    stats2 = group_norm_stats(h, norm2.num_groups, norm2.eps)
    pending = None
    for r0, r1, b0, b1 in _bands(H, rows):
        out = _plus_shortcut(block, _norm_silu_conv_rows(h, stats2, norm2, conv2, r0, r1, b0, b1), x[:, :, r0:r1])
        if pending is not None:  # this band has read the previous band's last row: its rows are free now
            h[:, :, pending[0]:pending[1]] = pending[2]
        pending = (r0, r1, out)
    h[:, :, pending[0]:pending[1]] = pending[2]
    return h


def _plus_shortcut(block, conv2_rows, x_rows):
    """(shortcut(x) + conv2's output) / output_scale_factor over a band of rows."""
    shortcut = x_rows if block.conv_shortcut is None else block.conv_shortcut(x_rows)
    out = shortcut + conv2_rows
    return out.div_(block.output_scale_factor) if block.output_scale_factor != 1.0 else out


def _time_shift(block, temb):
    """The time embedding's projection as an (N, C, 1, 1) shift of h, or None."""
    if block.time_emb_proj is None or temb is None:
        return None
    if not block.skip_time_act:
        temb = block.nonlinearity(temb)
    return block.time_emb_proj(temb)[:, :, None, None]


def _h_rows(block, x, stats1, time_shift, r0, r1):
    """Rows [r0, r1) of h = conv1(silu(norm1(x))) (+ the time shift), from x's rows around them."""
    H = x.shape[2]
    h = _norm_silu_conv_rows(x, stats1, block.norm1, block.conv1, r0, r1, max(r0 - 1, 0), min(r1 + 1, H))
    return h if time_shift is None else h + time_shift


def _resnet_forward_in_place(block, x, stats1, time_shift, rows):
    """resnet_forward's result written over x's memory (see the module docstring): x is donated, NHWC-contiguous,
    and its output rows are no wider than its input rows."""
    N, C_in, H, W = x.shape
    norm2, conv2, C_out = block.norm2, block.conv2, block.conv2.out_channels
    parts = [(r1 - r0, group_norm_stats(_h_rows(block, x, stats1, time_shift, r0, r1), norm2.num_groups, norm2.eps))
             for r0, r1, _, _ in _bands(H, rows)]
    stats2 = _merged_stats(parts, norm2.eps)
    out = x.as_strided((N, C_out, H, W), (H * W * C_out, 1, W * C_out, C_out), x.storage_offset())
    # Sample n's output row r starts at element (n*H + r)*W*C_out, its input row r at (n*H + r)*W*C_in: a band is
    # written after the next one is computed, when only input rows from that band's end - 2 on are still read
    # (the next band's halo of h, and h's of x), and rows >= 2 keeps every write before them.
    for n in range(N):
        xn = x[n:n + 1]
        shift = time_shift if time_shift is None or time_shift.shape[0] == 1 else time_shift[n:n + 1]
        pending = None
        for r0, r1, b0, b1 in _bands(H, rows):
            h = _h_rows(block, xn, stats1[n:n + 1], shift, b0, b1)
            a = group_norm_apply(h, stats2[n:n + 1], norm2.weight, norm2.bias, silu=True)
            band = _plus_shortcut(block, conv2(a)[:, :, r0 - b0:r1 - b0], xn[:, :, r0:r1])
            if pending is not None:
                out[n:n + 1, :, pending[0]:pending[1]] = pending[2]
            pending = (r0, r1, band)
        out[n:n + 1, :, pending[0]:pending[1]] = pending[2]
    return out


def group_norm_silu_in_place(x: torch.Tensor, norm) -> torch.Tensor:
    """silu(norm(x)) (a GroupNorm) written over x in bands of rows, for a donated x: the whole tensor's statistics
    first, then each band normalized into a band buffer and copied back."""
    stats = group_norm_stats(x, norm.num_groups, norm.eps)
    for r0, r1, _, _ in _bands(x.shape[2], band_rows(x, x.shape[1])):
        x[:, :, r0:r1] = group_norm_apply(x[:, :, r0:r1], stats, norm.weight, norm.bias, silu=True)
    return x


def upsample_forward(up, x: torch.Tensor) -> torch.Tensor:
    """diffusers Upsample2D's forward (nearest, factor 2, then the 3x3 conv) in bands of output rows, for an
    Upsample2D the caller checked (use_conv, no norm, no transposed conv, interpolate, no output_size)."""
    N, C, H, W = x.shape
    conv = up.conv
    out = _empty_like_layout(x, conv.out_channels, 2 * H, 2 * W)
    rows = band_rows(out, max(C, conv.out_channels), UPSAMPLE_BAND_BYTES)
    for r0, r1, _, _ in _bands(2 * H, rows):
        i0, i1 = max(r0 - 1, 0) // 2, min(r1 // 2 + 1, H)  # input rows whose copies cover rows r0 - 1 .. r1
        band = F.interpolate(x[:, :, i0:i1], scale_factor=2.0, mode="nearest")
        out[:, :, r0:r1] = conv(band)[:, :, r0 - 2 * i0:r1 - 2 * i0]
    return out
