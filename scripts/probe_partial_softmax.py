"""Probe (GPU): the partial-softmax path's tile configs at the short SD attention shapes, where it is launch- and
latency-bound (issue 3's 3x-over-math target is missed at N = 256, d = 160). Every pair of a statistics config and a
softmax . V config, timed as CUDA-graph replays beside SDPA's math backend in the same process, each checked against
SDPA first.
    python scripts/probe_partial_softmax.py [--cases 2,8,256,256,160;2,8,256,77,160]
"""
import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from sdkernels.kernels import partial_softmax as ps
from sdkernels.testing import relative_error

CASES = "2,8,256,256,160;2,8,256,77,160"
CONFIGS = [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 2, 3), (32, 64, 2, 2), (16, 64, 2, 3)]


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=CASES, help="B,H,N,Nk,d cases separated by ';'")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16, us per call")
    for case in args.cases.split(";"):
        B, H, N, Nk, d = (int(v) for v in case.split(","))
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.float16) for n in (N, Nk, Nk))
        expected = F.scaled_dot_product_attention(q, k, v)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            math_us = graph_us(lambda: F.scaled_dot_product_attention(q, k, v))
        out = torch.empty_like(q)
        default_us = graph_us(lambda: ps.partial_softmax_attention_triton(q, k, v, out, d ** -0.5, None))
        print(f"B={B},H={H},N={N},Nk={Nk},d={d}: math {math_us:.1f}, default config {default_us:.1f} "
              f"({math_us / default_us:.2f}x math)")
        results = []
        for stats_config, config in itertools.product(CONFIGS, CONFIGS):
            def call(c=config, sc=stats_config):
                ps.partial_softmax_attention_triton(q, k, v, out, d ** -0.5, None, config=c, stats_config=sc)
            try:
                out.fill_(float("nan"))
                call()
                err = relative_error(out, expected)
                if not err < 1e-2:
                    results.append((float("inf"), stats_config, config, f"WRONG {err:.2g}"))
                    continue
                results.append((graph_us(call), stats_config, config, ""))
            except Exception as e:  # noqa: BLE001  (a config the compiler refuses)
                results.append((float("inf"), stats_config, config, f"{type(e).__name__}"))
        for us, stats_config, config, note in sorted(results)[:8]:
            print(f"  stats {stats_config} pv {config}: {us:.1f} us ({math_us / us:.2f}x math) {note}")
        default_programs = ps.PROGRAMS_PER_SM
        for programs in (1, 2, 4, 8, 10_000):  # how far the statistics split the key range (10000: every key block)
            ps.PROGRAMS_PER_SM = programs
            us = graph_us(lambda: ps.partial_softmax_attention_triton(q, k, v, out, d ** -0.5, None))
            print(f"  default configs, PROGRAMS_PER_SM={programs}: {us:.1f} us ({math_us / us:.2f}x math)")
        ps.PROGRAMS_PER_SM = default_programs


if __name__ == "__main__":
    main()
