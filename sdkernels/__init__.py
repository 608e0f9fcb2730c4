"""sdkernels: fused Triton and CUDA C++ kernels for Stable Diffusion inference in diffusers.

    import sdkernels
    sdkernels.patch(pipe)     # swap our ops into the pipeline's UNet and VAE
    sdkernels.unpatch(pipe)   # restore the originals
"""
from . import dispatch, ops
from .dispatch import SdkernelsFallbackWarning, use_backend
from .ops import add_layer_norm, flash_attention, geglu, gelu, group_norm, linear_geglu
from .ops._common import SdkernelsInputError
from .ops.conv3x3_plain import conv3x3
from .patch import default_ops, patch, unpatch  # imports only torch: patchers and diffusers load on the first call
from .weights import weights_changed

__version__ = "0.1.0"


__all__ = ["patch", "unpatch", "default_ops", "flash_attention", "group_norm", "geglu", "gelu", "linear_geglu",
           "use_backend", "dispatch", "ops", "SdkernelsFallbackWarning", "SdkernelsInputError", "__version__"]
__all__ += ["conv3x3", "add_layer_norm", "weights_changed"]
