"""The transformer_layout patcher: Transformer2DModel's output keeps a channels_last input's layout (no NCHW copy),
with the values of diffusers' own method; NCHW inputs, autograd and unverified code run diffusers' method."""
import pytest
import torch

from sdkernels.patch import patch, summary, unpatch
from sdkernels.patchers import layout
from sdkernels.testing import assert_close
from sdkernels.testing import randomize_weights as randomize
from conftest import DEVICE

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402


def transformer(linear_projection):
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                               cross_attention_dim=12, use_linear_projection=linear_projection)
    return randomize(model).to(DEVICE)


def inputs(channels_last, h=5, w=7):
    x = torch.randn(2, 16, h, w, device=DEVICE) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randn(2, 3, 12, device=DEVICE)


def run(model, x, context):
    with torch.no_grad():
        return model(x, encoder_hidden_states=context).sample


@pytest.mark.parametrize("linear_projection", [False, True], ids=["conv_proj", "linear_proj"])
def test_channels_last_output_without_the_nchw_copy(linear_projection, no_tf32):
    model = transformer(linear_projection)
    x, context = inputs(channels_last=True)
    expected = run(model, x, context)
    assert expected.is_contiguous()  # diffusers' own method: an NCHW copy of a channels_last block
    patch(model, ops=["transformer_layout"])
    assert summary(model).replaced == {"transformer_layout": 1}
    out = run(model, x, context)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_close(out, expected, torch.float32, what="channels_last output")
    unpatch(model)
    assert layout._METHOD not in model.__dict__
    assert torch.equal(run(model, x, context), expected)


@pytest.mark.parametrize("linear_projection", [False, True], ids=["conv_proj", "linear_proj"])
def test_nchw_input_and_autograd_run_diffusers_method(linear_projection):
    model = transformer(linear_projection)
    x, context = inputs(channels_last=False)
    expected = run(model, x, context)
    patch(model, ops=["transformer_layout"])
    out = run(model, x, context)
    assert out.is_contiguous() and torch.equal(out, expected)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    out = model(x_cl, encoder_hidden_states=context).sample  # autograd: the original method, its NCHW output
    assert out.is_contiguous() and out.requires_grad


def test_patching_twice_changes_nothing_and_other_code_is_left(monkeypatch):
    model = transformer(False)
    patch(model, ops=["transformer_layout"])
    bound = model.__dict__[layout._METHOD]
    patch(model, ops=["transformer_layout"])
    assert model.__dict__[layout._METHOD] is bound
    unpatch(model)

    def other(self, hidden_states, residual, batch_size, height, width, inner_dim):
        return hidden_states + residual

    monkeypatch.setattr(Transformer2DModel, layout._METHOD, other)
    patch(model, ops=["transformer_layout"])
    assert summary(model).replaced == {"transformer_layout": 0}
    assert "is not the one this patcher mirrors" in summary(model).left[0][2]
