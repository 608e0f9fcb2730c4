"""Where the setup time of a patched model goes: build the model, patch it (CUDA graphs by default), time the first
call (tuning, compiling, capture) under cProfile and print the functions that took most of it, cumulative.
Run it twice on a fresh machine: the first run compiles every Triton kernel (cold cache), the second starts from
Triton's cache and sdkernels' tuning file. SDKERNELS_PRECOMPILE=0 compiles each kernel on its first launch instead of
in parallel before the call (sdkernels.precompile); TRITON_CACHE_DIR and SDKERNELS_CACHE pointed at empty folders
make any run a first one.
    python scripts/setup_profile.py [--model sd15] [--batch 2] [--no-graph] [--top 30]"""
import argparse
import json
from collections import Counter
import cProfile
import pstats
import time
from pathlib import Path

import torch

from sdkernels import models, patch, precompile
from sdkernels.patch import summary


def _count_compiles() -> list:
    """Names of the kernels Triton compiles (not loads from its cache) in this process from now on."""
    from triton import knobs
    names = []
    knobs.compilation.listener = lambda **kw: None if kw.get("cache_hit") else names.append(kw["src"].name)
    return names


def _record_misses() -> list:
    """Specializations of the kernels the calling process compiles itself, not found in Triton's disk cache (a
    jit_cache_hook that records and lets the compile go on; precompile's dry call sets its own meanwhile)."""
    from triton import knobs
    missed = []

    def hook(*, fn, compile, **_):
        spec = compile["specialization_data"]
        if not precompile.on_disk(fn.jit_function, compile, spec):
            missed.append(spec)
    knobs.runtime.jit_cache_hook = hook
    return missed


def _counted(names) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(Counter(names).items()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--stats", help="also write the first call's cProfile stats to this file (pstats)")
    p.add_argument("--specs", help="also write the specializations sent to precompile's workers (JSON)")
    args = p.parse_args()
    with torch.device("cuda"):
        model = models.build(args.model, init="unit", dtype=torch.float16)
    model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, args.batch, args.resolution)
    call_args = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in call_args]
    call_kwargs = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                   for k, v in call_kwargs.items()}
    profiler = cProfile.Profile()
    compiled_here, missed = _count_compiles(), _record_misses()
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
    for report in getattr(precompile.installed(model), "reports", []):
        print(report)
        print("  sent to the workers:", _counted(report.kernels))
    print(f"Triton compiles in this process during the first call (precompile's own included): {len(compiled_here)}; "
          f"not found on disk: {len(missed)}: {_counted(compiled_here)}")
    print(f"{args.model} B={args.batch} res={args.resolution} graph={not args.no_graph}: patch {patched_s:.2f} s, "
          f"patch + first call {total_s:.2f} s, second call {again_s * 1e3:.1f} ms")
    if args.specs:
        reports = getattr(precompile.installed(model), "reports", [])
        Path(args.specs).write_text(json.dumps({"precompiled": [spec for report in reports for spec in report.specs],
                                                "compiled_in_the_call": missed}))
    if args.stats:
        profiler.dump_stats(args.stats)
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(args.top)
    stats.print_stats("compile|_ms|autotun|bench|capture|_fastest", args.top)  # compiling, measuring, capturing


if __name__ == "__main__":
    main()
