"""python -m sdkernels.demo: a whole text-to-image pipeline run as it is, then patched by sdkernels, from one seed and
prompt; both images, their difference amplified, the time of each run and the pixel differences.

    python -m sdkernels.demo --out /tmp/demo                # no GPU: the tiny pipeline through Triton's interpreter
    python -m sdkernels.demo --model sd15 --cuda-graph      # SD1.5's shapes with random weights, fp16
    python -m sdkernels.demo --model ~/sd15 --steps 30      # a local diffusers pipeline folder (never downloads)

Random weights (sdkernels.pipelines: UNet and VAE of sdkernels.models, random CLIP text encoders, a tokenizer made
offline) draw noise, not pictures: what matters is that both runs draw the same noise. --out gets eager.png,
sdkernels.png and difference.png (|eager - sdkernels| scaled so that the largest difference is white). Times are
wall clock of whole pipeline calls (text encoding, every denoising step, VAE decode); a first call includes one-time
work (Triton compilation and autotuning, cuDNN's algorithm search, CUDA-graph capture), so on a GPU each side runs
twice by default and the last run is the one to read. Without a GPU the kernels run in Triton's interpreter: the
times say nothing of speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (our kernels import it)

from . import pipelines  # noqa: E402
from .bench import positive_int  # noqa: E402  (the same argument check as the bench CLI)
from .benchmarking import DTYPES, on_gpu  # noqa: E402
from .patch import patch, summary, unpatch  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
LCM_GUIDANCE_SCALE = 1.0  # LCM samples in few steps without classifier-free guidance (its LoRA's usual setting)


@dataclasses.dataclass
class Run:
    """One side of the comparison: the images of its last call (floats in [0, 1], (batch, H, W, 3)) and the
    seconds of each call."""
    name: str
    images: object
    seconds: list


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdkernels.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"one of {', '.join(pipelines.PIPELINES)} (random weights), or a local diffusers "
                                   "pipeline folder; default sd15 on a GPU, tiny without one")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: 4 for the tiny pipelines, else 20)")
    p.add_argument("--resolution", type=positive_int,
                   help="image size in pixels, a multiple of 8 (default: the model's own: 64 tiny, 512 sd15, 768 sd21, "
                        "1024 sdxl)")
    p.add_argument("--scheduler", choices=list(pipelines.SCHEDULERS), default="ddim")
    p.add_argument("--guidance-scale", type=float,
                   help=f"classifier-free guidance (default {pipelines.GUIDANCE_SCALE}; {LCM_GUIDANCE_SCALE}, none, "
                        "with lcm)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--cuda-graph", action="store_true", help="sdkernels.patch(pipe, cuda_graph=True)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="UNet and VAE channels_last (default), as fast SD pipelines run them; both sides alike")
    p.add_argument("--runs", type=positive_int, help="calls of each side (default 2 on a GPU, 1 on the CPU)")
    p.add_argument("--out", default="sdkernels-demo", help="folder for the images (default ./sdkernels-demo)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    args.model = args.model or ("sd15" if on_gpu() else "tiny")
    try:
        check_model(args.model)
        if args.resolution is not None and args.resolution % 8:
            raise ValueError(f"--resolution {args.resolution}: must be a multiple of 8 (diffusers' pipelines ask it)")
    except ValueError as e:
        p.error(str(e))
    if not on_gpu() and args.model in pipelines.PIPELINES and not args.model.startswith("tiny"):
        print("no GPU: the Triton interpreter takes hours on a full-size model; --model tiny is the CPU demo")
    pipe = make_pipeline(args)
    print(describe(pipe, args), flush=True)
    eager = run_side(pipe, args, "eager")
    patch(pipe, cuda_graph=args.cuda_graph, channels_last=args.channels_last)  # both sides in one layout
    for line in summary(pipe).values():
        print(line)
    try:
        ours = run_side(pipe, args, "sdkernels")
    finally:
        unpatch(pipe)
    report(eager, ours, args.out)
    return 0


def check_model(model: str) -> None:
    if model not in pipelines.PIPELINES and not os.path.isdir(model):
        raise ValueError(f"--model {model!r}: neither one of {', '.join(pipelines.PIPELINES)} nor a folder")


def make_pipeline(args):
    """The pipeline on this machine's device, in the run's dtype, with the scheduler asked for and the defaults of
    its spec filled into args (steps, resolution, guidance)."""
    device = "cuda" if on_gpu() else "cpu"
    dtype = DTYPES[args.dtype or ("fp16" if on_gpu() else "fp32")]
    if args.model in pipelines.PIPELINES:
        spec = pipelines.pipeline_spec(args.model)
        print(f"building {spec.description} with random weights", flush=True)
        with torch.device(device):  # random init is fast on the GPU
            pipe = pipelines.build_pipeline(args.model, dtype=dtype, scheduler=args.scheduler)
        args.steps = args.steps or spec.steps
        args.resolution = args.resolution or spec.resolution
    else:
        print(f"loading {args.model}", flush=True)
        pipe = pipelines.load_pipeline(args.model, dtype=dtype).to(device)
        pipe.scheduler = pipelines.make_scheduler(args.scheduler, pipe.scheduler.config)  # its own noise schedule
        args.steps = args.steps or 20
    if args.guidance_scale is None:
        args.guidance_scale = LCM_GUIDANCE_SCALE if args.scheduler == "lcm" else pipelines.GUIDANCE_SCALE
    if args.channels_last:
        for model in (pipe.unet, pipe.vae):
            model.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def describe(pipe, args) -> str:
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    where = (torch.cuda.get_device_name() if on_gpu()
             else "CPU, Triton interpreter: times are not speed")
    return (f"{type(pipe).__name__}, {args.steps} {args.scheduler} steps, {size}x{size} px, guidance "
            f"{args.guidance_scale:g}, {str(pipe.unet.dtype).replace('torch.', '')}, seed {args.seed}; {where}")


def run_side(pipe, args, name: str) -> Run:
    """``args.runs`` calls of the pipeline, each from the same seed; their times and the last call's images."""
    seconds, images = [], None
    for i in range(args.runs or (2 if on_gpu() else 1)):
        start = time.perf_counter()
        images = generate(pipe, args)
        if on_gpu():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        print(f"{name:10s} run {i + 1}: {seconds[-1]:.2f} s", flush=True)
    return Run(name, images, seconds)


def generate(pipe, args):
    """The pipeline's images (floats in [0, 1]) for the prompt. The seed's generator lives on the CPU, so the
    starting noise is the same on any device."""
    return pipe(args.prompt, num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
                guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed),
                output_type="np").images


def report(eager: Run, ours: Run, out: str) -> dict:
    """Print the times and pixel differences; write both images and the difference image. Returns the numbers."""
    import numpy as np
    difference = np.abs(eager.images.astype(np.float64) - ours.images.astype(np.float64))
    numbers = dict(eager_s=eager.seconds[-1], sdkernels_s=ours.seconds[-1], max_diff=255 * float(difference.max()),
                   mean_diff=255 * float(difference.mean()))
    print(f"last run: eager {numbers['eager_s']:.2f} s, sdkernels {numbers['sdkernels_s']:.2f} s, speedup "
          f"{numbers['eager_s'] / numbers['sdkernels_s']:.2f}x")
    print(f"pixels (0-255): max |eager - sdkernels| {numbers['max_diff']:.3g}, mean {numbers['mean_diff']:.3g}")
    os.makedirs(out, exist_ok=True)
    gain = 1 / difference.max() if difference.max() > 0 else 1.0  # the largest difference becomes white
    paths = [save_png(eager.images[0], os.path.join(out, "eager.png")),
             save_png(ours.images[0], os.path.join(out, "sdkernels.png")),
             save_png(difference[0] * gain, os.path.join(out, "difference.png"))]
    print(f"wrote {', '.join(paths)} (difference x{gain:.3g})")
    return numbers


def save_png(image, path: str) -> str:
    """An (H, W, 3) array of floats in [0, 1] as an 8-bit PNG."""
    import numpy as np
    from PIL import Image
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
