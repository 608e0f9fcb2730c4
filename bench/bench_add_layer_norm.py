"""Benchmark: sdkernels.add_layer_norm (residual add + LayerNorm in one pass) at Stable Diffusion's transformer shapes.

The BasicTransformerBlock norms of the SD1.5 and SDXL UNets and the CLIP text encoder's, batch 2.

    python bench/bench_add_layer_norm.py [--dtype fp16] [--quick] [--no-graph] [--tiles 1,2048,8192] [--out PATH]

Case names: rows (batch x tokens) and C, the LayerNorm's width. Providers, each timed over the same rotating input
sets (x and residual; enough sets to overflow L2 three times):
  ours      sdkernels.add_layer_norm, its default dispatch (the Triton kernel)
  eager     ``total = x + r; F.layer_norm(total, (C,), w, b, eps)``: two kernels, the sum read back
  unfused   the eager add, then sdkernels' LayerNorm (``sdkernels.group_norm(total.view(-1, C, 1), 1, w, b, eps)``,
            what the layer_norm patcher runs)
  compile   torch.compile of eager's pair (GPU only, while --compile-budget-s lasts)
  copy      clones of x and r: kernels moving the op's bytes, the memory-bound ceiling at that size
  triton_tile=N  (--tiles) the kernel with N elements per program (SDKERNELS_ADD_LN_TILE; 1: one row a program)
GB/s counts the op's bytes for every provider: 2 reads and 2 writes of (rows, C) (weight and bias left out); speedup
is the provider's time over ours. Every output is checked before anything is timed: the total bit for bit against
eager's ``x + r``, the normalized rows against the op's reference within the dtype's tolerance; a mismatch aborts
the run before any row is written. Times are medians of CUDA-graph replays (--no-graph: plain calls).

Without a GPU it is a correctness smoke run: the Triton kernel runs in Triton's interpreter at tiny shapes,
torch.compile is skipped, the times mean nothing, and results go to bench/results/cpu_smoke/add_layer_norm.json.
"""
from __future__ import annotations

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (sdkernels imports it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

import sdkernels  # noqa: E402
from bench.common import (DTYPES, Abort, bench_parser, gpu_timing, measure_cases, results_path, Results,  # noqa: E402
                          bench_rotating_ms, copy_bandwidth_gbps, input_sets, on_gpu, run_poisoned, timing_note)
from sdkernels.dispatch import last_backend, use_backend  # noqa: E402
from sdkernels.ops.add_layer_norm import OP, add_layer_norm, layer_norm_reference  # noqa: E402
from sdkernels.testing import assert_close, tolerance  # noqa: E402

BENCH = "add_layer_norm"
TILE_KNOB = "SDKERNELS_ADD_LN_TILE"  # sdkernels.kernels.add_layer_norm.TILE_KNOB (that module imports Triton)
EPS = 1e-5
# (batch, tokens, C, where): the BasicTransformerBlock norms of SD1.5 at 512 px (64x64, 32x32, 16x16 latents) and SDXL
# at 1024 px, and the CLIP text encoder's 77 tokens.
SD_CASES = [(2, 4096, 320, "SD1.5"), (2, 1024, 640, "SD1.5"), (2, 256, 1280, "SD1.5"), (2, 4096, 640, "SDXL"),
            (2, 77, 768, "CLIP")]
SMOKE_CASES = [(2, 5, 40, "smoke"), (1, 7, 333, "smoke"), (2, 3, 1280, "smoke")]


def eager_add_layer_norm(x, r, w, b):
    total = x + r
    return total, F.layer_norm(total, (x.shape[-1],), w, b, EPS)


def unfused_add_layer_norm(x, r, w, b):
    total = x + r
    C = x.shape[-1]
    return total, sdkernels.group_norm(total.view(-1, C, 1), 1, w, b, EPS).view(x.shape)


def check(label, outputs, x, r, w, b, factor=1.0):
    """outputs = (total, normed): total bit for bit eager's x + r, normed within factor x the dtype's tolerance of
    the reference of that total. The bulk comparison runs on the device; assert_close explains a failure."""
    total, normed = outputs
    want_total = x + r
    if total.shape != x.shape or total.dtype != x.dtype or not torch.equal(total, want_total):
        raise Abort(f"{label}: total is not eager's x + r bit for bit")
    expected = layer_norm_reference(want_total.float(), None if w is None else w.float(),
                                    None if b is None else b.float(), EPS)
    atol, rtol = tolerance(x.dtype, x.shape[-1])
    atol, rtol = atol * factor, rtol * factor
    if normed.shape == x.shape and bool(((normed.float() - expected).abs() <= atol + rtol * expected.abs()).all()):
        return
    try:
        assert_close(normed, layer_norm_reference(want_total.double(), None if w is None else w.double(),
                                                  None if b is None else b.double(), EPS), x.dtype, x.shape[-1],
                     what=label)
    except AssertionError as err:
        raise Abort(str(err)) from None
    raise Abort(f"{label}: outside {factor}x the tolerance")


def with_tile(tile: int, fn):
    """fn run with the kernel's tile size forced (read at each launch; a CUDA graph keeps its capture's)."""
    def run(*args):
        saved = os.environ.get(TILE_KNOB)
        os.environ[TILE_KNOB] = str(tile)
        try:
            with use_backend("triton", op=OP, strict=True):
                return fn(*args)
        finally:
            if saved is None:
                del os.environ[TILE_KNOB]
            else:
                os.environ[TILE_KNOB] = saved
    return run


def compiled_or_reason(fn, args, budget):
    """torch.compile(fn) warmed up on args, and the seconds it took; or None and why not."""
    if not on_gpu():
        return None, "no GPU: the torch.compile baseline runs only in the GPU run", 0.0
    if budget["spent"] > budget["limit"]:
        return None, f"compile budget of {budget['limit']:.0f} s spent", 0.0
    try:
        compiled = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        compiled(*args)
        torch.cuda.synchronize()
        spent = time.perf_counter() - t0
        budget["spent"] += spent
        return compiled, None, spent
    except Exception as e:  # a baseline that cannot be built is reported, never fatal
        return None, f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", 0.0


def measure_case(case, dtype, device, timing, tiles, budget) -> dict:
    B, T, C, _ = case
    label = f"{BENCH} rows={B * T},C={C} {dtype}"

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, device=device) * scale + offset).to(dtype)

    x, r = rand(B, T, C, scale=2.0, offset=0.5), rand(B, T, C)
    w, b = rand(C, scale=0.5, offset=1.0), rand(C, scale=0.5)

    def ours(x, r):
        return add_layer_norm(x, r, w, b, EPS)

    providers = {"ours": ours, "eager": lambda x, r: eager_add_layer_norm(x, r, w, b),
                 "unfused": lambda x, r: unfused_add_layer_norm(x, r, w, b)}
    providers.update({f"triton_tile={t}": with_tile(t, ours) for t in tiles})
    check(f"{label} ours", run_poisoned(lambda: ours(x, r)), x, r, w, b)
    backend = last_backend(OP)
    for name, fn in providers.items():
        if name != "ours":
            check(f"{label} {name}", run_poisoned(lambda: fn(x, r)), x, r, w, b, factor=2.0)
    skipped = {}
    compiled, why, compile_s = compiled_or_reason(eager_add_layer_norm, (x, r, w, b), budget)
    if compiled is not None:
        check(f"{label} torch.compile", compiled(x, r, w, b), x, r, w, b, factor=2.0)
        providers["compile"] = lambda x, r: compiled(x, r, w, b)
    else:
        skipped["compile"] = why
    providers["copy"] = lambda x, r: (x.clone(), r.clone())

    sets = [(x, r)] + input_sets(lambda: (rand(B, T, C), rand(B, T, C)), 2 * x.numel() * x.element_size())[1:]
    ms = {name: bench_rotating_ms(fn, sets, **timing) for name, fn in providers.items()}
    return dict(ms=ms, skipped=skipped, backend=backend, bytes=4 * x.numel() * x.element_size(),
                compile_s=compile_s)


def add_rows(results: Results, case, dtype, m: dict, copy_gbps) -> None:
    B, T, C, where = case
    ms = m["ms"]
    extra = dict(model=where, ours_backend=m["backend"], skipped=m["skipped"], compile_s=m["compile_s"])
    if copy_gbps:
        extra.update(floor_ms=m["bytes"] / copy_gbps / 1e6, copy_pct=100 * m["bytes"] / ms["ours"] / 1e6 / copy_gbps)
    for baseline, baseline_ms in ms.items():
        if baseline != "ours":
            results.add(BENCH, f"rows={B * T},C={C}", dtype, ms["ours"], baseline, baseline_ms,
                        bytes_moved=m["bytes"], **extra)


def case_table(measured: dict, providers: list) -> str:
    """GB/s of every provider per case (the op's bytes over its time), and ours' speedup over each."""
    width = max(14, *(len(p) for p in providers))
    head = f"{'case':22s} {'where':6s} " + " ".join(f"{p:>{width}s}" for p in providers)
    lines = ["GB/s (2 reads + 2 writes of rows x C over each provider's time), then ours' speedup:", head]
    for (B, T, C, where), m in measured.items():
        ms = m["ms"]
        gbps = " ".join(f"{m['bytes'] / ms[p] / 1e6:{width}.0f}" if p in ms else f"{'-':>{width}s}" for p in providers)
        ratio = " ".join(f"{ms[p] / ms['ours']:{width - 1}.2f}x" if p in ms else f"{'-':>{width}s}"
                         for p in providers)
        lines.append(f"{f'rows={B * T},C={C}':22s} {where:6s} {gbps}")
        lines.append(f"{'':22s} {'':6s} {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = bench_parser(__doc__, BENCH)
    p.add_argument("--tiles", default="",
                   help="comma-separated elements per program to time the kernel at besides its default, e.g. "
                        "1,2048,8192 (1: one row a program)")
    p.add_argument("--compile-budget-s", type=float, default=30.0,
                   help="stop compiling new cases once this many seconds went into torch.compile")
    args = p.parse_args(argv)
    try:
        tiles = [int(t) for t in args.tiles.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tiles {args.tiles!r}: comma-separated integers")
    if any(t < 1 for t in tiles):
        p.error("--tiles: each tile must be at least 1 element")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    t_start = time.perf_counter()
    if on_gpu():
        device, cases, timing = "cuda", SD_CASES, gpu_timing(args)
        copy_gbps = copy_bandwidth_gbps()
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s; {dtype}; "
              f"{'CUDA-graph replays' if args.graph else 'plain calls'}")
    else:
        print("no GPU: correctness smoke run in the Triton interpreter at tiny sizes; timings are not speed")
        device, cases, timing, copy_gbps = "cpu", SMOKE_CASES, {}, None

    budget = {"spent": 0.0, "limit": args.compile_budget_s}
    measured = measure_cases(cases, lambda case: measure_case(case, dtype, device, timing, tiles, budget),
                             key=lambda case: case)
    if measured is None:
        return 2
    results = Results(BENCH)
    results.meta["timing"] = timing_note(args.graph)
    results.meta["bytes"] = "2 reads (x, residual) + 2 writes (total, normed) of rows x C; weight and bias left out"
    for case, m in measured.items():
        add_rows(results, case, dtype, m, copy_gbps)
    print(results.table())
    print()
    providers = ["ours", "eager", "unfused", "compile", "copy"] + [f"triton_tile={t}" for t in tiles]
    print(case_table(measured, providers))
    skipped = {(k, v) for m in measured.values() for k, v in m["skipped"].items()}
    for provider, reason in sorted(skipped):
        print(f"skipped {provider}: {reason}")
    if not on_gpu():
        print("no GPU: every output matched the reference (total bit for bit); the times above are the Triton "
              "interpreter's and eager CPU's, not speed")
    out = results_path(args.out, BENCH)
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s "
          f"(torch.compile: {budget['spent']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
