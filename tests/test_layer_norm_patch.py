"""The layer_norm patcher: nn.LayerNorm over the last dim as sdkernels::group_norm with one group, against a float64
LayerNorm (every dtype, odd sizes, affine or not, with or without bias, any eps); inputs the view does not fit and
autograd run nn.LayerNorm.forward bit for bit; patch, unpatch, compile, CUDA graphs."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sdkernels
from sdkernels import dispatch
from sdkernels.patch import patch, summary, unpatch
from sdkernels.testing import assert_close
from conftest import DEVICE, GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def layer_norm(c, dtype, affine=True, bias=True, eps=1e-5):
    kw = {} if bias else {"bias": False}
    norm = nn.LayerNorm(c, eps=eps, elementwise_affine=affine, **kw).to(DEVICE, dtype).eval()
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(c))
            if norm.bias is not None:
                norm.bias.copy_(0.3 * torch.randn(c))
    return norm


def exact(norm, x):
    w = None if norm.weight is None else norm.weight.double()
    b = None if norm.bias is None else norm.bias.double()
    return F.layer_norm(x.double(), norm.normalized_shape, w, b, norm.eps)


@given(lead=st.lists(st.integers(1, 7), min_size=1, max_size=2), c=st.one_of(st.sampled_from([320, 640]),
       st.integers(1, 200)), dtype=st.sampled_from(DTYPES), affine=st.booleans(), bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6, 0.1]))
def test_matches_a_float64_layer_norm(lead, c, dtype, affine, bias, eps):
    norm = layer_norm(c, dtype, affine, bias, eps)
    x = (torch.randn(*lead, c, device=DEVICE) * 3 + 1).to(dtype)
    patch(norm, ops=["layer_norm"])
    with torch.no_grad(), sdkernels.use_backend("triton", op="group_norm", strict=True):
        out = norm(x)
    assert dispatch.last_backend("group_norm") == "triton"
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, exact(norm, x), dtype, reduction_size=c, what=f"LayerNorm {tuple(x.shape)} {dtype}")


@pytest.mark.parametrize("why", ["strided", "weights_of_another_dtype", "autograd", "fp64"])
def test_other_inputs_run_layer_norm_bit_for_bit(why, monkeypatch):
    from sdkernels.patchers import layer_norm as patcher
    calls = []
    monkeypatch.setattr(patcher, "group_norm", lambda *a, **k: calls.append(a))
    dtype = torch.float64 if why == "fp64" else torch.float32
    norm = layer_norm(48, dtype)
    x = torch.randn(2, 5, 48, device=DEVICE, dtype=dtype)
    if why == "strided":
        x = torch.randn(5, 2, 48, device=DEVICE).transpose(0, 1)
    if why == "weights_of_another_dtype":  # eager LayerNorm takes half inputs with fp32 weights (mixed type)
        x = x.to(torch.bfloat16)
    grad = why == "autograd"

    def outcome():  # the output, or the error eager raises (some torch builds refuse mixed dtypes on some devices)
        try:
            return norm(x)
        except RuntimeError as e:
            return type(e)

    with torch.set_grad_enabled(grad):
        expected = outcome()
        patch(norm, ops=["layer_norm"])
        out = outcome()
    assert calls == []
    if isinstance(expected, type):
        assert out is expected
    else:
        assert torch.equal(out, expected) and out.requires_grad == grad


def test_multi_dim_norms_are_left_and_unpatch_restores():
    norm2d = nn.LayerNorm((4, 8))
    patch(norm2d, ops=["layer_norm"])
    assert summary(norm2d).replaced == {"layer_norm": 0}
    assert "normalizes over 2 dims" in summary(norm2d).left[0][2]
    norm = layer_norm(16, torch.float32)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        expected = norm(x)
        patch(norm, ops=["layer_norm"])
        patch(norm, ops=["layer_norm"])
        assert summary(norm).replaced == {"layer_norm": 1}
        unpatch(norm)
        assert "forward" not in norm.__dict__ and torch.equal(norm(x), expected)


def test_torch_compile_fullgraph():
    norm = layer_norm(32, torch.float32)
    patch(norm, ops=["layer_norm"])
    x = torch.randn(2, 7, 32, device=DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        compiled = torch.compile(norm, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
        assert_close(compiled(x), exact(norm, x), torch.float32, reduction_size=32, what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 77, 768), (2, 16384, 640)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_transformer_shapes_and_cuda_graphs(shape, dtype):
    from sdkernels.benchmarking import as_cuda_graph
    norm = layer_norm(shape[-1], dtype)
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype)
    patch(norm, ops=["layer_norm"])
    with torch.no_grad():
        out = norm(x)
        assert dispatch.last_backend("group_norm") == "triton"
        assert_close(out, exact(norm, x), dtype, reduction_size=shape[-1], what=f"{shape} {dtype}")
        replay = as_cuda_graph(lambda: norm(x))
        assert torch.equal(replay(), out)
