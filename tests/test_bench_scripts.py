"""Every bench/bench_*.py runs its CPU smoke run to the end: the README's run command (scripts/run.sh) runs them all on
a machine without a GPU, and one that raises there stops the rest (bench_geglu.py did, forcing a backend that
declines plain calls, for sessions before anyone noticed)."""
import glob
import importlib
import json
import os

import pytest

from conftest import GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "bench_*.py")))


def test_every_bench_script_is_covered():
    assert len(SCRIPTS) >= 7 and "bench_geglu" in SCRIPTS


@pytest.mark.skipif(GPU, reason="the CPU smoke run; on a GPU scripts/gpu_lane.sh runs the benchmarks themselves")
@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_cpu_smoke_run(name, tmp_path):
    module = importlib.import_module(f"bench.{name}")
    out = tmp_path / f"{name}.json"
    assert module.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"]
