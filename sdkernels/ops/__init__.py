"""The sdkernels:: ops: each module defines one op family's reference, fake, checks and backends."""
from .add_layer_norm import add_layer_norm, add_layer_norm_reference
from .attention import attention_reference, flash_attention
from .bias_add import add_bias_residual_, add_bias_residual_reference
from .conv3x3 import conv3x3_fused, conv3x3_reference
from .conv3x3_plain import conv3x3_eager  # the op's wrapper is sdkernels.conv3x3: here that name is a module
from .geglu import geglu, geglu_reference, gelu, gelu_reference, linear_geglu, linear_geglu_reference
from .group_norm import (group_norm, group_norm_apply, group_norm_apply_reference, group_norm_reference,
                         group_norm_stats, group_norm_stats_reference)
from .resnet_block import resnet_block
from .winograd import winograd_conv3x3_reference

__all__ = ["flash_attention", "attention_reference", "conv3x3_fused", "conv3x3_reference", "group_norm",
           "group_norm_reference", "group_norm_stats", "group_norm_stats_reference", "geglu", "geglu_reference", "gelu",
           "gelu_reference", "linear_geglu", "linear_geglu_reference", "resnet_block"]
__all__ += ["add_bias_residual_", "add_bias_residual_reference", "conv3x3_eager", "winograd_conv3x3_reference", "group_norm_apply", "group_norm_apply_reference"]
__all__ += ["add_layer_norm", "add_layer_norm_reference"]
