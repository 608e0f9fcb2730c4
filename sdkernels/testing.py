"""What the tests and benchmarks agree on: one tolerance table per dtype and a comparison that says where and by
how much two tensors differ. References are computed in float64 on upcast inputs."""
from __future__ import annotations

import contextlib
import math
import os

import torch

# (atol, rtol) for an output of this dtype against a float64 reference of the same inputs. Half an ulp of
# rounding the output is 2**-11 (fp16), 2**-8 (bf16), 2**-24 (fp32); the rest is fp32 arithmetic inside.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float64: (1e-10, 1e-10),
}


@contextlib.contextmanager
def env_set(name: str, value: str):
    """Environment variable ``name`` set to ``value`` inside the block, restored after (a knob forced for a run)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def tf32_off():
    """fp32 comparisons on a GPU: cuDNN's convolutions (and our fp32 dots, which follow its switch) default to TF32,
    which turns a 1e-7 difference into one TF32 rounding step (5e-4)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def tolerance(dtype: torch.dtype, reduction_size: int = 1):
    """(atol, rtol) for dtype; atol grows with the square root of the length of the fp32 reduction behind it."""
    atol, rtol = TOLERANCES[dtype]
    return atol + 2e-7 * math.sqrt(max(reduction_size, 1)), rtol


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 reduction_size: int = 1, what: str = "") -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|, NaN never passing; on failure, says how many
    elements differ, the worst ones with their indices, and the tolerance used."""
    dtype = dtype or actual.dtype
    atol, rtol = tolerance(dtype, reduction_size)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so it lands in bad
    if not bad.any():
        return
    n_bad = int(bad.sum())
    flat = torch.where(bad.flatten(), err.flatten().nan_to_num(float("inf")), torch.zeros(()))
    worst = flat.topk(min(5, n_bad)).indices
    lines = []
    for i in worst.tolist():
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        lines.append(f"  at {idx}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}")
    raise AssertionError(
        f"{what}: {n_bad} of {a.numel()} elements differ beyond atol={atol:.3g}, rtol={rtol:.3g} ({dtype}); "
        f"max abs error {err.nan_to_num(float('inf')).max().item():.3g}, relative error "
        f"{relative_error(a.nan_to_num(0), e):.3g}\n" + "\n".join(lines))


def randomize_weights(model, seed: int = 0):
    """Weights with unit-ish gain per layer (diffusers' init leaves some outputs tiny) and norms' affine away from 1
    and 0, from a seeded CPU generator; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()
