"""The patchers sdkernels.patch applies; importing a module registers its patchers, in priority order."""
from . import group_norm  # noqa: F401
from . import geglu  # noqa: F401
from . import attention  # noqa: F401
from . import resnet_block  # noqa: F401  (opt-in; registers itself ahead of resnet_gn_silu)
from . import bands  # noqa: F401
from . import layout  # noqa: F401
from . import pointwise_conv  # noqa: F401
from . import layer_norm  # noqa: F401
from . import transformer_block  # noqa: F401  (registers itself ahead of layer_norm)
from . import conv3x3  # noqa: F401
from . import projections  # noqa: F401  (after attention and group_norm: it groups the layers they call)
