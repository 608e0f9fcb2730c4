"""layer_norm: nn.LayerNorm over the last dim as sdkernels::group_norm with one group on the (rows, C, 1) view.

A LayerNorm of (..., C) normalizes each row of C values with their mean and biased variance, then applies a
per-channel affine: exactly GroupNorm with one group of a (rows, C, 1) tensor, which the op's Triton kernel computes
with one program per row and fp32 statistics. In the SD1.5 step on an H200 PyTorch's LayerNorm kernel took 14.4 us
per call at (2, 4096, 320) where the op took 8.0 us, and 1.6x-2.0x less at every transformer shape of SD1.5 and SDXL
(``scripts/probe_layer_norm.py``). Inputs the view does not fit (non-contiguous rows, dtypes other than the
weights', fp64) and autograd / autocast calls run nn.LayerNorm.forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._common import KERNEL_DTYPES
from ..ops.group_norm import group_norm
from ..patch import Patcher, bind_forward, must_run_original, original_forward, register, unbind_forward, why_not_plain


def _runs_as_group_norm(norm: nn.LayerNorm, x) -> bool:
    return (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.dtype in KERNEL_DTYPES and x.is_contiguous()
            and all(p is None or p.dtype == x.dtype for p in (norm.weight, norm.bias))
            and x.shape[-1] == norm.normalized_shape[0] and not must_run_original(x, norm.weight, norm.bias))


def _layer_norm_forward(self, x):
    if not _runs_as_group_norm(self, x):
        return original_forward(self)(x)
    rows = x.view(-1, x.shape[-1], 1)
    return group_norm(rows, 1, self.weight, self.bias, self.eps).view(x.shape)


def _find(model):
    return ((name, m) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm))


def _why_not(norm) -> Optional[str]:
    reason = why_not_plain(norm, nn.LayerNorm, "the norm", hooks_matter=False)  # hooks still run
    if reason:
        return reason
    if len(norm.normalized_shape) != 1:
        return f"normalizes over {len(norm.normalized_shape)} dims (the op takes one)"
    return None


register(Patcher(name="layer_norm", find=_find, why_not=_why_not,
                 apply=lambda norm: bind_forward(norm, _layer_norm_forward), restore=unbind_forward))
