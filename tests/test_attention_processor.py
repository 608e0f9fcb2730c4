"""SdkernelsAttnProcessor against diffusers' AttnProcessor2_0 on tiny Attention modules of every configuration
diffusers builds, and the "attention" patcher on a tiny UNet and VAE: installed, counted, restored."""
import math
import warnings

import pytest
import torch

import sdkernels
from sdkernels import dispatch
from sdkernels.attention_processor import SdkernelsAttnProcessor
from sdkernels.patch import patch, patched_by, summary, unpatch
from sdkernels.patchers import attention as attention_patcher  # noqa: F401  (registers the patcher)
from sdkernels.testing import assert_close, randomize_weights, relative_error
from conftest import DEVICE, GPU

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

OP = "flash_attention"
DIM_HEAD = 40  # SD1.5's (two dot chunks: 32 + 16)


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """fp32 comparisons of whole models (see conftest.no_tf32)."""
    yield


def randomize(model, seed=0):
    return randomize_weights(model, seed).to(DEVICE)


def key_mask(batch, nk, as_2d=False):
    """A pipeline's additive key-padding mask: 0 to keep, -10000 to drop (never the first key)."""
    drop = torch.rand(batch, 1, nk, device=DEVICE) < 0.3
    drop[..., 0] = False
    mask = torch.where(drop, -10000.0, 0.0)
    return mask[:, 0] if as_2d else mask


# name -> (Attention kwargs, hidden_states shape, encoder_hidden_states shape or None, extra call kwargs)
CONFIGS = {
    "self": (dict(query_dim=80, heads=2, dim_head=DIM_HEAD), (2, 37, 80), None, {}),
    "cross": (dict(query_dim=80, cross_attention_dim=32, heads=2, dim_head=DIM_HEAD), (2, 37, 80), (2, 77, 32), {}),
    "cross_layer_norm": (dict(query_dim=80, cross_attention_dim=32, heads=2, dim_head=DIM_HEAD,
                              cross_attention_norm="layer_norm"), (2, 21, 80), (2, 13, 32), {}),
    "cross_group_norm": (dict(query_dim=80, cross_attention_dim=32, heads=2, dim_head=DIM_HEAD,
                              cross_attention_norm="group_norm", cross_attention_norm_num_groups=8),
                         (2, 21, 80), (2, 13, 32), {}),
    "mask": (dict(query_dim=80, cross_attention_dim=32, heads=2, dim_head=DIM_HEAD), (2, 30, 80), (2, 77, 32),
             dict(attention_mask=lambda: key_mask(2, 77))),
    "mask_2d": (dict(query_dim=128, cross_attention_dim=32, heads=2, dim_head=64), (2, 30, 128), (2, 19, 32),
                dict(attention_mask=lambda: key_mask(2, 19, as_2d=True))),
    "vae_block": (dict(query_dim=64, heads=1, dim_head=64, norm_num_groups=16, residual_connection=True,
                       rescale_output_factor=2.0, bias=True, _from_deprecated_attn_block=True), (2, 64, 5, 7), None,
                  {}),
    "spatial_norm": (dict(query_dim=64, heads=1, dim_head=64, spatial_norm_dim=4, residual_connection=True,
                          bias=True), (1, 64, 6, 6), None, dict(temb=lambda: torch.randn(1, 4, 3, 3, device=DEVICE))),
    "qk_norm": (dict(query_dim=160, heads=2, dim_head=DIM_HEAD, qk_norm="layer_norm"), (2, 25, 160), None, {}),
    "out_dim": (dict(query_dim=80, heads=2, dim_head=DIM_HEAD, out_dim=4 * DIM_HEAD, out_bias=False), (1, 19, 80), None,
                {}),
}


def run_processor(attn, processor, hidden, encoder, extra):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=encoder, **extra)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_processor_matches_attn_processor_2_0(name):
    kwargs, shape, encoder_shape, extra = CONFIGS[name]
    attn = randomize(Attention(**kwargs))
    hidden = torch.randn(shape, device=DEVICE)
    encoder = torch.randn(encoder_shape, device=DEVICE) if encoder_shape else None
    extra = {k: v() for k, v in extra.items()}
    expected = run_processor(attn, AttnProcessor2_0(), hidden, encoder, extra)
    dispatch._last_backend.pop(OP, None)
    with sdkernels.use_backend("flash", op=OP, strict=True):
        out = run_processor(attn, SdkernelsAttnProcessor(), hidden, encoder, extra)
    assert dispatch.last_backend(OP) == "flash", "our kernel must have run"
    nk = encoder.shape[1] if encoder is not None else math.prod(shape[2:]) if len(shape) == 4 else shape[1]
    assert_close(out, expected, torch.float32, reduction_size=nk * 64, what=name)


@pytest.mark.parametrize("backend", ["flash", "partial_softmax"])
def test_processor_in_half_precision_is_within_eager_noise(backend):
    """fp16: our processor's error against an fp32 run of AttnProcessor2_0 is at most 2x the fp16 original's."""
    dtype = torch.float16 if GPU else torch.bfloat16  # CPU SDPA and matmuls take bf16 everywhere
    attn = randomize(Attention(query_dim=80, cross_attention_dim=32, heads=2, dim_head=DIM_HEAD))
    hidden, encoder = torch.randn(2, 45, 80, device=DEVICE), torch.randn(2, 77, 32, device=DEVICE)
    reference = run_processor(attn, AttnProcessor2_0(), hidden, encoder, {}).double()
    attn = attn.to(dtype)
    eager = run_processor(attn, AttnProcessor2_0(), hidden.to(dtype), encoder.to(dtype), {})
    with sdkernels.use_backend(backend, op=OP, strict=True):
        ours = run_processor(attn, SdkernelsAttnProcessor(), hidden.to(dtype), encoder.to(dtype), {})
    err, eager_err = ((t.double() - reference).abs().max().item() for t in (ours, eager))
    assert err <= 2 * eager_err + 1e-3, f"{backend}: error {err:.3g} vs eager's {eager_err:.3g}"


def test_lora_wrapped_projections():
    peft = pytest.importorskip("peft")
    attn = randomize(Attention(query_dim=80, cross_attention_dim=32, heads=2, dim_head=DIM_HEAD))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)  # random B: the adapters change the output
    attn = peft.inject_adapter_in_model(config, attn).to(DEVICE)
    assert type(attn.to_q).__module__.startswith("peft")
    hidden, encoder = torch.randn(2, 30, 80, device=DEVICE), torch.randn(2, 11, 32, device=DEVICE)
    expected = run_processor(attn, AttnProcessor2_0(), hidden, encoder, {})
    with sdkernels.use_backend("flash", op=OP, strict=True):
        out = run_processor(attn, SdkernelsAttnProcessor(), hidden, encoder, {})
    assert_close(out, expected, torch.float32, reduction_size=11 * 40, what="LoRA")


def test_autograd_runs_sdpa_and_gradients_match():
    attn = randomize(Attention(query_dim=80, heads=2, dim_head=DIM_HEAD))
    hidden = torch.randn(1, 17, 80, device=DEVICE)
    grads = []
    for processor in (AttnProcessor2_0(), SdkernelsAttnProcessor()):
        attn.set_processor(processor)
        x = hidden.clone().requires_grad_()
        attn(x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_deprecated_scale_argument_warns_like_the_original():
    attn = randomize(Attention(query_dim=80, heads=2, dim_head=DIM_HEAD))
    hidden = torch.randn(1, 5, 80, device=DEVICE)
    for processor in (AttnProcessor2_0(), SdkernelsAttnProcessor()):  # (Attention.forward drops it before)
        with pytest.warns(FutureWarning, match="scale"), torch.no_grad():
            processor(attn, hidden, scale=0.5)


# ---- the patcher on tiny models -------------------------------------------------------------------------------

def tiny_unet():
    """SD1.5's structure at toy size: heads of dim 40 (80 channels / 2; 64 on GPUs) and 80 (160 / 2),
    cross-attention."""
    return randomize(UNet2DConditionModel(
        sample_size=8, block_out_channels=(2 * DIM_HEAD, 160), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=32, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))


def tiny_vae():
    """The VAE's mid-block attention: one head as wide as the channels (64 here; 512 in SD's VAE)."""
    return randomize(AutoencoderKL(
        block_out_channels=(32, 64), norm_num_groups=16, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


def test_patch_installs_and_unpatch_restores_unet_processors():
    unet = tiny_unet()
    inputs = (torch.randn(2, 4, 8, 8, device=DEVICE), torch.tensor([10, 700], device=DEVICE),
              torch.randn(2, 77, 32, device=DEVICE))
    originals = {id(m): m.processor for m in attention_modules(unet)}
    assert len(originals) == 8
    with torch.no_grad():
        expected = unet(*inputs).sample
    patch(unet, ops=["attention"])
    assert summary(unet).replaced == {"attention": 8}
    assert all(isinstance(m.processor, SdkernelsAttnProcessor) and patched_by(m) == ("attention",)
               for m in attention_modules(unet))
    patch(unet, ops=["attention"])  # idempotent: counted, not patched again
    assert summary(unet).replaced == {"attention": 8}
    with torch.no_grad():
        out = unet(*inputs).sample
    assert dispatch.last_backend(OP) in ("flash", "partial_softmax")
    assert relative_error(out, expected) < 1e-5
    unpatch(unet)
    assert all(m.processor is originals[id(m)] and not patched_by(m) for m in attention_modules(unet))
    with torch.no_grad():
        torch.testing.assert_close(unet(*inputs).sample, expected, atol=0, rtol=0)


def test_patch_vae_mid_block_attention():
    vae = tiny_vae()
    image = torch.randn(1, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        expected = vae(image).sample
    patch(vae, ops=["attention"])
    assert summary(vae).replaced == {"attention": 2}  # encoder and decoder mid blocks
    dispatch._last_backend.pop(OP, None)
    with torch.no_grad():
        out = vae(image).sample
    assert dispatch.last_backend(OP) in ("flash", "partial_softmax")
    assert relative_error(out, expected) < 1e-5
    unpatch(vae)
    assert all(type(m.processor) is AttnProcessor2_0 for m in attention_modules(vae))


def test_modules_the_kernels_cannot_take_are_left_with_a_reason():
    wide = Attention(query_dim=512, heads=1, dim_head=512)  # SD's VAE attention
    other = Attention(query_dim=80, heads=2, dim_head=DIM_HEAD, processor=AttnProcessor())
    ok = Attention(query_dim=80, heads=2, dim_head=DIM_HEAD)
    model = torch.nn.ModuleDict(dict(wide=wide, other=other, ok=ok))
    patch(model, ops=["attention"])
    result = summary(model)
    assert result.replaced == {"attention": 1}
    reasons = {name: reason for name, _, reason in result.left}
    assert "head dim 512" in reasons["wide"] and "AttnProcessor," in reasons["other"] + ","
    assert isinstance(ok.processor, SdkernelsAttnProcessor) and type(wide.processor) is AttnProcessor2_0
    unpatch(model)
    assert type(ok.processor) is AttnProcessor2_0 and type(other.processor) is AttnProcessor


def test_unsupported_input_falls_back_inside_the_processor():
    """A head dim the patcher lets through cannot change at call time, but a dtype can: float64 runs on SDPA."""
    attn = randomize(Attention(query_dim=80, heads=2, dim_head=DIM_HEAD)).double()
    hidden = torch.randn(1, 9, 80, device=DEVICE, dtype=torch.float64)
    expected = run_processor(attn, AttnProcessor2_0(), hidden, None, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        out = run_processor(attn, SdkernelsAttnProcessor(), hidden, None, {})
    assert dispatch.last_backend(OP) == "reference"
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mask", [False, True])
def test_an_sdpa_choice_computes_what_attn_processor_2_0_does(monkeypatch, mask):
    """Where the op's choice is SDPA (measured faster), the processor makes AttnProcessor2_0's calls: the same
    output bit for bit, with SDPA's output transposed and reshaped, not copied into a new tensor; a forced backend
    still reaches the kernel."""
    kwargs, shape, encoder_shape, _ = CONFIGS["mask" if mask else "cross"]
    attn = randomize(Attention(**kwargs)).half() if GPU else randomize(Attention(**kwargs))
    dtype = next(attn.parameters()).dtype
    hidden = torch.randn(shape, device=DEVICE, dtype=dtype)
    encoder = torch.randn(encoder_shape, device=DEVICE, dtype=dtype)
    extra = dict(attention_mask=key_mask(2, encoder_shape[1]).to(dtype)) if mask else {}
    monkeypatch.setattr(dispatch.ops()[OP], "chooser", lambda *args: dispatch.REFERENCE)
    processor = SdkernelsAttnProcessor()
    for _ in range(2):  # the second call: the remembered selection
        ours = run_processor(attn, processor, hidden, encoder, extra)
        assert dispatch.last_backend(OP) == dispatch.REFERENCE
        assert torch.equal(ours, run_processor(attn, AttnProcessor2_0(), hidden, encoder, extra))
    with dispatch.use_backend("flash", op=OP):
        forced = run_processor(attn, processor, hidden, encoder, extra)
    assert dispatch.last_backend(OP) == "flash"
    assert_close(forced, ours, dtype)


def test_patched_attention_skips_the_signature_inspection_where_nothing_is_filtered(monkeypatch):
    """The lean Attention.forward calls our processor as the original does when no extra keyword arguments come;
    with some, the original forward runs (it filters them and warns); unpatch takes it off."""
    import inspect
    import sdkernels
    kwargs, shape, encoder_shape, _ = CONFIGS["cross"]
    attn = randomize(Attention(**kwargs)).to(DEVICE)
    hidden = torch.randn(shape, device=DEVICE)
    encoder = torch.randn(encoder_shape, device=DEVICE)
    expected = attn(hidden, encoder)
    sdkernels.patch(attn, ops=["attention"], tune=False)
    assert "forward" in vars(attn)
    inspected = []
    real_signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: inspected.append(1) or real_signature(*a, **k))
    with torch.no_grad(), sdkernels.use_backend("reference", op=OP):
        lean = attn(hidden, encoder)
        assert not inspected
        filtered = attn(hidden, encoder, unexpected=1)  # the original forward: inspects, warns, drops the kwarg
        assert inspected
    assert torch.equal(lean, filtered)
    torch.testing.assert_close(lean, expected.detach(), rtol=1e-5, atol=1e-5)
    sdkernels.unpatch(attn)
    assert "forward" not in vars(attn) and type(attn.processor) is AttnProcessor2_0


@pytest.mark.parametrize("config", ["self", "cross", "mask"])
def test_running_originals_computes_what_attn_processor_2_0_does(config):
    """patch.running_originals (the step choice's "originals" way): the patched module runs SDPA as
    AttnProcessor2_0 does, with the same result bit for bit and none of our ops."""
    import sdkernels
    from sdkernels.patch import running_originals
    kwargs, shape, encoder_shape, _ = CONFIGS[config]
    attn = randomize(Attention(**kwargs)).to(DEVICE)
    hidden = torch.randn(shape, device=DEVICE)
    encoder = torch.randn(encoder_shape, device=DEVICE) if encoder_shape else None
    extra = dict(attention_mask=key_mask(2, encoder_shape[1])) if config == "mask" else {}
    with torch.no_grad():
        expected = attn(hidden, encoder, **extra)
        sdkernels.patch(attn, ops=["attention"], tune=False)
        dispatch._last_backend.pop(OP, None)
        with running_originals():
            out = attn(hidden, encoder, **extra)
    assert dispatch.last_backend(OP) is None and torch.equal(out, expected)
