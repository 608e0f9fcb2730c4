"""Probe one flash-attention kernel configuration on the GPU, in its own process (a memory error ends only it):
    python scripts/probe_attention.py D DTYPE CHUNKS CONFIG     e.g. 40 fp16 32,16 64,128,4,3
prints the relative error against the float32 reference for a few odd shapes, or dies with the CUDA error."""
import sys

import torch

from sdkernels.kernels import flash_attention as fa
from sdkernels.ops.attention import as_bhnd, attention_reference
from sdkernels.testing import relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1
d, dtype = int(sys.argv[1]), {"fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[2]]
fa.HEAD_DIM_CHUNKS[d] = tuple(int(v) for v in sys.argv[3].split(","))
config = tuple(int(v) for v in sys.argv[4].split(","))
worst = 0.0
for B, H, N, Nk in ((1, 3, 77, 77), (2, 8, 300, 77), (2, 5, 1024, 1024), (1, 2, 129, 200)):
    q, k, v = (torch.randn(B, n, H * d, device=DEVICE, dtype=dtype) for n in (N, Nk, Nk))
    out = torch.full_like(q, float("nan"))
    fa.flash_attention_triton(*(as_bhnd(t, H) for t in (q, k, v, out)), d ** -0.5, None, config=config)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    worst = max(worst, relative_error(out, attention_reference(q, k, v, d ** -0.5, None, H)))
print(f"probe d={d} {sys.argv[2]} chunks={sys.argv[3]} config={sys.argv[4]}: worst relative error {worst:.3g}")
