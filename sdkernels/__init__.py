"""sdkernels: fused Triton and CUDA C++ kernels for Stable Diffusion inference in diffusers.

    import sdkernels
    sdkernels.patch(pipe)     # swap our ops into the pipeline's UNet and VAE
    sdkernels.unpatch(pipe)   # restore the originals
"""
from . import dispatch, ops
from .dispatch import SdkernelsFallbackWarning, use_backend
from .ops import group_norm
from .ops._common import SdkernelsInputError

__version__ = "0.1.0"


def patch(pipe_or_model, **kwargs):
    from .patch import patch as _patch
    return _patch(pipe_or_model, **kwargs)


def unpatch(pipe_or_model):
    from .patch import unpatch as _unpatch
    return _unpatch(pipe_or_model)


__all__ = ["patch", "unpatch", "group_norm", "use_backend", "dispatch", "ops", "SdkernelsFallbackWarning",
           "SdkernelsInputError", "__version__"]
