"""python -m sdkernels.bench (sdkernels.bench.main) end to end on the tiny configs: the JSON rows in the bench format,
the patched output close to eager's with our kernels really patched in, a wrong output failing the run, clear
errors for bad arguments; the models it builds. The GPU-only variants (CUDA graphs, torch.compile, peak memory)
run in the GPU lane."""
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
from sdkernels import bench, models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, *argv):
    out = tmp_path / "bench.json"
    rc = bench.main([*argv, "--quick", "--out", str(out)])
    return rc, json.loads(out.read_text())


def check_rows(doc, bench_name, case, ours, baselines):
    rows = doc["rows"]
    assert {(r["ours"], r["baseline"]) for r in rows} == {(o, b) for o in ours for b in baselines}
    for r in rows:
        assert (r["bench"], r["case"]) == (bench_name, case)
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ours_ms"])
        assert r["its"] == pytest.approx(1e3 / r["ours_ms"])
        assert r["max_rel_err"] < (1e-4 if r["dtype"] == "float32" else 2e-2)  # fp32 on the CPU, fp16 on GPUs
        assert r["rel_err"] <= r["max_rel_err"] * 10
    return rows


def test_unet_step(tmp_path, capsys):
    rc, doc = run_bench(tmp_path, "--model", "tiny-unet", "--no-graph")
    assert rc == 0
    check_rows(doc, "unet_step", "model=tiny-unet,B=1,res=64", ["sdkernels"], ["eager"])
    assert doc["rows"][0]["baseline_max_rel_err"] == 0
    patched = doc["patched"]["unet_step model=tiny-unet,B=1,res=64"]
    assert sum(patched["replaced"].values()) > 0 and patched["summary"].startswith("sdkernels.patch")
    printed = capsys.readouterr().out
    assert "sdkernels" in printed and "max rel err" in printed
    assert "[--------------------] 0/2 eager" in printed and "[##########----------] 1/2 sdkernels" in printed
    png = tmp_path / "bench.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped" in printed and not png.exists()
    else:
        assert png.exists()


def test_flat_unet_step(tmp_path, capsys):
    """--flat adds sdkernels.patch(model, flat=True)'s row (its setup includes the trace); a VAE skips it."""
    torch._dynamo.reset()
    try:
        rc, doc = run_bench(tmp_path, "--model", "tiny-unet", "--no-graph", "--flat")
    finally:
        torch._dynamo.reset()
    assert rc == 0
    check_rows(doc, "unet_step", "model=tiny-unet,B=1,res=64", ["sdkernels", "sdkernels_flat"], ["eager"])
    assert "[#############-------] 2/3 sdkernels_flat" in capsys.readouterr().out
    rc, doc = run_bench(tmp_path, "--model", "tiny-vae", "--no-graph", "--flat", "--resolution", "12")
    assert rc == 0 and "--flat skipped" in capsys.readouterr().out
    assert {r["ours"] for r in doc["rows"]} == {"sdkernels"}


def test_vae_decode_from_local_weights(tmp_path):
    """--model-path loads a local diffusers pipeline folder's vae/ (what a user with real weights has)."""
    models.build("tiny-vae", init="unit").save_pretrained(tmp_path / "pipe" / "vae")
    rc, doc = run_bench(tmp_path, "--model", "tiny-vae", "--model-path", str(tmp_path / "pipe"), "--batch", "2",
                        "--resolution", "12", "--no-channels-last", "--no-graph")
    assert rc == 0
    check_rows(doc, "vae_decode", "model=tiny-vae,B=2,res=12", ["sdkernels"], ["eager"])
    assert doc["weights"] == str(tmp_path / "pipe") and doc["layout"].startswith("contiguous")


def test_wrong_output_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "MAX_REL_ERR", dict.fromkeys(bench.MAX_REL_ERR, -1.0))  # no output passes
    rc, doc = run_bench(tmp_path, "--model", "tiny-vae", "--no-graph")
    assert rc == 1 and doc["rows"]  # the results are still written
    assert "FAIL: model=tiny-vae,B=1,res=16: sdkernels output differs" in capsys.readouterr().err


def test_a_variant_that_raises_fails_the_run_alone(tmp_path, monkeypatch, capsys):
    def broken_patch(model, **options):
        raise RuntimeError("no kernel today")
    monkeypatch.setattr(bench, "patch", broken_patch)
    rc, doc = run_bench(tmp_path, "--model", "tiny-vae", "--no-graph")
    assert rc == 1 and doc["rows"] == []  # eager ran and was written; no row without ours
    assert "FAIL: model=tiny-vae,B=1,res=16: sdkernels raised RuntimeError: no kernel today" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "sd3"], "invalid choice: 'sd3'"),
    (["--batch", "0"], "0 is not a positive integer"),
    (["--resolution", "big"], "'big' is not an integer"),
    (["--model", "sd15", "--resolution", "500"], "must be a multiple of 8 for sd15"),
    (["--model", "tiny-vae", "--resolution", "15"], "must be a multiple of 2 for tiny-vae"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--ops", "group_norm,nope"], "unknown patchers ['nope']"),
    (["--model-path", "/nonexistent/sd15"], "is not a folder"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_model_path_checked_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "vae", "--model-path", str(tmp_path)])
    assert "has neither vae/config.json nor config.json" in capsys.readouterr().err
    with torch.device("meta"):
        models.build("vae").save_config(tmp_path / "vae")  # the SD VAE's config: 8 pixels a latent
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny-vae", "--model-path", str(tmp_path), "--resolution", "20"])
    assert "must be a multiple of 8 for tiny-vae" in capsys.readouterr().err


def test_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["sdkernels-bench"] == "sdkernels.bench:main"


def test_model_inputs_follow_the_config():
    """SDXL's pooled text embeds and time ids, the latent size of a resolution; on meta, at no cost."""
    with torch.device("meta"):
        sdxl = models.build("sdxl")
        _, kwargs = models.model_inputs(sdxl, batch=2, resolution=1024)
        (latents,), _ = models.model_inputs(models.build("vae"), batch=1, resolution=512)
    assert kwargs["sample"].shape == (2, 4, 128, 128)
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 2048)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert latents.shape == (1, 4, 64, 64)


def test_paired_timing_alternates_blocks(monkeypatch):
    """benchmarking.paired_ms: blocks of consecutive calls, the order reversed every other round, medians per call
    and of the per-round ratios."""
    from sdkernels import benchmarking
    calls, clock = [], [0.0]
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])

    def way(name, ms):
        def run():
            calls.append(name)
            clock[0] += ms / 1e3
        return run
    r = benchmarking.paired_ms(way("a", 3.0), way("b", 2.0), rounds=3, block=2)
    assert calls[6:] == list("aabbbbaaaabb")  # after 3 warm-up calls each
    assert r["baseline_wall"] == pytest.approx(3.0) and r["wall"] == pytest.approx(2.0)
    assert r["wall_ratio"] == pytest.approx(1.5)


def test_unit_init():
    model = models.build("tiny-unet", init="unit")
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() > 1:
            assert m.weight.std().item() * m.weight[0].numel() ** 0.5 == pytest.approx(1, rel=1e-3)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.gpu
def test_gpu_variants(tmp_path):
    """Every variant: graphs and torch.compile as baselines, peak memory, graph replays equal to their eager calls."""
    rc, doc = run_bench(tmp_path, "--model", "tiny-unet", "--batch", "2", "--compile")
    assert rc == 0
    rows = check_rows(doc, "unet_step", "model=tiny-unet,B=2,res=64", ["sdkernels", "sdkernels_graph"],
                      ["eager", "eager_graph", "compile"])
    assert doc["gpu"] and all(r["dtype"] == "float16" for r in rows)
    by = {(r["ours"], r["baseline"]): r for r in rows}
    # a replay computes what the call it captured computes
    assert by["sdkernels", "eager_graph"]["baseline_max_rel_err"] < 1e-3
    assert by["sdkernels_graph", "eager"]["max_rel_err"] == pytest.approx(by["sdkernels", "eager"]["max_rel_err"],
                                                                          abs=1e-3)
    assert all(r["peak_mib"] > 0 and r["baseline_peak_mib"] > 0 for r in rows)
    # host-bound rows against eager: timed in alternation with an unpatched copy, not minutes apart
    assert by["sdkernels", "eager"].get("paired") and not by["sdkernels_graph", "eager"].get("paired")
    assert by["sdkernels", "eager"]["ours_ms"] != by["sdkernels", "eager_graph"]["ours_ms"]
