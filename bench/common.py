"""Shared by every benchmark script: where results go in this checkout, and the timing, machine facts and results
format of sdkernels.benchmarking (in the package, so that the installed ``python -m sdkernels.bench`` shares them).
"""
import os

from sdkernels.benchmarking import (DTYPES, Results, as_cuda_graph, bench_ms, bench_rotating_ms, copy_bandwidth_gbps,
                                    input_sets, machine, on_gpu)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

__all__ = ["DTYPES", "RESULTS_DIR", "Results", "as_cuda_graph", "bench_ms", "bench_rotating_ms",
           "copy_bandwidth_gbps", "input_sets", "machine", "on_gpu"]
