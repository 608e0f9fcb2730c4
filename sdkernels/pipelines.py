"""Whole text-to-image pipelines built offline, and the denoising loop that pipelines run.

A pipeline here is a diffusers StableDiffusionPipeline (SD1.5, SD2.1, tiny) or StableDiffusionXLPipeline (SDXL,
tiny-xl) whose UNet and VAE come from sdkernels.models, whose CLIP text encoders are built from their configs with
random weights, and whose tokenizer is made on the spot from a byte-level vocabulary (one token per byte, no merges):
nothing is downloaded, and no safety checker is attached. A local diffusers pipeline folder loads instead with
``load_pipeline(path)``.

    pipe = build_pipeline("tiny", scheduler="lcm")         # on the current default device, fp32
    _, kwargs = models.model_inputs(pipe.unet, batch=2, resolution=64)       # both halves of guidance
    latents, states, added = loop_inputs(kwargs, images=1)
    latents = denoise(pipe.unet, pipe.scheduler, latents, states, steps=20, added_cond_kwargs=added)

``denoise`` is the loop of diffusers' text-to-image pipelines (scale the input, one UNet call on both halves of
classifier-free guidance, combine them, one scheduler step) without text encoding and VAE decode: what the pipeline
benchmark times and what the schedule tests compare step by step.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
from typing import Callable, Optional

import torch

from . import models

# Short names of the schedulers the demo and the benchmark offer, and their diffusers classes.
SCHEDULERS = {"ddim": "DDIMScheduler", "lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler",
              "pndm": "PNDMScheduler"}
# The scheduler config of SD1.5, SD2.1 and SDXL: the noise schedule they were trained with; PNDM without its
# Runge-Kutta warm-up steps (which need 4 steps or more), as their pipelines run it.
SD_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
GUIDANCE_SCALE = 7.5  # diffusers' default for SD pipelines

# CLIPTextConfig arguments of each text encoder. The vocabulary is the offline tokenizer's (its ids are all a
# random-weights encoder ever sees), the context CLIP's 77 tokens.
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu")                  # SD1.5; SDXL's first encoder
_OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    projection_dim=512, hidden_act="gelu")                   # SD2.1
_OPEN_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        projection_dim=1280, hidden_act="gelu")              # SDXL's second encoder
_TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    unet: str                 # names in sdkernels.models.MODELS
    vae: str
    text_encoders: tuple      # CLIPTextConfig arguments per encoder; two make an SDXL pipeline
    steps: int                # the usual number of denoising steps
    resolution: int           # the usual image size in pixels
    vae_config: dict = dataclasses.field(default_factory=dict)  # config values that differ from the SD VAE's

    @property
    def xl(self) -> bool:
        return len(self.text_encoders) == 2


PIPELINES = {s.name: s for s in [
    PipelineSpec("tiny", "tiny UNet, VAE and text encoder (CPU smoke runs)", "tiny-unet", "tiny-vae-8x",
                 (_TINY_CLIP,), 4, 64),
    PipelineSpec("tiny-xl", "tiny SDXL pipeline: two text encoders (CPU smoke runs)", "tiny-xl-unet", "tiny-vae-8x",
                 (_TINY_CLIP, _TINY_CLIP), 4, 64),
    PipelineSpec("sd15", "Stable Diffusion 1.5", "sd15", "vae", (_CLIP_L,), 20, 512),
    PipelineSpec("sd21", "Stable Diffusion 2.1", "sd21", "vae", (_OPEN_CLIP_H,), 20, 768),
    # SDXL's VAE: the SD VAE's layers with its own latent scale; kept in fp16 (force_upcast off), as with the
    # fp16-safe SDXL VAE that fast pipelines use
    PipelineSpec("sdxl", "Stable Diffusion XL", "sdxl", "vae", (_CLIP_L, _OPEN_CLIP_BIG_G), 20, 1024,
                 dict(scaling_factor=0.13025, force_upcast=False)),
]}


def pipeline_spec(name: str) -> PipelineSpec:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return PIPELINES[name]


def build_pipeline(name: str, init: str = "unit", dtype: Optional[torch.dtype] = None, scheduler: str = "ddim"):
    """The pipeline ``name`` with random weights on the current default device, in ``dtype`` (default fp32), with
    the scheduler of that name (SD's config); models in eval mode without gradients."""
    s = pipeline_spec(name)
    unet = models.build(s.unet, init=init, dtype=dtype)
    vae = models.build(s.vae, init=init, dtype=dtype)
    vae.register_to_config(**s.vae_config)
    tokenizer = offline_tokenizer()
    encoders = [text_encoder(config, tokenizer, with_projection=s.xl and i == 1, dtype=dtype)
                for i, config in enumerate(s.text_encoders)]
    parts = dict(vae=vae, unet=unet, tokenizer=tokenizer, text_encoder=encoders[0], scheduler=make_scheduler(scheduler))
    if s.xl:
        from diffusers import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline(text_encoder_2=encoders[1], tokenizer_2=tokenizer, add_watermarker=False,
                                         **parts)
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **parts)


def load_pipeline(path: str, dtype: Optional[torch.dtype] = None):
    """The diffusers pipeline in the local folder ``path`` (never downloads), its safety checker left out."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path!r} is not a diffusers pipeline folder: it has no model_index.json")
    with open(index) as f:
        components = json.load(f)
    no_checker = dict(safety_checker=None, requires_safety_checker=False) if "safety_checker" in components else {}
    from diffusers import DiffusionPipeline
    return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **no_checker)


def text_encoder(config: dict, tokenizer, with_projection: bool = False, dtype: Optional[torch.dtype] = None):
    """A CLIP text encoder with random weights (transformers' init) for ``tokenizer``'s ids; with its projection
    (CLIPTextModelWithProjection, whose pooled embeds SDXL reads) or without (CLIPTextModel)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=models.TEXT_TOKENS,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **config)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)


def offline_tokenizer():
    """A CLIPTokenizer made without a download: a vocabulary of the 256 byte symbols (alone and word-final) and the
    two special tokens, no merges, so every character is a token. Prompts tokenize and pad as with CLIP's own."""
    from transformers import CLIPTokenizer
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=models.TEXT_TOKENS, local_files_only=True)


def _byte_symbols() -> list:
    """The printable character byte-level BPE writes for each byte value: the byte's own character where it is
    printable, else one of the characters from U+0100 on, in order (the table GPT-2 and CLIP use)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def make_scheduler(name: str, config: Optional[dict] = None):
    """The scheduler ``name`` (a key of SCHEDULERS) from a scheduler config (default: SD's noise schedule)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    import diffusers
    cls = getattr(diffusers, SCHEDULERS[name])
    if config is None:  # SD's values of the arguments this class takes (others would be warned about)
        takes = inspect.signature(cls.__init__).parameters
        config = {k: v for k, v in SD_NOISE_SCHEDULE.items() if k in takes}
    return cls.from_config(config)


def loop_inputs(unet_kwargs: dict, images: int) -> tuple:
    """(latents, text states, added_cond_kwargs or None) of a denoising loop of ``images`` images, from the keyword
    arguments of one UNet call (models.model_inputs): the latents of the images, and the call's text states and
    added conditions, whose batch holds both halves of classifier-free guidance when it is twice ``images``."""
    return (unet_kwargs["sample"][:images], unet_kwargs["encoder_hidden_states"],
            unet_kwargs.get("added_cond_kwargs"))


def denoise(unet: Callable, scheduler, latents: torch.Tensor, text_states: torch.Tensor, steps: int,
            guidance_scale: float = GUIDANCE_SCALE, added_cond_kwargs: Optional[dict] = None, seed: int = 0,
            on_unet_output: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """The final latents of ``steps`` denoising steps from ``latents`` (unit noise), as diffusers' text-to-image
    pipelines run them. With ``guidance_scale`` > 1 the UNet runs both halves of classifier-free guidance in one
    batch (``text_states`` and ``added_cond_kwargs`` hold the unconditional half first, as the pipelines order
    them); otherwise one. ``unet`` is called like a UNet2DConditionModel and returns its output (.sample);
    ``on_unet_output(step, output)`` sees each step's UNet output before guidance combines its halves. Scheduler
    noise (LCM, ancestral samplers) comes from a generator seeded with ``seed``, so runs are repeatable."""
    guided = guidance_scale > 1
    scheduler.set_timesteps(steps, device=latents.device)
    extra = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = torch.Generator(device=latents.device).manual_seed(seed)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        noise = unet(sample, t, encoder_hidden_states=text_states, added_cond_kwargs=added_cond_kwargs).sample
        if on_unet_output is not None:
            on_unet_output(i, noise)
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False, **extra)[0]
    return latents
