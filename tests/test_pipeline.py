"""Whole pipelines, patched against unpatched: the UNet's output at every step of an LCM and a DDIM schedule (tiny
configs in fp32 on the CPU; SD1.5, SD2.1 and SDXL configs in fp16 in the GPU lane), the demo end to end, shape
changes after patching, patching twice, unpatching, and the benchmark's pipeline mode.

Each schedule runs the denoising loop of diffusers' pipelines (sdkernels.pipelines.denoise) from the same latents
and text states, once unpatched and once patched, each on its own trajectory, and compares the UNet outputs step by
step, as a user's two runs of one seed would differ. Bounds:
  * fp32, CPU: every step's output within FP32_STEP_REL_ERR (||ours - eager|| / ||eager||) of the unpatched one.
  * fp16, GPU: within eager's own fp16 noise: against an fp32 eager trajectory (TF32 off) from the same start, every
    step's error of ours is at most FP16_NOISE_FACTOR times eager fp16's error at that step, plus FP16_SLACK.
"""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import sdkernels
from sdkernels import bench, demo, dispatch, models, pipelines
from sdkernels.patch import patched_by, summary
from sdkernels.testing import relative_error
from conftest import DEVICE

pytest.importorskip("diffusers")

# Patched fp32 UNet steps on the CPU differ from eager ones by ~1e-6 (fp32 summation order); the trajectories of 20
# guided steps amplify that little. 1e-5 leaves room, and a wrong kernel misses it by orders of magnitude.
FP32_STEP_REL_ERR = 1e-5
# Pixels in [0, 1] of fp32 pipelines, patched against unpatched: ~1e-6 apart on the CPU; a wrong kernel moves them
# by 1e-2 or more.
IMAGE_ATOL = 1e-4
FP16_NOISE_FACTOR = 2.0
FP16_SLACK = 1e-3
# name: (scheduler, steps, guidance scale): 4 LCM steps without guidance (batch 1), 20 DDIM steps with it (batch 2)
SCHEDULES = {"lcm-4": ("lcm", 4, 1.0), "ddim-20-cfg": ("ddim", 20, pipelines.GUIDANCE_SCALE)}
CPU_RESOLUTION = 32  # 4x4 latents: every tiny UNet block, at a cost the interpreter can pay 24 times a test


def needs_transformers():
    return pytest.importorskip("transformers")


def unet_trajectory(unet, schedule: str, unet_kwargs: dict) -> list:
    """The UNet's output (fp64, CPU) at each step of the schedule from these inputs."""
    scheduler, steps, guidance = SCHEDULES[schedule]
    images = unet_kwargs["sample"].shape[0] // (2 if guidance > 1 else 1)
    latents, states, added = pipelines.loop_inputs(unet_kwargs, images)
    outputs = []
    with torch.no_grad():
        pipelines.denoise(unet, pipelines.make_scheduler(scheduler), latents, states, steps, guidance,
                          added_cond_kwargs=added, on_unet_output=lambda i, out: outputs.append(out.double().cpu()))
    return outputs


def step_errors(outputs: list, reference: list) -> list:
    assert len(outputs) == len(reference)
    return [relative_error(out, ref) for out, ref in zip(outputs, reference)]


def schedule_inputs(unet, schedule: str, resolution: int) -> dict:
    guided = SCHEDULES[schedule][2] > 1
    _, kwargs = models.model_inputs(unet, batch=2 if guided else 1, resolution=resolution)
    return kwargs


# ---- every step of a schedule, CPU (fp32, Triton interpreter) -------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_step_matches_unpatched(schedule, no_tf32):
    unet = models.build("tiny-unet", init="unit").to(DEVICE)
    kwargs = schedule_inputs(unet, schedule, CPU_RESOLUTION)
    expected = unet_trajectory(unet, schedule, kwargs)
    sdkernels.patch(unet)
    try:
        assert sum(summary(unet).replaced.values()) > 0
        dispatch._last_backend.clear()
        outputs = unet_trajectory(unet, schedule, kwargs)
        assert dispatch.last_backend("group_norm") in ("triton", "cuda")  # a kernel of ours ran, not the fallback
    finally:
        sdkernels.unpatch(unet)
    errors = step_errors(outputs, expected)
    print(f"{schedule}: per-step relative error, patched vs unpatched: {['%.2e' % e for e in errors]}")
    assert max(errors) <= FP32_STEP_REL_ERR, f"{schedule}: steps beyond {FP32_STEP_REL_ERR:g}: {errors}"


# ---- every step of a schedule, GPU (fp16 at SD sizes) ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_every_step_within_eager_fp16_noise(model, schedule, no_tf32):
    with torch.device("cuda"):
        unet = models.build(model, init="unit")
    unet.to(memory_format=torch.channels_last)
    kwargs = schedule_inputs(unet, schedule, models.spec(model).resolution)
    exact = unet_trajectory(unet, schedule, kwargs)
    nn.Module.to(unet, torch.float16)  # the fp32 run's weights, rounded (ModelMixin.to warns on any cast)
    kwargs16 = _to_half(kwargs)
    eager = step_errors(unet_trajectory(unet, schedule, kwargs16), exact)
    sdkernels.patch(unet)
    try:
        ours = step_errors(unet_trajectory(unet, schedule, kwargs16), exact)
    finally:
        sdkernels.unpatch(unet)
    print(f"{model} {schedule}: per-step error vs fp32, eager fp16 {['%.1e' % e for e in eager]}, "
          f"sdkernels fp16 {['%.1e' % e for e in ours]}")
    bad = [(i, o, e) for i, (o, e) in enumerate(zip(ours, eager)) if not o <= FP16_NOISE_FACTOR * e + FP16_SLACK]
    assert not bad, (f"{model} {schedule}: (step, ours, eager fp16) beyond {FP16_NOISE_FACTOR}x eager + "
                     f"{FP16_SLACK}: {bad}")


def _to_half(tree):
    if isinstance(tree, dict):
        return {k: _to_half(v) for k, v in tree.items()}
    return tree.half() if torch.is_floating_point(tree) else tree


# ---- the loop is the pipelines' loop --------------------------------------------------------------------------

def test_denoise_is_the_pipelines_loop():
    """pipelines.denoise from the same latents and text states lands where StableDiffusionPipeline does."""
    needs_transformers()
    pipe = pipelines.build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    _, kwargs = models.model_inputs(pipe.unet, batch=2, resolution=CPU_RESOLUTION)
    latents, states, _ = pipelines.loop_inputs(kwargs, images=1)
    with torch.no_grad():
        expected = pipe(prompt_embeds=states[1:], negative_prompt_embeds=states[:1], latents=latents,
                        num_inference_steps=3, output_type="latent").images
        ours = pipelines.denoise(pipe.unet, pipe.scheduler, latents, states, steps=3)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


# ---- whole pipelines: patch twice, shapes, unpatch ------------------------------------------------------------

def tiny_pipeline():
    needs_transformers()
    pipe = pipelines.build_pipeline("tiny").to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, resolution=CPU_RESOLUTION, images=1):
    """One step without guidance (the UNet's batch is the images'), then the VAE decode: the cheapest whole run."""
    return pipe("a red cube", num_inference_steps=1, guidance_scale=1.0, height=resolution, width=resolution,
                output_type="np", num_images_per_prompt=images, generator=torch.Generator().manual_seed(0)).images


def test_patch_twice_change_shapes_then_unpatch(no_tf32):
    """Patching twice changes nothing; after patching, a new resolution and a new batch (UNet and VAE) still match
    the unpatched pipeline; unpatching gives its outputs back bit for bit."""
    pipe = tiny_pipeline()
    shapes = [(CPU_RESOLUTION, 1), (48, 2)]  # (pixels, images): the second changes both
    expected = [generate(pipe, *shape) for shape in shapes]
    sdkernels.patch(pipe)
    first = {label: (s.replaced, s.left) for label, s in summary(pipe).items()}
    sdkernels.patch(pipe)
    try:
        assert {label: (s.replaced, s.left) for label, s in summary(pipe).items()} == first
        assert patched_by(pipe.unet) == ("norm_out_gn_silu", "shared_projections")  # once, not twice
        for (resolution, images), want in zip(shapes, expected):
            got = generate(pipe, resolution, images)
            assert got.shape == (images, resolution, resolution, 3)
            print(f"{resolution} px, {images} images: max pixel difference {np.abs(got - want).max():.2e}")
            np.testing.assert_allclose(got, want, atol=IMAGE_ATOL, err_msg=f"{resolution} px, {images} images")
    finally:
        sdkernels.unpatch(pipe)
    assert all("forward" not in vars(m) for model in (pipe.unet, pipe.vae) for m in model.modules())
    assert np.array_equal(generate(pipe, *shapes[0]), expected[0])


# ---- the demo -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--model", "tiny", "--steps", "1"],
                                  ["--model", "tiny-xl", "--steps", "1", "--scheduler", "lcm"]],
                         ids=["tiny-ddim", "tiny-xl-lcm"])
def test_demo_end_to_end(argv, tmp_path, capsys, no_tf32):
    needs_transformers()
    from PIL import Image
    assert demo.main([*argv, "--resolution", str(CPU_RESOLUTION), "--dtype", "fp32", "--out", str(tmp_path)]) == 0
    eager, ours = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("eager.png", "sdkernels.png"))
    assert eager.shape == (CPU_RESOLUTION, CPU_RESOLUTION, 3) and eager.std() > 0  # an image, not a blank
    assert np.abs(eager - ours).max() <= 1  # at most one 8-bit rounding step apart
    assert (tmp_path / "difference.png").exists()
    printed = capsys.readouterr().out
    assert "sdkernels.patch unet" in printed and "max |eager - sdkernels|" in printed


@pytest.mark.parametrize("argv, message", [
    (["--model", "sd3"], "neither one of tiny, tiny-xl, sd15, sd21, sdxl nor a folder"),
    (["--resolution", "36"], "must be a multiple of 8"),
    (["--scheduler", "heun"], "invalid choice: 'heun'"),
    (["--steps", "0"], "0 is not a positive integer"),
])
def test_demo_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_load_pipeline_from_a_local_folder(tmp_path):
    """--model PATH: a saved pipeline comes back whole, from disk alone; a folder without one is refused."""
    needs_transformers()
    with pytest.raises(ValueError, match="no model_index.json"):
        pipelines.load_pipeline(str(tmp_path))
    saved = pipelines.build_pipeline("tiny")
    saved.save_pretrained(tmp_path / "tiny")
    loaded = pipelines.load_pipeline(str(tmp_path / "tiny"))
    assert type(loaded) is type(saved) and loaded.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(saved, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert loaded.tokenizer("a cat").input_ids == saved.tokenizer("a cat").input_ids


def test_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["sdkernels-demo"] == "sdkernels.demo:main"


# ---- the pieces built offline ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", pipelines.PIPELINES)
def test_text_encoders_fit_the_unet(name):
    """Text states as wide as the UNet's cross-attention; SDXL's pooled embeds and time ids as its add-embedding."""
    s = pipelines.pipeline_spec(name)
    unet = models.spec(s.unet).config
    assert sum(e["hidden_size"] for e in s.text_encoders) == unet["cross_attention_dim"]
    if s.xl:
        added = s.text_encoders[1]["projection_dim"] + 6 * unet["addition_time_embed_dim"]
        assert added == unet["projection_class_embeddings_input_dim"]
    assert models.pixels_per_latent(s.vae) == models.UNET_PIXELS_PER_LATENT


def test_offline_tokenizer():
    needs_transformers()
    tokenizer = pipelines.offline_tokenizer()
    ids = tokenizer("an astronaut riding a horse", padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    assert len(ids) == models.TEXT_TOKENS == tokenizer.model_max_length
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.pad_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "an astronaut riding a horse"


# ---- the benchmark's pipeline mode ----------------------------------------------------------------------------

def test_bench_pipeline_mode(tmp_path, monkeypatch, capsys, no_tf32):
    """The loop's rows: whole-loop ms, steps per second, final latents against eager's. The kernels run on their
    eager references here (the schedule tests above compare the Triton kernels step by step)."""
    monkeypatch.setenv("SDKERNELS_BACKEND", "reference")
    out = tmp_path / "pipeline.json"
    rc = bench.main(["--model", "tiny-unet", "--pipeline", "--steps", "3", "--resolution", str(CPU_RESOLUTION),
                     "--dtype", "fp32", "--no-graph", "--quick", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    case = f"model=tiny-unet,B=2,res={CPU_RESOLUTION},steps=3,scheduler=ddim"
    assert (row["bench"], row["case"]) == ("pipeline", case)
    assert (row["ours"], row["baseline"]) == ("sdkernels", "eager")
    assert row["its"] == pytest.approx(3 * 1e3 / row["ours_ms"])
    assert row["baseline_its"] == pytest.approx(3 * 1e3 / row["baseline_ms"])
    assert row["max_rel_err"] < 1e-4 and row["baseline_max_rel_err"] == 0
    assert "no text encoding, no VAE decode" in doc["pipeline"]
    assert "pipeline model=tiny-unet" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-vae", "--pipeline"], "--pipeline runs a UNet's denoising loop; tiny-vae is a VAE"),
    (["--pipeline", "--batch", "3"], "so it must be even"),
    (["--steps", "4"], "--steps and --scheduler go with --pipeline"),
    (["--pipeline", "--scheduler", "ddpm"], "invalid choice: 'ddpm'"),
])
def test_bench_pipeline_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_pipeline_gpu_variants(tmp_path):
    """On a GPU: eager through per-call graphs and torch.compile as baselines, sdkernels with and without graphs."""
    out = tmp_path / "pipeline.json"
    assert bench.main(["--model", "tiny-unet", "--pipeline", "--steps", "4", "--compile", "--quick",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["ours"], r["baseline"]) for r in rows} == {
        (o, b) for o in ("sdkernels", "sdkernels_graph") for b in ("eager", "eager_graph", "compile")}
    assert all(r["bench"] == "pipeline" and r["max_rel_err"] < 2e-2 for r in rows)
