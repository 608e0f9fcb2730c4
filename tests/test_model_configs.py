"""sdkernels.patch on diffusers models of many configs: hypothesis draws tiny UNet2DConditionModel and AutoencoderKL
configs (block types, heads, linear or conv projections, upcast attention, scale_shift time embedding, activations
other than SiLU, several transformer layers, SDXL's text_time embedding, odd latent sizes, ...); the patched model
(every default patcher) must give the unpatched model's output, and unpatch must restore it bit for bit. A patcher
that cannot take a config must leave it to the original code, never crash or change the answer."""
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from sdkernels import dispatch
from sdkernels.patch import patch, unpatch
from sdkernels.testing import assert_close, randomize_weights, relative_error, tf32_off
from conftest import DEVICE

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

EXAMPLES = 8  # each example builds a model and compiles (GPU) or interprets (CPU) its kernels


@st.composite
def unet_configs(draw):
    groups = draw(st.sampled_from([4, 8]))
    width = draw(st.sampled_from([16, 24, 32]))
    cross = draw(st.sampled_from(["down", "up", "both"]))
    down = ("CrossAttnDownBlock2D" if cross in ("down", "both") else "DownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D" if cross in ("up", "both") else "UpBlock2D")
    config = dict(
        sample_size=8, block_out_channels=(width, 2 * width), norm_num_groups=groups,
        layers_per_block=draw(st.sampled_from([1, 2])), down_block_types=down, up_block_types=up,
        cross_attention_dim=draw(st.sampled_from([16, 32])), attention_head_dim=draw(st.sampled_from([2, 4])),
        use_linear_projection=draw(st.booleans()), upcast_attention=draw(st.booleans()),
        only_cross_attention=draw(st.booleans()), transformer_layers_per_block=draw(st.sampled_from([1, 2])),
        resnet_time_scale_shift=draw(st.sampled_from(["default", "scale_shift"])),
        act_fn=draw(st.sampled_from(["silu", "silu", "mish"])), resnet_skip_time_act=draw(st.booleans()),
        resnet_out_scale_factor=draw(st.sampled_from([1.0, 2.0])))
    if draw(st.booleans()):  # SDXL's added time and text embedding
        config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=8 * 6 + 16)
    return config


def unet_inputs(config, batch, height, width):
    """(sample, timestep, text embeddings, added_cond_kwargs or None) on DEVICE, from a seeded CPU generator."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, height, width, generator=g).to(DEVICE)
    timestep = torch.tensor([10, 700][:batch], device=DEVICE)
    text = torch.randn(batch, 5, config["cross_attention_dim"], generator=g).to(DEVICE)
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = dict(text_embeds=torch.randn(batch, 16, generator=g).to(DEVICE),
                     time_ids=torch.randn(batch, 6, generator=g).to(DEVICE))
    return sample, timestep, text, added


@settings(max_examples=EXAMPLES)
@given(config=unet_configs(), batch=st.sampled_from([1, 2]), height=st.sampled_from([6, 8, 10]),
       width=st.sampled_from([6, 8]), channels_last=st.booleans())
def test_patched_unet_matches_unpatched(config, batch, height, width, channels_last):
    note(f"{config} batch={batch} {height}x{width} channels_last={channels_last}")
    unet = randomize_weights(UNet2DConditionModel(**config)).to(DEVICE)
    sample, timestep, text, added = unet_inputs(config, batch, height, width)
    check_patched_matches_unpatched(
        unet, lambda: unet(sample, timestep, text, added_cond_kwargs=added).sample, channels_last,
        reduction_size=9 * 2 * config["block_out_channels"][1])


def check_patched_matches_unpatched(model, forward, channels_last, reduction_size):
    """forward() of the patched model (every default patcher, tune off) against the unpatched one in fp32, our ops
    really running; unpatch restores the unpatched output bit for bit."""
    def run():
        with torch.no_grad(), tf32_off():  # fp32 comparisons: no TF32 in cuDNN's convolutions on a GPU
            return forward()

    expected = run()
    patch(model, channels_last=channels_last, tune=False)
    dispatch._last_backend.clear()
    out = run()
    assert dispatch.last_backend("group_norm") is not None  # the patched modules ran our ops
    note(f"relative error {relative_error(out, expected):.2e}")
    assert_close(out, expected, torch.float32, reduction_size=reduction_size, what=f"patched {type(model).__name__}")
    unpatch(model)
    assert torch.equal(run(), expected)


@st.composite
def vae_configs(draw):
    width = draw(st.sampled_from([16, 32]))
    return dict(block_out_channels=(width, 2 * width), norm_num_groups=draw(st.sampled_from([4, 8])),
                latent_channels=4, layers_per_block=draw(st.sampled_from([1, 2])),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                mid_block_add_attention=draw(st.booleans()), act_fn=draw(st.sampled_from(["silu", "silu", "mish"])))


@settings(max_examples=EXAMPLES)
@given(config=vae_configs(), height=st.sampled_from([6, 8, 12]), width=st.sampled_from([8, 10]),
       channels_last=st.booleans())
def test_patched_vae_matches_unpatched(config, height, width, channels_last):
    note(f"{config} {height}x{width} channels_last={channels_last}")
    vae = randomize_weights(AutoencoderKL(**config)).to(DEVICE)
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # encode (the posterior's mode), then decode
    check_patched_matches_unpatched(vae, lambda: vae(image).sample, channels_last,
                                    reduction_size=9 * 2 * config["block_out_channels"][1])
