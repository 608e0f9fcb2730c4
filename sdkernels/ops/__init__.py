"""The sdkernels:: ops: each module defines one op family's reference, fake, checks and backends."""
from .group_norm import group_norm, group_norm_reference

__all__ = ["group_norm", "group_norm_reference"]
