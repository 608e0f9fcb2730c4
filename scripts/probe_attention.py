"""Probe one flash-attention kernel configuration on the GPU, in its own process (a memory error ends only it):
    python scripts/probe_attention.py D DTYPE CHUNKS CONFIG [MASK|-] [fold-tail|tail-first|tail-after] [overlap]
e.g. 80 fp16 64,16 64,64,4,3 - tail-first.
MASK: "keys" (a key-padding mask shared by every query), "keys-vector" (the same, loaded as one vector even with two
head-dim chunks: VECTOR_MASK_WITH_TWO_CHUNKS) or "full" (one mask row per query); "-" for none. "fold-tail": the key
loop masks every block instead of a separate partial block after it; "tail-first": the partial block before the loop
(TAIL_MODE; default: the kernel's own choice, tail_mode). "overlap": the second head-dim chunk ends at the head dim
(OVERLAP_LAST_CHUNK). Prints the relative error against the float32 reference
for a few odd shapes, or dies with the CUDA error."""
import sys

import torch

from sdkernels.kernels import flash_attention as fa
from sdkernels.ops.attention import as_bhnd, attention_reference
from sdkernels.testing import relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1
d, dtype = int(sys.argv[1]), {"fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[2]]
fa.HEAD_DIM_CHUNKS[d] = tuple(int(v) for v in sys.argv[3].split(","))
config = tuple(int(v) for v in sys.argv[4].split(","))
mask_name = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else "none"
fa.VECTOR_MASK_WITH_TWO_CHUNKS = mask_name == "keys-vector"
options = sys.argv[6:]
fa.TAIL_MODE = next((mode for name, mode in {"fold-tail": 1, "tail-first": 2, "tail-after": 0}.items()
                     if name in options), None)
fa.OVERLAP_LAST_CHUNK = "overlap" in options
worst = 0.0
# (1, 2, 65, 300): d = 80 and 160 went wrong there on an H100 (4 full key blocks of 64 and a tail) while the others
# passed; (1, 2, 65, 700): many full blocks and a tail, to see whether one-chunk head dims (64) go wrong there too.
for B, H, N, Nk in ((1, 3, 77, 77), (2, 8, 300, 77), (2, 5, 1024, 1024),
                    (1, 2, 129, 200), (1, 2, 65, 300),
                    (1, 2, 65, 700)):
    q, k, v = (torch.randn(B, n, H * d, device=DEVICE, dtype=dtype) for n in (N, Nk, Nk))
    mask = None
    if mask_name != "none":
        rows = 1 if mask_name.startswith("keys") else N
        mask = torch.where(torch.rand(B, 1, rows, Nk, device=DEVICE) < 0.3, -10000.0, 0.0).to(dtype)
        mask[..., 0] = 0  # every row keeps a key
    out = torch.full_like(q, float("nan"))
    mask_view = mask.expand(B, H, N, Nk) if mask is not None else None
    fa.flash_attention_triton(*(as_bhnd(t, H) for t in (q, k, v, out)), d ** -0.5, mask_view, config=config)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    worst = max(worst, relative_error(out, attention_reference(q, k, v, d ** -0.5, mask, H)))
print(f"probe d={d} {sys.argv[2]} chunks={sys.argv[3]} config={sys.argv[4]} mask={mask_name} "
      f"tail_mode={'auto' if fa.TAIL_MODE is None else fa.TAIL_MODE} overlap={fa.OVERLAP_LAST_CHUNK}: "
      f"worst relative error {worst:.3g}")
