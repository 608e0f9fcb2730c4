"""patch()'s ``channels_last``: a model's 4-D weights laid out channels_last (NHWC), as fast SD pipelines run them,
and put back exactly by unpatch().

With the weights channels_last, cuDNN and the fused kernels produce channels_last activations from the first conv
on, so the whole UNet or VAE runs NHWC without a layout copy. The conversion keeps every Parameter object (only its
storage changes), so optimizers, LoRA adapters and hooks that hold the parameters keep working."""
import itertools

import torch
from torch import nn

_ORIGINAL_STRIDES = "_sdkernels_original_strides"  # {tensor name: its strides before patch() re-laid it out}


def _named_tensors(model: nn.Module):
    return itertools.chain(model.named_parameters(), model.named_buffers())


def to_channels_last(model: nn.Module) -> int:
    """Lay out each 4-D parameter and buffer of ``model`` that is not channels_last yet as channels_last,
    remembering its strides for restore_layout(); returns how many it changed. Calling it again changes nothing."""
    original = model.__dict__.setdefault(_ORIGINAL_STRIDES, {})
    changed = 0
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            if tensor.dim() != 4 or tensor.is_contiguous(memory_format=torch.channels_last):
                continue
            original.setdefault(name, tensor.stride())
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
            changed += 1
    return changed


def restore_layout(model: nn.Module) -> None:
    """Give each tensor to_channels_last() changed its original strides back (its values as they are now)."""
    original = model.__dict__.pop(_ORIGINAL_STRIDES, {})
    if not original:
        return
    tensors = dict(_named_tensors(model))
    with torch.no_grad():
        for name, stride in original.items():
            tensor = tensors.get(name)
            if tensor is None or tensor.dim() != 4 or tensor.stride() == stride:
                continue
            restored = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device)
            restored.copy_(tensor.data)
            tensor.data = restored
