"""Shared by every benchmark script: where results go in this checkout, and the timing, machine facts and results
format of sdkernels.benchmarking (in the package, so that the installed ``python -m sdkernels.bench`` shares them).
"""
import argparse
import os

from sdkernels.benchmarking import (DTYPES, Results, as_cuda_graph, bench_ms, bench_rotating_ms, copy_bandwidth_gbps,
                                    input_sets, machine, on_gpu)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

__all__ = ["DTYPES", "RESULTS_DIR", "bench_parser", "gpu_timing", "Results", "as_cuda_graph", "bench_ms",
           "bench_rotating_ms", "copy_bandwidth_gbps", "input_sets", "machine", "on_gpu"]


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
