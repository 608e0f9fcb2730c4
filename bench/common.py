"""Shared by every benchmark script: where results go in this checkout, and the timing, machine facts and results
format of sdkernels.benchmarking (in the package, so that the installed ``python -m sdkernels.bench`` shares them);
the common options, and the check-then-time loop over the cases that a wrong output aborts.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from sdkernels.benchmarking import (DTYPES, Results, as_cuda_graph, bench_ms, bench_rotating_ms, copy_bandwidth_gbps,
                                    input_sets, machine, on_gpu)
from sdkernels.testing import env_set

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

__all__ = ["Abort", "DTYPES", "RESULTS_DIR", "add_models_option", "bench_parser", "gpu_timing", "measure_cases",
           "results_path",
           "Results", "as_cuda_graph", "bench_ms", "bench_rotating_ms", "copy_bandwidth_gbps", "input_sets", "machine",
           "on_gpu", "run_poisoned", "env_set"]


class Abort(Exception):
    """A provider computed a wrong result: no row of this run may be written."""


def results_path(out, name: str) -> str:
    """--out, or bench/results/<name>.json on a GPU and bench/results/cpu_smoke/<name>.json (not committed) without
    one: an interpreter smoke run must never overwrite measured results."""
    if out:
        return out
    return os.path.join(RESULTS_DIR, *(() if on_gpu() else ("cpu_smoke",)), f"{name}.json")


def bench_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every op benchmark takes: --dtype, --quick, --graph and --out (results of ``name``)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="shorter timing")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="time CUDA-graph replays (default), so per-call Python and launch overhead, which graphs "
                        "remove in a patched pipeline, does not hide the kernels' time")
    p.add_argument("--out", help=f"results JSON (default bench/results/{name}.json; "
                                 f"bench/results/cpu_smoke/{name}.json without a GPU)")
    return p


def gpu_timing(args) -> dict:
    """bench_ms / bench_rotating_ms keyword arguments from the parsed options."""
    timing = dict(warmup_ms=10, rep_ms=40) if args.quick else dict(warmup_ms=25, rep_ms=100)
    timing["graph"] = args.graph
    return timing


def timing_note(graph: bool) -> str:
    """results.meta["timing"] for a bench that times bench_rotating_ms."""
    if not on_gpu():
        return "no GPU: wall-clock of the Triton interpreter, not speed"
    how = "CUDA-graph replays of back-to-back calls" if graph else "plain calls"
    return f"per call: median (do_bench) of {how} over input sets that overflow L2 3x"


def add_models_option(p: argparse.ArgumentParser, default: str, known) -> None:
    """--models: comma-separated names from known (bench/shapes.py's WORKLOADS), parsed into a list; an unknown
    name is a usage error before anything is built."""
    def names(text: str) -> list:
        models = [m.strip() for m in text.split(",") if m.strip()]
        unknown = [m for m in models if m not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; known: {', '.join(known)}")
        return models
    p.add_argument("--models", type=names, default=default, help=f"comma-separated, from {', '.join(known)}")


def run_poisoned(fn):
    """fn() with outputs pre-filled with NaN, so an element a kernel never writes fails the check."""
    with env_set("SDKERNELS_POISON_OUTPUTS", "1"):
        return fn()


def tuning_objective(timing: dict):
    """The context the cases run in: choices made while tuning (tile plans, backends) minimize what the bench times,
    GPU time for CUDA-graph replays, a call's time for plain calls (sdkernels.tuning.optimizing_for)."""
    from sdkernels import tuning
    return tuning.optimizing_for("device" if timing.get("graph") else "call")


def measure_cases(cases, measure, key=lambda case: case.name) -> dict | None:
    """{key(case): measure(case)} over the cases in order, or None once one raises Abort: then the run prints why
    and must write nothing (main returns 2). The CUDA cache is freed between cases, whose tensors differ in size."""
    measured = {}
    for case in cases:
        try:
            measured[key(case)] = measure(case)
        except Abort as e:
            print(f"\n{'!' * 100}\nABORT: an output is wrong; no results are written.\n{e}\n{'!' * 100}",
                  file=sys.stderr)
            return None
        if on_gpu():
            torch.cuda.empty_cache()
    return measured
