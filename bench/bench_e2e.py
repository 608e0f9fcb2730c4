"""Benchmark: sdkernels.patch end to end, one UNet step and one VAE decode, against eager, eager in a CUDA graph and
torch.compile (python -m sdkernels.bench on the issue's target cases, into one results file).

    python bench/bench_e2e.py [--quick] [--out PATH]

On a GPU, in fp16, channels_last, random weights at unit gain: the SD1.5 UNet at batch 2, 512 px (with
torch.compile(mode="reduce-overhead"), about a minute to compile), the SDXL UNet at batch 2, 1024 px, and the VAE
decode at 1024 px, and a 20-step DDIM loop of the SD1.5 UNet under classifier-free guidance; results in
bench/results/e2e.json and a chart beside it (with matplotlib). A patched output further
from eager's than sdkernels.bench.MAX_REL_ERR fails the run after the results are written.

Without a GPU it is a correctness smoke run: tiny-unet and tiny-vae in Triton's interpreter, the times mean nothing,
and results go to bench/results/cpu_smoke/e2e.json (not committed).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (sdkernels imports it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import results_path, on_gpu  # noqa: E402
from sdkernels import bench  # noqa: E402

GPU_CASES = [bench.Case("sd15", 2, 512, compile=True), bench.Case("sdxl", 2, 1024), bench.Case("vae", 1, 1024),
             bench.Case("sd15", 2, 512, steps=20)]  # issue 5's 20-step loop in it/s (stable-fast: 104.6 on an H100)
CPU_CASES = [bench.Case("tiny-unet", 1, 64), bench.Case("tiny-vae", 1, 16), bench.Case("tiny-unet", 2, 32, steps=2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter timing")
    p.add_argument("--out", help="results JSON (default bench/results/e2e.json; "
                                 "bench/results/cpu_smoke/e2e.json without a GPU)")
    args = p.parse_args(argv)
    options = bench.parser().parse_args(["--quick"] if args.quick else [])
    out = results_path(args.out, "e2e")
    return bench.run_and_report(GPU_CASES if on_gpu() else CPU_CASES, options, out)


if __name__ == "__main__":
    sys.exit(main())
