"""The sdkernels:: ops: each module defines one op family's reference, fake, checks and backends."""
from .attention import attention_reference, flash_attention
from .geglu import geglu, geglu_reference, gelu, gelu_reference, linear_geglu, linear_geglu_reference
from .group_norm import group_norm, group_norm_reference

__all__ = ["flash_attention", "attention_reference", "group_norm", "group_norm_reference", "geglu", "geglu_reference", "gelu", "gelu_reference",
           "linear_geglu", "linear_geglu_reference"]
