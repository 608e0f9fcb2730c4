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


def test_sanitizer_shards_deal_each_case_family_to_one_shard(monkeypatch):
    """scripts/sanitize_kernels.py under SANITIZE_SHARD="i/n" (gpu_lane.sh's SANITIZE_GPUS): every case runs in
    exactly one of the n shards, and a family's cases (its kernels' compiles) stay in one."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    sanitize = importlib.import_module("sanitize_kernels")
    labels = ["flash_attention[flash d=40]", "flash_attention[partial d=80]", "group_norm[triton]", "group_norm[cuda]",
              "group_norm_stats[triton plan=tile]", "geglu", "conv3x3 tma", "conv3x3 tma", "add_layer_norm"]
    for n in (1, 2, 3, 4):
        keeps = [sanitize.shard_filter(f"{i}/{n}") for i in range(n)]
        owners = [[i for i, keep in enumerate(keeps) if keep(label)] for label in labels]
        assert all(len(owner) == 1 for owner in owners), (n, owners)
        assert owners[0] == owners[1] and owners[2] == owners[3] and owners[6] == owners[7]
        assert len({owner[0] for owner in owners}) == min(n, 7)  # 7 families: every shard gets work
    assert all(sanitize.shard_filter("")(label) for label in labels)


def _run_script(name, *args) -> str:
    """A scripts/ script's stdout, run as the compiled-kernel path runs it (no interpreter), asserted to succeed."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_host_overhead_cpu_script_runs():
    """scripts/host_overhead_cpu.py (host time per op call with launches stubbed) runs to its table on any machine:
    kernels/launch.py's cached launch broke it once (it asked Triton for a driver the CPU machine does not have)."""
    out = _run_script("host_overhead_cpu.py", "--calls", "40")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) >= 4 and all(float(row[-1]) > 0 for row in rows), out


def test_host_step_cpu_script_runs():
    """scripts/host_step_cpu.py (Python calls and host time of a whole SD1.5-shaped step, launches stubbed) runs, and
    the patched step really ran patched modules: it makes other Python calls than eager's."""
    out = _run_script("host_step_cpu.py", "--rounds", "1")  # one timed round: CPU fp16 convolutions are slow
    calls = [line for line in out.splitlines() if "Python calls per step" in line]
    assert calls, out
    eager, patched = (int(v.strip(" ,")) for v in calls[0].split()[-3::2])
    assert eager > 1000 and patched != eager, out


def test_alternating_op_profiles_count_each_steps_ops():
    """scripts/host_profile_step.py --compare: each op's calls per step and host time, per step function, from
    profiles taken in alternation (on the CPU here: the GPU lane's machine runs the script itself)."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from host_profile_step import alternating_op_host_us
    import torch
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    times = alternating_op_host_us({"one": lambda: a @ b, "two": lambda: (a @ b) + b}, rounds=3)
    assert times["one"]["aten::mm"][0] == times["two"]["aten::mm"][0] == 1
    assert times["two"]["aten::add"][0] == 1 and "aten::add" not in times["one"]
    assert all(us >= 0 for ops in times.values() for _, us in ops.values())
