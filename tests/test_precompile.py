"""sdkernels.precompile: the dry call that records a model's Triton kernels, the workers that compile them into
Triton's disk cache, and the patched model's first call that then finds them there."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sdkernels import models, patch, precompile, tuning, unpatch
from sdkernels.testing import relative_error


def test_a_dry_run_calls_each_way_once_answers_the_first_and_keeps_nothing(tmp_path):
    calls = []
    choice = tuning.MeasuredChoice("dry", timer=lambda run: (run(), {"a": 2.0, "b": 1.0}[calls[-1]])[1],
                                   can_measure=lambda *key: True, path=tmp_path / "t.json")
    ways = lambda: {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}  # noqa: E731
    with tuning.dry_run():
        assert choice.choose((1,), ways) == "a"
    assert calls == ["a", "b"] and choice.choices == {} and not (tmp_path / "t.json").exists()
    assert choice.choose((1,), ways) == "b"  # measured now: b is the faster
    with tuning.dry_run():
        assert choice.choose((1,), ways) == "b"  # a measured choice stands


def test_patch_installs_the_precompiler_innermost_and_unpatch_removes_it():
    with torch.device("cpu"):
        unet = models.build("tiny-unet", init="unit")
    patch(unet, cuda_graph=True)
    assert precompile.installed(unet) is not None
    from sdkernels import graphs
    assert graphs.graphed(unet).original.owner is precompile.installed(unet)  # graphs call through it
    unpatch(unet)
    assert precompile.installed(unet) is None and "forward" not in unet.__dict__


def test_nothing_is_precompiled_for_cpu_inputs_or_when_turned_off(monkeypatch):
    x = torch.randn(2, 3)
    assert precompile.why_not([x]) is not None
    monkeypatch.setenv("SDKERNELS_PRECOMPILE", "0")
    assert precompile.why_not([x]) == "SDKERNELS_PRECOMPILE=0"


# A fresh process with Triton's GPU compiler (not the interpreter) and a stand-in sm_90 driver (compile_check's):
# record the kernels of two GELU calls, compile them in two workers, record again: now all are on disk. This is the
# check that the workers write exactly the cache entries the calling process looks up.
WORKERS_SCRIPT = textwrap.dedent("""
    import json, sys
    from sdkernels import compile_check as cc
    cc._compiler_env()
    mods = cc._kernel_modules()
    import torch
    from triton import knobs
    from sdkernels import precompile

    def record():
        recorder = precompile._Recorder()
        with cc._gpu_view(cc.ARCHS[90], cc.Recorder(), mods):
            knobs.runtime.jit_cache_hook = recorder.hook
            for approximate in ("none", "tanh"):
                cc._backend_call("gelu", "triton", torch.empty(2, 64, 320, dtype=torch.float16), approximate)()
            for d in (40, 80):  # kernels sharing helpers (their keys once depended on which came first); 2048
                inputs = cc._attention_inputs(d, torch.float16, 0, 256, nk=2048)  # keys: two kernels, not one
                cc._backend_call("flash_attention", "partial_softmax", *inputs)()
        return recorder

    first = record()
    report = precompile.Report()
    precompile.compile_in_workers(first.kernels, report, arch=[90, 232448, 132])
    second = record()
    print(json.dumps({"first": [len(first.kernels), len(first.on_disk)], "compiled": report.compiled,
                      "failed": report.failed, "workers": report.workers,
                      "second": [len(second.kernels), len(second.on_disk)]}))
""")


KEYS_SCRIPT = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    import sdkernels.kernels as package
    from triton.runtime.jit import JITFunction
    mods = [importlib.import_module(f"sdkernels.kernels.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    fns = [v for m in mods for v in vars(m).values() if isinstance(v, JITFunction) and v.fn.__module__ == m.__name__]
    order = fns if sys.argv[1] == "forward" else fns[::-1]
    print(json.dumps({f"{f.fn.__module__}.{f.fn.__qualname__}": f.cache_key for f in order}))
""")


def test_kernel_cache_keys_do_not_depend_on_which_was_computed_first():
    """Triton 3.6 derived five functions' keys (_softmax_times_v, _linear_geglu_kernel, ...) from which keys a
    process had computed before; the workers and the caller must agree (kernels.utils.fix_cache_keys computes them
    all at import, in one order). Triton 3.9 (CI's) computes them the same either way: this fails only where the
    Triton does not, e.g. the GPU lane's 3.6 without fix_cache_keys."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    keys = []
    for order in ("forward", "reverse"):
        done = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, order], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        keys.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert len(keys[0]) > 40 and keys[0] == keys[1]


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's GPU compiler")
def test_workers_fill_the_disk_cache_the_caller_looks_up(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_INTERPRET="0",
               SDKERNELS_PRECOMPILE_JOBS="2")
    done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = result["first"][0]
    assert kernels >= 6 and result["first"][1] == 0, result  # two GELU and 2 x 2 attention at least, none on disk
    assert result["failed"] == [] and result["compiled"] == kernels and result["workers"] == 2, result
    assert result["second"] == [0, kernels], result  # every one found on disk by the caller's lookup


@pytest.mark.gpu
def test_the_first_call_compiles_in_workers_and_finds_every_kernel_on_disk(tmp_path, monkeypatch):
    """A patched UNet at a signature this process has not run (bf16, an odd resolution), with an empty Triton
    cache: the dry call records kernels, the workers and this process compile all of them, the real call compiles
    none, and the output matches eager's within bf16 noise."""
    from triton import knobs
    monkeypatch.setenv("SDKERNELS_PRECOMPILE", "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("SDKERNELS_PRECOMPILE_JOBS", "4")
    with torch.device("cuda"):
        unet = models.build("tiny-unet", init="unit", dtype=torch.bfloat16)
    args, kwargs = models.model_inputs(unet, 2, 200)
    with torch.no_grad():
        expected = models.model_call(unet, args, kwargs)
        patch(unet)
        compiled_here = []
        previous = knobs.compilation.listener
        knobs.compilation.listener = lambda **kw: None if kw.get("cache_hit") else compiled_here.append(kw["src"].name)
        try:
            out = models.model_call(unet, args, kwargs)
        finally:
            knobs.compilation.listener = previous
    report = precompile.installed(unet).reports[-1]
    assert report.error == "" and report.failed == [], report
    assert report.compiled > 0 and report.compiled + report.on_disk == report.recorded, report
    # the only compiles in this process: the tasks it took itself after the dry call, none in the real call
    assert len(compiled_here) == report.compiled_here, f"compiled in this process: {compiled_here}; {report}"
    assert relative_error(out, expected) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name,resolution,cuda_graph", [("sd15", 512, False), ("sd15", 512, True), ("vae", 256, False)],
                         ids=["sd15", "sd15-graphs", "vae"])
def test_the_dry_call_leaves_nothing_behind(monkeypatch, name, resolution, cuda_graph):
    """A patched SD1.5 UNet (fp16, channels_last) and VAE decoder: the first call, made after the dry one, equals
    the second bit for bit (the same kernels run both: tests choose backends by rule), and eager within fp16 noise."""
    monkeypatch.setenv("SDKERNELS_PRECOMPILE", "1")
    monkeypatch.setenv("SDKERNELS_PRECOMPILE_JOBS", "8")
    with torch.device("cuda"):
        model = models.build(name, init="unit", dtype=torch.float16)
    model.to(memory_format=torch.channels_last)
    args, kwargs = models.model_inputs(model, 2 if name == "sd15" else 1, resolution)
    with torch.no_grad():
        expected = models.model_call(model, args, kwargs)
        patch(model, cuda_graph=cuda_graph)
        first = models.model_call(model, args, kwargs)
        second = models.model_call(model, args, kwargs)
    reports = precompile.installed(model).reports
    assert len(reports) == 1 and reports[0].error == "" and reports[0].failed == [], reports
    assert torch.equal(first, second)
    assert relative_error(first, expected) < 1e-2, relative_error(first, expected)
