"""The conv3x3 patcher: a 3x3 stride-1 padding-1 one-group nn.Conv2d on a channels_last fp16/bf16 input runs as
sdkernels::conv3x3 (whichever backend dispatch picks: cuDNN by default, triton_tma forced here), within the tolerance
of a float64 convolution; every other input runs nn.Conv2d.forward, bit for bit; ResnetBlock2D's patched forward
runs its patched convs through the op too; unpatch restores."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sdkernels
from sdkernels import dispatch
from sdkernels.ops.conv3x3_plain import OP
from sdkernels.patch import patch, summary
from sdkernels.patchers import conv3x3 as conv3x3_patcher
from sdkernels.testing import assert_close
from conftest import DEVICE, check_left_alone, check_patch_twice_and_unpatch, outputs_before_and_after_patch

HALF = [torch.float16, torch.bfloat16]
CL = torch.channels_last


def conv(c, k, bias=True, dtype=torch.float16, **kw):
    torch.manual_seed(c * 131 + k)
    kw = dict(dict(kernel_size=3, padding=1), **kw)
    module = nn.Conv2d(c, k, bias=bias, **kw).to(DEVICE, dtype).eval()
    return module.to(memory_format=CL)


def channels_last(n, c, h, w, dtype):
    return (torch.randn(n, c, h, w, device=DEVICE, dtype=dtype) + 0.25).to(memory_format=CL)


def counting_op(monkeypatch):
    """The op calls the patched forwards make: (x's shape, whether a bias went in, the residual's shape or None, the
    scale)."""
    calls = []
    real = conv3x3_patcher.conv3x3

    def spy(x, weight, bias=None, residual=None, scale=1.0):
        calls.append((tuple(x.shape), bias is not None, None if residual is None else tuple(residual.shape), scale))
        return real(x, weight, bias, residual, scale)
    monkeypatch.setattr(conv3x3_patcher, "conv3x3", spy)
    return calls


def exact(module, x):
    return F.conv2d(x.double(), module.weight.double(), None if module.bias is None else module.bias.double(),
                    padding=1)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 2), c=st.sampled_from([8, 16, 24]), k=st.sampled_from([1, 8, 20]), h=st.integers(1, 7),
       w=st.integers(1, 7), bias=st.booleans(), dtype=st.sampled_from(HALF))
def test_channels_last_half_runs_as_the_op(n, c, k, h, w, bias, dtype):
    module = conv(c, k, bias, dtype)
    x = channels_last(n, c, h, w, dtype)
    patch(module, ops=["conv3x3"])
    assert summary(module).replaced == {"conv3x3": 1}
    with torch.no_grad(), sdkernels.use_backend("triton_tma", op=OP):
        out = module(x)
    assert dispatch.last_backend(OP) == "triton_tma"
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert_close(out, exact(module, x), dtype, reduction_size=9 * c, what=f"3x3 conv {tuple(x.shape)} -> {k}")


@pytest.mark.parametrize("why", ["nchw", "fp32", "autograd"])
def test_other_inputs_run_the_convolution_bit_for_bit(why, monkeypatch):
    calls = counting_op(monkeypatch)
    dtype = torch.float32 if why == "fp32" else torch.float16
    module = conv(8, 16, dtype=dtype)
    x = channels_last(2, 8, 6, 5, dtype)
    if why == "nchw":
        x = x.contiguous()
    grad = why == "autograd"
    expected, out = outputs_before_and_after_patch(module, x, "conv3x3", grad)
    assert calls == [] and torch.equal(out, expected) and out.requires_grad == grad


@pytest.mark.parametrize("kw", [dict(kernel_size=1, padding=0), dict(stride=2), dict(padding=0), dict(groups=4),
                                dict(dilation=2, padding=2), dict(padding_mode="reflect")], ids=str)
def test_only_same_3x3_convs_are_patched(kw):
    check_left_alone(conv(8, 8, **kw), "conv3x3")


def test_unpatch_restores_and_patching_twice_changes_nothing():
    check_patch_twice_and_unpatch(conv(16, 8), channels_last(1, 16, 3, 3, torch.float16), "conv3x3")


def test_resnet_block_calls_a_hooked_conv2(monkeypatch):
    """A forward hook on conv2 (accelerate's offloading, a user's probe) still runs: conv2 is called as a module."""
    calls = counting_op(monkeypatch)
    from diffusers.models.resnet import ResnetBlock2D
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=None, groups=8,
                          time_embedding_norm="group").to(DEVICE, torch.float16).eval().to(memory_format=CL)
    seen = []
    block.conv2.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    patch(block, ops=["resnet_gn_silu", "conv3x3"])
    with torch.no_grad():
        block(channels_last(2, 16, 5, 6, torch.float16), None)
    assert seen == [(2, 16, 5, 6)] and all(residual is None for _, _, residual, _ in calls)


@pytest.mark.parametrize("cin, scale_factor", [(16, 1.0), (24, 2.0)], ids=["1x1 shortcut", "identity, scale 2"])
@pytest.mark.parametrize("backend", ["triton_tma", None])
def test_resnet_block_runs_its_patched_convs_through_the_op(cin, scale_factor, backend, monkeypatch):
    calls = counting_op(monkeypatch)
    from diffusers.models.resnet import ResnetBlock2D
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=cin, out_channels=24, temb_channels=32, groups=8,
                          output_scale_factor=scale_factor).to(DEVICE, torch.float16)
    block = block.eval().to(memory_format=CL)
    x, temb = channels_last(2, cin, 5, 6, torch.float16), torch.randn(2, 32, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        reference = block.double()(x.double(), temb.double())
        block.half()
        patch(block, ops=["resnet_gn_silu", "conv3x3"])
        assert summary(block).replaced == {"resnet_gn_silu": 1, "conv3x3": 2}
        with sdkernels.use_backend(backend, op=OP) if backend else torch.no_grad():
            out = block(x, temb)
    # conv1 without its bias (added with temb as norm2 reads); conv2 with its bias, the shortcut and the scale in
    # its epilogue (the default backend: cuDNN, then the epilogue in one pass)
    assert calls == [((2, cin, 5, 6), False, None, 1.0), ((2, 24, 5, 6), True, (2, 24, 5, 6), 1.0 / scale_factor)]
    assert dispatch.last_backend(OP) == (backend or "cudnn_epilogue")
    assert_close(out, reference, torch.float16, reduction_size=9 * 24, what="patched ResnetBlock2D")
