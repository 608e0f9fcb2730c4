"""The patchers sdkernels.patch applies; importing a module registers its patchers, in priority order."""
from . import group_norm  # noqa: F401
from . import geglu  # noqa: F401
from . import attention  # noqa: F401
