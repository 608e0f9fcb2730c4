"""Probe (GPU): the partial-softmax path at the short SD attention shapes, where it is launch- and latency-bound
(issue 3's 3x-over-math target is missed at N = 256, d = 160): the two-kernel plan (statistics, then softmax . V)
over every pair of tile configs and split counts, and the one-launch plan (SDKERNELS_PARTIAL_ONE_LAUNCH=1: the
softmax . V kernel computes its rows' statistics itself) over the same configs; CUDA-graph replays beside SDPA's
math backend in the same process, each checked against SDPA first.
    python scripts/probe_partial_softmax.py [--cases "2,8,256,256,160;2,8,256,77,160"] [--plans pairs,one,stats]
"""
import argparse
import itertools
import os

import torch
import torch.nn.functional as F
import triton

from sdkernels.kernels import partial_softmax as ps
from probe_sweep import checked_us, graph_us, sweep  # scripts/

CASES = "2,8,256,256,160;2,8,256,77,160"
CONFIGS = [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 2, 3), (32, 64, 2, 2), (16, 64, 2, 3),
           (64, 128, 4, 2), (32, 128, 4, 2), (16, 32, 1, 2)]
STATS_CONFIGS = [(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 4, 2), (64, 64, 4, 2)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=CASES, help="B,H,N,Nk,d cases separated by ';'")
    p.add_argument("--plans", default="pairs,one,stats",
                   help="pairs (two kernels, config pairs and splits), one, stats (one launch, wider statistics "
                        "blocks)")
    args = p.parse_args()
    plans = args.plans.split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16, us per call")
    for case in args.cases.split(";"):
        B, H, N, Nk, d = (int(v) for v in case.split(","))
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.float16) for n in (N, Nk, Nk))
        expected = F.scaled_dot_product_attention(q, k, v)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            math_us = graph_us(lambda: F.scaled_dot_product_attention(q, k, v))
        out = torch.empty_like(q)

        def run(config=None, stats_config=None):
            ps.partial_softmax_attention_triton(q, k, v, out, d ** -0.5, None, config=config,
                                                stats_config=stats_config)

        os.environ["SDKERNELS_PARTIAL_ONE_LAUNCH"] = "0"
        default_us, note = checked_us(run, out, expected, graph_us)
        print(f"B={B},H={H},N={N},Nk={Nk},d={d}: math {math_us:.1f}, two kernels at their default configs "
              f"{default_us:.1f} ({math_us / default_us:.2f}x math) {note}", flush=True)
        if "pairs" in plans:
            results = sweep(list(itertools.product(CONFIGS, CONFIGS)), lambda c: run(c[1], c[0]), out, expected,
                            graph_us)
            for us, (stats_config, config), note in results[:6]:
                print(f"  two kernels: stats {stats_config} pv {config}: {us:.1f} us ({math_us / us:.2f}x math) "
                      f"{note}", flush=True)
            default_programs = ps.PROGRAMS_PER_SM
            for programs in (1, 2, 4, 8, 10_000):  # how far the statistics split the keys (10000: every key block)
                ps.PROGRAMS_PER_SM = programs
                us, note = checked_us(run, out, expected, graph_us)
                print(f"  two kernels, default configs, PROGRAMS_PER_SM={programs}: {us:.1f} us "
                      f"({math_us / us:.2f}x math) {note}", flush=True)
            ps.PROGRAMS_PER_SM = default_programs
        if "one" in plans:
            os.environ["SDKERNELS_PARTIAL_ONE_LAUNCH"] = "1"
            us, note = checked_us(run, out, expected, graph_us)
            print(f"  one launch, default config: {us:.1f} us ({math_us / us:.2f}x math) {note}", flush=True)
            for us, config, note in sweep(CONFIGS, run, out, expected, graph_us)[:6]:
                print(f"  one launch {config}: {us:.1f} us ({math_us / us:.2f}x math) {note}", flush=True)
        if "stats" in plans:  # the one-launch kernel with wider key blocks in its statistics pass
            os.environ["SDKERNELS_PARTIAL_ONE_LAUNCH"] = "1"
            for block in (128, 256):
                os.environ["SDKERNELS_PARTIAL_STATS_BLOCK"] = str(block)
                for us, config, note in sweep(CONFIGS + STATS_CONFIGS, run, out, expected, graph_us)[:6]:
                    print(f"  one launch, statistics in {block}-key blocks, {config}: {us:.1f} us "
                          f"({math_us / us:.2f}x math) {note}", flush=True)
            os.environ.pop("SDKERNELS_PARTIAL_STATS_BLOCK")
        os.environ.pop("SDKERNELS_PARTIAL_ONE_LAUNCH")


if __name__ == "__main__":
    main()
