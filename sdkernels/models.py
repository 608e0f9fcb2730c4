"""The Stable Diffusion models that the benchmarks and tests run, built offline, and the inputs of one call.

Nothing here downloads: a model is its diffusers config (the reference configs of SD1.5, SD2.1, SDXL and the SD VAE)
with random weights, or the weights of a local diffusers folder. Random weights are diffusers' own init, or that
init rescaled to unit gain per layer (``init="unit"``): PyTorch's default init gives each conv and linear layer a
gain of about 1/sqrt(3), so a deep stack of them shrinks its signal in a way trained
weights do not, and numerical checks on it see flatter values than real images do.

    unet = build("sd15", init="unit")                     # on the current default device, fp32
    args, kwargs = model_inputs(unet, batch=2, resolution=512)
    out = model_call(unet, args, kwargs)                  # unet(...).sample; vae.decode(...).sample for a VAE

Everything works under ``with torch.device("meta")`` too (bench/shapes.py records shapes that way), except the
unit rescaling, which reads the weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch
from torch import nn

# The SD VAE maps 8x8 pixels to one latent: a UNet at resolution R runs on R/8 x R/8 latents.
UNET_PIXELS_PER_LATENT = 8
TEXT_TOKENS = 77  # CLIP's context length: the encoder_hidden_states of every SD pipeline
TIMESTEP = 999.0
INITS = ("unit", "diffusers")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str            # "unet" (UNet2DConditionModel) or "vae" (AutoencoderKL, run as its decoder)
    description: str
    config: dict = dataclasses.field(repr=False)  # keyword arguments of the diffusers constructor
    batch: int           # the usual batch: 2 for a UNet step under classifier-free guidance, 1 for a VAE decode
    resolution: int      # the usual image size in pixels

    @property
    def method(self) -> str:
        """The model's method one step calls."""
        return "decode" if self.kind == "vae" else "forward"


_SDXL = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

# Tiny configs for the CPU, where Triton's interpreter spends about 0.1 s per kernel launch: every block type of
# the SD UNet (cross-attention down and up, plain down and up, resamplers, the cross-attention mid block) and of
# the VAE decoder (mid-block attention, upsampler), with few channels and few groups.
_TINY_UNET = dict(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
_TINY_VAE = dict(
    block_out_channels=(16, 32), norm_num_groups=4, latent_channels=4, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# The tiny pipeline's VAE: the SD VAE's four blocks, so one latent covers 8x8 pixels as in SD and a resolution means
# the same latent size for the tiny pipeline as for the tiny UNet alone.
_TINY_VAE_8X = dict(_TINY_VAE, block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4)
# The tiny UNet with SDXL's conditioning: text states of two text encoders (16 + 16 wide), the second one's pooled
# embeds (16) and six size/crop time ids (8 each) added to the timestep embedding.
_TINY_XL_UNET = dict(_TINY_UNET, cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=16 + 6 * 8)

MODELS = {s.name: s for s in [
    ModelSpec("sd15", "unet", "SD1.5 UNet", dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
              2, 512),
    ModelSpec("sd21", "unet", "SD2.1 UNet",
              dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True), 2, 768),
    ModelSpec("sdxl", "unet", "SDXL UNet", _SDXL, 2, 1024),
    ModelSpec("vae", "vae", "SD VAE decoder",
              dict(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=2), 1, 512),
    ModelSpec("tiny-unet", "unet", "tiny UNet (CPU smoke runs)", _TINY_UNET, 1, 64),
    ModelSpec("tiny-vae", "vae", "tiny VAE decoder (CPU smoke runs)", _TINY_VAE, 1, 16),
    ModelSpec("tiny-vae-8x", "vae", "tiny VAE decoder, 8 pixels a latent (the tiny pipeline's)", _TINY_VAE_8X, 1, 64),
    ModelSpec("tiny-xl-unet", "unet", "tiny UNet with SDXL's conditioning (CPU smoke runs)", _TINY_XL_UNET, 1, 64),
]}


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def build(name: str, init: str = "diffusers", path: Optional[str] = None,
          dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model ``name`` in eval mode without gradients, on the current default device: random weights (``init``:
    "diffusers" or "unit"), or loaded from ``path``, a local diffusers folder (a pipeline folder with a unet/ or
    vae/ subfolder, or the model's own folder), which never downloads. In ``dtype`` (default fp32): diffusers keeps
    the modules a model marks fp32-only in fp32 when it loads, so a cast of the whole model is not the same."""
    s = spec(name)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    cls = _model_class(s.kind)
    if path is None:
        model = cls(**s.config)
        if init == "unit":
            rescale_to_unit_gain(model)
        if dtype is not None:
            nn.Module.to(model, dtype)  # ModelMixin.to warns of fp32-only modules on any cast, even with none
    else:
        model = cls.from_pretrained(path, subfolder=weights_subfolder(path, s.kind), torch_dtype=dtype,
                                    local_files_only=True)
    return model.eval().requires_grad_(False)


def rescale_to_unit_gain(model: nn.Module) -> nn.Module:
    """Scale each conv and linear weight to std 1/sqrt(fan_in), so that a unit-variance input gives a
    unit-variance output; the init's pattern (and its zeros) stays. Biases and norm affines stay as they are."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() > 1:
                std = m.weight.float().std().item()
                if std > 0:
                    m.weight.mul_(1 / (std * math.sqrt(m.weight[0].numel())))
    return model


def model_inputs(model: nn.Module, batch: int, resolution: int) -> tuple:
    """(args, kwargs) of one call of ``model_call`` as a pipeline makes it at this batch and image size, in the
    model's dtype and on its device, read off its config: latents ~N(0, 1); for a UNet, the last timestep and
    77 tokens of ~N(0, 1) text states (plus SDXL's pooled text embeds and size/crop time ids)."""
    p = next(model.parameters())
    like = dict(dtype=p.dtype, device=p.device)
    c = model.config
    if _is_vae(model):
        latent = resolution // _vae_scale(c.block_out_channels)
        return (torch.randn(batch, c.latent_channels, latent, latent, **like),), {}
    latent = resolution // UNET_PIXELS_PER_LATENT
    kwargs = dict(sample=torch.randn(batch, c.in_channels, latent, latent, **like),
                  timestep=torch.tensor(TIMESTEP, device=p.device),
                  encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, c.cross_attention_dim, **like))
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, **like),
                                       "time_ids": torch.randn(batch, 6, **like)}
    return (), kwargs


def model_call(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """One step as a pipeline runs it: ``unet(...).sample`` or ``vae.decode(...).sample``."""
    return entry(model)(*args, **kwargs).sample


def entry(model: nn.Module):
    """What one step calls: the UNet itself, or the VAE's decode (what torch.compile is given)."""
    return model.decode if _is_vae(model) else model


def pixels_per_latent(name: str, path: Optional[str] = None) -> int:
    """How many pixels one latent covers along each side (what an image size must be a multiple of) for the model
    ``name``, or for the weights at ``path`` in its place."""
    s = spec(name)
    if s.kind == "unet":
        return UNET_PIXELS_PER_LATENT
    if path is None:
        return _vae_scale(s.config["block_out_channels"])
    with open(os.path.join(path, weights_subfolder(path, s.kind) or "", "config.json")) as f:
        return _vae_scale(json.load(f)["block_out_channels"])


def _vae_scale(block_out_channels) -> int:
    return 2 ** (len(block_out_channels) - 1)  # each decoder block but the last upsamples 2x


def _is_vae(model) -> bool:
    return hasattr(model, "decode") and hasattr(model.config, "latent_channels")


def _model_class(kind: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    return AutoencoderKL if kind == "vae" else UNet2DConditionModel


def weights_subfolder(path: str, kind: str) -> Optional[str]:
    """The subfolder of a local diffusers folder that holds the ``kind`` model ("unet"/"vae" of a pipeline, None
    for the model's own folder); ValueError, saying what is missing, where it holds none."""
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a folder (a local diffusers pipeline or {kind} folder)")
    subfolder = kind if os.path.isdir(os.path.join(path, kind)) else None
    if not os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
        raise ValueError(f"model path {path!r} has neither {kind}/config.json nor config.json: not a diffusers "
                         f"pipeline or {kind} folder")
    return subfolder

