"""The sdkernels:: ops: each module defines one op family's reference, fake, checks and backends."""
from .geglu import geglu, geglu_reference, gelu, gelu_reference, linear_geglu, linear_geglu_reference
from .group_norm import group_norm, group_norm_reference

__all__ = ["group_norm", "group_norm_reference", "geglu", "geglu_reference", "gelu", "gelu_reference",
           "linear_geglu", "linear_geglu_reference"]
