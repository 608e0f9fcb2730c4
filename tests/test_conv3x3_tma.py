"""sdkernels::conv3x3's triton_tma backend: the implicit-GEMM convolution whose operands tensor descriptors load.

CPU lane: the kernel in Triton's interpreter against a float64 convolution, hypothesis over shapes (odd, 1 x 1,
channels that fill no block), epilogues, residual layouts, one or two samples per tile and K splits; the reasons it
gives for inputs it does not take, after which the op still computes the convolution. GPU lane: the SD1.5 UNet's and
VAE decoder's shapes (grids of many waves, split-K at 8 x 8), odd ones, CUDA-graph capture. Outputs are NaN-poisoned
before the kernel writes them (conftest sets SDKERNELS_POISON_OUTPUTS=1).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st

import sdkernels
from sdkernels import SdkernelsFallbackWarning, dispatch
from sdkernels.ops.conv3x3_plain import OP, output_like
from sdkernels.testing import assert_close
from conftest import DEVICE, GPU

HALF = [torch.float16, torch.bfloat16]
CL = torch.channels_last


def make_case(N, C, K, H, W, dtype, bias=True, residual=True, residual_layout=CL, seed=0):
    """channels_last x and weight (as a model.to(memory_format=torch.channels_last) holds them), unit-variance x and
    residual, unit-gain weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C, 3, 3, generator=g) / math.sqrt(9 * C)
    b = 0.5 * torch.randn(K, generator=g) if bias else None
    r = torch.randn(N, K, H, W, generator=g) if residual else None
    move = lambda t, fmt=torch.contiguous_format: None if t is None else t.to(DEVICE, dtype).contiguous(  # noqa: E731
        memory_format=fmt)
    return move(x, CL), move(w, CL), move(b), move(r, residual_layout)


def exact(x, w, b, r, scale):
    y = F.conv2d(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu(), padding=1)
    return (y if r is None else y + r.double().cpu()) * scale


def run_tma(x, w, b, r, scale):
    with sdkernels.use_backend("triton_tma", op=OP):
        out = sdkernels.conv3x3(x, w, b, r, scale)
    assert dispatch.last_backend(OP) == "triton_tma"
    assert out.stride() == output_like(x, w.shape[0], poison=False).stride(), "output must keep x's memory format"
    return out


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), C=st.sampled_from([8, 16, 40]), K=st.sampled_from([1, 8, 24]),
       H=st.sampled_from([1, 2, 5, 8]), W=st.sampled_from([1, 3, 4, 9]), dtype=st.sampled_from(HALF),
       bias=st.booleans(), residual=st.booleans(), scale=st.sampled_from([1.0, 0.5]),
       residual_layout=st.sampled_from([CL, torch.contiguous_format]))
def test_triton_tma_backend(batch, C, K, H, W, dtype, bias, residual, scale, residual_layout):
    x, w, b, r = make_case(batch, C, K, H, W, dtype, bias, residual, residual_layout)
    note(f"x {tuple(x.shape)} {dtype}, K={K}, bias={bias}, residual={residual}, scale={scale}")
    out = run_tma(x, w, b, r, scale)
    assert_close(out, exact(x, w, b, r, scale), dtype, 9 * C, what=f"triton_tma {tuple(x.shape)} K={K} {dtype}")


@pytest.mark.skipif(GPU, reason="interpreter tile configs (the GPU lane runs the GPU's own)")
@pytest.mark.parametrize("config, split", [((2, 4, 4, 16, 16, 1, 1), 1), ((2, 4, 4, 16, 16, 1, 1), 3),
                                           ((1, 4, 4, 16, 16, 1, 1), 4), ((1, 2, 8, 32, 16, 1, 1), 2)])
def test_tiles_of_two_samples_and_k_splits(config, split):
    """Two samples per tile (a third sample alone in the last one) and K split into ranges, one of them shorter."""
    from sdkernels.kernels.conv3x3_tma import conv3x3_tma
    x, w, b, r = make_case(3, 24, 40, 5, 6, torch.float16, residual_layout=torch.contiguous_format)
    out = torch.full((3, 40, 5, 6), float("nan"), dtype=x.dtype).contiguous(memory_format=CL)
    conv3x3_tma(x, w, b, r, 0.5, out, config=config, split=split)
    assert_close(out, exact(x, w, b, r, 0.5), x.dtype, 9 * 24, what=f"config {config} split {split}")


@pytest.mark.parametrize("change, reason", [
    (lambda x, w: (x.contiguous(), w), "x not channels_last"),
    (lambda x, w: (x, w.contiguous()), "weight not channels_last"),
    (lambda x, w: (x.float(), w.float()), "is not fp16 or bf16"),
    (lambda x, w: (x[:, :12].contiguous(memory_format=CL), w[:, :12].contiguous(memory_format=CL)),
     "C=12 is not a multiple of 8"),
])
def test_inputs_it_does_not_take_say_why_and_the_op_still_computes(change, reason):
    x, w, b, r = make_case(2, 16, 8, 5, 5, torch.float16)
    x, w = change(x, w)
    b, r = b.to(x.dtype), r.to(x.dtype)
    with pytest.warns(SdkernelsFallbackWarning, match=reason):
        with sdkernels.use_backend("triton_tma", op=OP, strict=False):
            out = sdkernels.conv3x3(x, w, b, r, 0.5)
    assert_close(out, exact(x, w, b, r, 0.5), x.dtype, 9 * x.shape[1], what=f"fallback ({reason})")


# ---- GPU lane --------------------------------------------------------------------------------------------------

# SD1.5 UNet (batch 2, 512 px: 8 x 8 takes both samples per tile and splits K) and VAE decoder layers (batch 1): many
# waves of programs, where a race between the copy engine and the dots would show.
SD_SHAPES = [(2, 1280, 1280, 8, 8), (2, 2560, 1280, 8, 8), (2, 1280, 1280, 16, 16), (2, 640, 640, 32, 32),
             (2, 320, 320, 64, 64), (1, 512, 512, 64, 64), (1, 256, 256, 256, 256), (1, 128, 128, 512, 512)]
ODD_SHAPES = [(1, 8, 8, 1, 1), (3, 24, 40, 7, 9), (2, 16, 8, 33, 31), (1, 40, 56, 5, 130), (3, 64, 200, 8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "B=%d,C=%d,K=%d,H=%d,W=%d" % s)
def test_triton_tma_at_sd_shapes(shape, dtype):
    x, w, b, r = make_case(*shape, dtype, residual=shape[1] == shape[2])
    scale = 1 / 1.4142 if r is not None else 1.0
    out = run_tma(x, w, b, r, scale)
    assert_close(out, exact(x, w, b, r, scale), dtype, 9 * shape[1], what=f"triton_tma {shape} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "B=%d,C=%d,K=%d,H=%d,W=%d" % s)
@pytest.mark.parametrize("bias, residual_layout", [(True, CL), (False, torch.contiguous_format), (True, None)])
def test_triton_tma_odd_shapes(shape, dtype, bias, residual_layout):
    x, w, b, r = make_case(*shape, dtype, bias, residual_layout is not None, residual_layout or CL)
    out = run_tma(x, w, b, r, -2.0)
    assert_close(out, exact(x, w, b, r, -2.0), dtype, 9 * shape[1], what=f"triton_tma {shape} {dtype}")


@pytest.mark.gpu
def test_triton_tma_in_a_cuda_graph():
    x, w, b, r = make_case(2, 1280, 1280, 8, 8, torch.float16)  # the split-K path: two launches and a workspace
    run_tma(x, w, b, r, 0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with sdkernels.use_backend("triton_tma", op=OP), torch.cuda.graph(graph):
        out = sdkernels.conv3x3(x, w, b, r, 0.5)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, exact(x, w, b, r, 0.5), x.dtype, 9 * 1280, what="graph replay")
