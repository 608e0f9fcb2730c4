"""Where the setup time of a patched model goes: build the model, patch it (CUDA graphs by default), time the first
call (tuning, compiling, capture) under cProfile and print the functions that took most of it, cumulative.
Run it twice on a fresh machine: the first run compiles every Triton kernel (cold cache), the second starts from
Triton's cache and sdkernels' tuning file.
    python scripts/setup_profile.py [--model sd15] [--batch 2] [--no-graph] [--top 30]"""
import argparse
import cProfile
import pstats
import time

import torch

from sdkernels import models, patch
from sdkernels.patch import summary


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    with torch.device("cuda"):
        model = models.build(args.model, init="unit", dtype=torch.float16)
    model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, args.batch, args.resolution)
    call_args = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in call_args]
    call_kwargs = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                   for k, v in call_kwargs.items()}
    profiler = cProfile.Profile()
    with torch.no_grad():
        start = time.perf_counter()
        patch(model, cuda_graph=not args.no_graph)
        patched_s = time.perf_counter() - start
        profiler.enable()
        models.model_call(model, call_args, call_kwargs)
        torch.cuda.synchronize()
        profiler.disable()
        total_s = time.perf_counter() - start
        again = time.perf_counter()
        models.model_call(model, call_args, call_kwargs)
        torch.cuda.synchronize()
        again_s = time.perf_counter() - again
    print(summary(model))
    print(f"{args.model} B={args.batch} res={args.resolution} graph={not args.no_graph}: patch {patched_s:.2f} s, "
          f"patch + first call {total_s:.2f} s, second call {again_s * 1e3:.1f} ms")
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(args.top)
    stats.print_stats("compile|_ms|autotun|bench|capture|_fastest", args.top)  # compiling, measuring, capturing


if __name__ == "__main__":
    main()
