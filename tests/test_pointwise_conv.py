"""The pointwise_conv patcher: a 1x1 nn.Conv2d on a channels_last fp16/bf16 input runs as F.linear with the bias in
the GEMM's epilogue, within the tolerance of a float64 convolution and no further from it than eager; every other
input runs nn.Conv2d.forward, bit for bit; only 1x1 stride-1 unpadded one-group convs are patched."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sdkernels.patch import patch, summary
from sdkernels.patchers import pointwise_conv
from sdkernels.testing import assert_close, relative_error
from conftest import DEVICE, GPU, check_left_alone, check_patch_twice_and_unpatch, outputs_before_and_after_patch

HALF = [torch.float16, torch.bfloat16]


def conv(c, k, bias=True, dtype=torch.float16, **kw):
    torch.manual_seed(c * 131 + k)
    return nn.Conv2d(c, k, kw.pop("kernel_size", 1), bias=bias, **kw).to(DEVICE, dtype).eval()


def channels_last(n, c, h, w, dtype):
    return (torch.randn(n, c, h, w, device=DEVICE, dtype=dtype) + 0.25).to(memory_format=torch.channels_last)


def counting_linear(monkeypatch):
    calls = []
    real = pointwise_conv.pointwise_linear

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(pointwise_conv, "pointwise_linear", spy)
    return calls


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), k=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9),
       bias=st.booleans(), dtype=st.sampled_from(HALF))
def test_channels_last_half_runs_as_linear_within_eager_error(n, c, k, h, w, bias, dtype):
    module = conv(c, k, bias, dtype)
    x = channels_last(n, c, h, w, dtype)
    exact = F.conv2d(x.double(), module.weight.double(), None if module.bias is None else module.bias.double())
    with torch.no_grad():
        eager = module(x)
        patch(module, ops=["pointwise_conv"])
        assert summary(module).replaced == {"pointwise_conv": 1}
        out = module(x)
    assert out.dtype == dtype and out.shape == eager.shape and out.stride() == eager.stride()
    assert_close(out, exact, dtype, reduction_size=c, what=f"1x1 conv {tuple(x.shape)} -> {k}")
    # The bias added before the one rounding: never further from the exact result than eager's two roundings,
    # beyond a quarter ulp of slack (in the norm) for GEMMs that sum in another order.
    assert relative_error(out, exact) <= 1.01 * relative_error(eager, exact) + 0.25 * torch.finfo(dtype).eps


def test_the_linear_path_runs_and_keeps_hooks(monkeypatch):
    calls = counting_linear(monkeypatch)
    module = conv(24, 16)
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    patch(module, ops=["pointwise_conv"])
    with torch.no_grad():
        module(channels_last(2, 24, 5, 7, torch.float16))
    assert calls == [torch.Size([2, 24, 5, 7])] and seen == [torch.Size([2, 16, 5, 7])]


@pytest.mark.parametrize("why", ["nchw", "fp32", "autograd", "strided"])
def test_other_inputs_run_the_convolution_bit_for_bit(why, monkeypatch):
    calls = counting_linear(monkeypatch)
    dtype = torch.float32 if why == "fp32" else torch.float16
    module = conv(12, 20, dtype=dtype)
    x = channels_last(2, 12, 6, 5, dtype)
    if why == "nchw":
        x = x.contiguous()
    if why == "strided":
        x = channels_last(2, 24, 6, 5, dtype)[:, ::2]
    grad = why == "autograd"
    expected, out = outputs_before_and_after_patch(module, x, "pointwise_conv", grad)
    assert calls == [] and torch.equal(out, expected) and out.requires_grad == grad


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(stride=2), dict(padding=1), dict(groups=4),
                                dict(dilation=2, kernel_size=3)], ids=str)
def test_only_pointwise_convs_are_patched(kw):
    check_left_alone(conv(8, 8, **kw), "pointwise_conv")


def test_unpatch_restores_and_patching_twice_changes_nothing():
    check_patch_twice_and_unpatch(conv(16, 8), channels_last(1, 16, 3, 3, torch.float16), "pointwise_conv")


def patched_case(c, k, n, h, w):
    """A patched 1x1 conv, a channels_last fp16 input and the patched module's output for it."""
    module = conv(c, k)
    patch(module, ops=["pointwise_conv"])
    x = channels_last(n, c, h, w, torch.float16)
    with torch.no_grad():
        return module, x, module(x)


def test_torch_compile_fullgraph():
    module, x, expected = patched_case(16, 24, 2, 4, 6)
    with torch.no_grad():
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
        assert_close(compiled(x), expected, torch.float16, reduction_size=16, what="compiled")


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    from sdkernels.benchmarking import as_cuda_graph
    module, x, expected = patched_case(320, 320, 2, 64, 64)
    with torch.no_grad():
        replay = as_cuda_graph(lambda: module(x))
        assert torch.equal(replay(), expected)
