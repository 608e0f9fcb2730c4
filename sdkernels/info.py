"""python -m sdkernels.info: versions, the GPU, and which backend of which op can run here and why not."""
import platform

import torch

from . import __version__, _ext, dispatch, tuning
from . import ops as _ops  # noqa: F401  (registers every op)


def probe_inputs(device):
    """A typical input per op, to ask each backend whether it would run it."""
    half = dict(device=device, dtype=torch.float16)
    x = torch.randn(2, 64, 8, 8, **half).to(memory_format=torch.channels_last)
    w = torch.ones(64, **half)
    tokens = torch.randn(2, 64, 320, **half)
    proj = torch.randn(2 * 1280, 320, **half)
    conv = torch.randn(64, 64, 3, 3, **half).to(memory_format=torch.channels_last)  # as patch() passes conv weights
    stats = torch.zeros(2, 32, 2, device=device)
    return {"group_norm": (x, 32, w, w, 1e-5, True, None), "group_norm_stats": (x, 32, 1e-5),
            "group_norm_apply": (x, stats, w, w, True),
            "conv3x3_fused": (x, conv, w, stats, w, w, None, x, 1.0, 32, 1e-6), "conv3x3": (x, conv, w, x, 1.0),
            "gelu": (tokens, "none"), "geglu": (tokens, "none"),
            "linear_geglu": (tokens, proj, torch.randn(2 * 1280, **half), "none"),
            "flash_attention": (tokens, tokens, tokens, 40 ** -0.5, None, 8),
            "add_layer_norm": (tokens, tokens, tokens[0, 0], tokens[0, 0], 1e-5)}


def report() -> str:
    lines = [f"sdkernels {__version__}", f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
        device = "cuda"
    else:
        lines.append("GPU: none (Triton kernels run only under TRITON_INTERPRET=1 on the CPU)")
        device = "cpu"
    reason = _ext.unavailable_reason()
    lines.append("CUDA extension: " + ("available (%s)" % ("built ahead of time" if _ext.built_ahead_of_time()
                                                          else "compiled on first use") if reason is None
                                       else f"unavailable: {reason}"))
    lines.append(f"measured backend choices (patch(tune=True)): {tuning.cache_path()}")
    probes = probe_inputs(device)
    for name, op in dispatch.ops().items():
        lines.append(f"op sdkernels::{name}")
        args = probes.get(name)
        for b in op.backends:
            why = b.available() or (b.why_not(*args) if args is not None else None)
            lines.append(f"  {b.name:10s} " + ("available" if why is None else f"unavailable: {why}"))
        lines.append(f"  {dispatch.REFERENCE:10s} available (eager PyTorch)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
