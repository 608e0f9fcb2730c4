"""Benchmark: the GEGLU of diffusers' FeedForward, elementwise (sdkernels.geglu) and fused into its projection
(sdkernels.linear_geglu), at the SD1.5 (512 px) and SDXL (1024 px) UNet shapes, batch 2.

    python bench/bench_geglu.py [--dtype fp16] [--quick] [--no-graph] [--out PATH]

Case names: M tokens (batch x latent pixels), K the FeedForward's dim, N the projection's width (2 x inner, the
nn.Linear's out_features); the output is (M, N / 2). Benches:
  geglu         (M, N) -> (M, N/2): ours vs eager (`a, g = h.chunk(2, -1); a * F.gelu(g)`) and torch.compile of
                it; GB/s of one read and one write, % of the measured copy bandwidth (a 512 MiB copy), and a
                device-to-device copy of the same bytes as a baseline ("copy": the ceiling at that size).
  linear_geglu  x (M, K), W (N, K): ours (the op with its backends measured per shape, as patch(tune=True) runs
                it: "triton", one matmul with GEGLU in its epilogue, or "cublas", F.linear then the geglu kernel) vs
                the eager pair (cuBLAS F.linear, then the eager GEGLU) and torch.compile of the pair; each backend
                alone and cuBLAS F.linear alone ("linear_only") as reference rows; TFLOP/s of 2*M*K*N.
Every output is checked against the fp32 reference and against eager before anything is timed; a mismatch aborts
the run before any row is written. Times are medians of CUDA-graph replays (--no-graph: plain calls).

Without a GPU it is a correctness smoke run: the Triton kernels run in Triton's interpreter at tiny shapes,
torch.compile is skipped, the times mean nothing, and results go to bench/results/cpu_smoke/geglu.json.
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

from bench.common import (DTYPES, Abort, bench_parser, gpu_timing, measure_cases, results_path, Results,  # noqa: E402
                          bench_ms, copy_bandwidth_gbps, on_gpu, tuning_objective)
from sdkernels import tuning  # noqa: E402
from sdkernels.dispatch import last_backend, use_backend  # noqa: E402
from sdkernels.ops.geglu import (geglu, geglu_reference, linear_geglu, linear_geglu_dispatch,  # noqa: E402
                                linear_geglu_reference)
from sdkernels.testing import assert_close, tolerance  # noqa: E402

# (M, K, N, where): the FeedForward projections of the SD1.5 UNet at 512 px and the SDXL UNet at 1024 px, batch 2.
# "SD1.5 mid": the mid block's 8 x 8 latent, beyond the shapes the targets name.
SD_CASES = [
    (2 * 4096, 320, 2 * 1280, "SD1.5"), (2 * 1024, 640, 2 * 2560, "SD1.5"), (2 * 256, 1280, 2 * 5120, "SD1.5"),
    (2 * 64, 1280, 2 * 5120, "SD1.5 mid"), (2 * 4096, 640, 2 * 2560, "SDXL"), (2 * 1024, 1280, 2 * 5120, "SDXL"),
]
SMOKE_CASES = [(6, 24, 2 * 19, "smoke"), (33, 40, 2 * 37, "smoke")]
TARGETS = {"geglu_copy_pct": 85.0, "geglu_x_eager": 2.0, "linear_geglu_x_eager": 1.25}
LARGE_BYTES = 32e6


def eager_geglu(h):
    a, g = h.chunk(2, dim=-1)
    return a * F.gelu(g)


def eager_linear_geglu(x, w, b):
    return eager_geglu(F.linear(x, w, b))


def check(label, out, expected, dtype, reduction_size, factor=1.0):
    """out within factor x the dtype's tolerance of expected; the bulk test runs on the device, assert_close
    explains a failure."""
    atol, rtol = tolerance(dtype, reduction_size)
    atol, rtol = atol * factor, rtol * factor
    e = expected.float()
    if out.shape == e.shape and bool(((out.float() - e).abs() <= atol + rtol * e.abs()).all()):
        return
    try:
        assert_close(out, expected.double(), dtype, reduction_size, what=label)
    except AssertionError as err:
        raise Abort(str(err)) from None
    raise Abort(f"{label}: outside {factor}x the tolerance")


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


def measure(providers: dict, timing: dict) -> dict:
    return {name: bench_ms(fn, **timing) for name, fn in providers.items()}


def bench_geglu(M, N, dtype, device, timing, budget):
    h = torch.randn(M, N, device=device).mul_(2).to(dtype)
    label = f"geglu M={M},N={N} {dtype}"
    expected = geglu_reference(h.float())
    out = geglu(h)
    check(label, out, expected, dtype, 1)
    check(f"{label} vs eager", out, eager_geglu(h), dtype, 1, factor=2.0)
    moved = (M * N + M * N // 2) * h.element_size()
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # "copy": a device-to-device copy moving the same bytes, the memory-bound ceiling at this size.
    providers = {"ours": lambda: geglu(h), "eager": lambda: eager_geglu(h), "copy": lambda: dst.copy_(src)}
    compiled, why, compile_s = compiled_or_reason(eager_geglu, (h,), budget)
    if compiled is not None:
        check(f"{label} torch.compile", compiled(h), expected, dtype, 1, factor=2.0)
        providers["compile"] = lambda: compiled(h)
    ms = measure(providers, timing)
    return dict(ms=ms, skipped={"compile": why} if why else {}, backend=last_backend("geglu"),
                bytes=moved, compile_s=compile_s)


def bench_linear_geglu(M, K, N, dtype, device, timing, budget):
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    b = (torch.randn(N, device=device) * 0.5).to(dtype)
    label = f"linear_geglu M={M},K={K},N={N} {dtype}"
    expected = linear_geglu_reference(x.float(), w.float(), b.float())
    def backend(name):
        def run():
            with use_backend(name, op="linear_geglu", strict=True):
                return linear_geglu(x, w, b)
        return run

    out = linear_geglu(x, w, b)  # with tuning enabled (GPU), the first call measures the backends
    chosen = last_backend("linear_geglu")
    eager = eager_linear_geglu(x, w, b)
    # A backend that declines these inputs here is reported, not forced: the cublas one runs only where GPU time is
    # what counts (CUDA-graph replays), and the CPU smoke run and --no-graph time plain calls.
    reasons = linear_geglu_dispatch.reasons(x, w, b, "none")
    skipped = {name: reasons[name] for name in ("triton", "cublas") if reasons[name]}
    backends = {name: backend(name) for name in ("triton", "cublas") if name not in skipped}
    for name, result in [("ours", out)] + [(name, run()) for name, run in backends.items()]:
        check(f"{label} {name}", result, expected, dtype, K)
        check(f"{label} {name} vs eager", result, eager, dtype, K, factor=2.0)
    # ours: the op as patch(tune=True) runs it, each backend measured once for this shape; then each backend alone.
    providers = {"ours": lambda: linear_geglu(x, w, b), "eager": lambda: eager_linear_geglu(x, w, b),
                 "linear_only": lambda: F.linear(x, w, b), **backends}
    compiled, why, compile_s = compiled_or_reason(eager_linear_geglu, (x, w, b), budget)
    if compiled is not None:
        check(f"{label} torch.compile", compiled(x, w, b), expected, dtype, K, factor=2.0)
        providers["compile"] = lambda: compiled(x, w, b)
    if why:
        skipped["compile"] = why
    ms = measure(providers, timing)
    config = None
    if on_gpu():
        from sdkernels.kernels.linear_geglu import tuned_plan
        config = tuned_plan(M, N // 2, K, dtype)
    return dict(ms=ms, skipped=skipped, backend=chosen, flops=2.0 * M * K * N, compile_s=compile_s, config=config)


def add_rows(results, bench, case, dtype, m, copy_gbps, where):
    ms = m["ms"]
    extra = dict(model=where, ours_backend=m["backend"], skipped=m["skipped"], compile_s=m["compile_s"])
    if m.get("config"):
        extra["tile_plan"] = m["config"]
    if "bytes" in m and copy_gbps:
        extra.update(floor_ms=m["bytes"] / copy_gbps / 1e6, copy_pct=100 * m["bytes"] / ms["ours"] / 1e6 / copy_gbps)
    for baseline, baseline_ms in ms.items():
        if baseline != "ours":
            results.add(bench, case, dtype, ms["ours"], baseline, baseline_ms, bytes_moved=m.get("bytes"),
                        flops=m.get("flops"), **extra)


def verdicts(results: Results) -> list:
    """One line per target: the worst case and whether every case met it."""
    def line(what, pairs, target, fmt):
        if not pairs:
            return f"{what}: no measurements"
        worst = min(pairs, key=lambda p: p[1])
        if target is None:
            return f"{what}: worst {fmt.format(worst[1])} ({worst[0]})"
        missed = [c for c, v in pairs if v < target]
        verdict = "met at every case" if not missed else f"MISSED at {len(missed)} of {len(pairs)}: {missed}"
        return f"{what}: worst {fmt.format(worst[1])} ({worst[0]}); target >= {fmt.format(target)}: {verdict}"

    rows = results.rows
    geglu_eager = [(r["case"], r["speedup"]) for r in rows if r["bench"] == "geglu" and r["baseline"] == "eager"]
    copy = [(r["case"], r["copy_pct"], r["gbps"] * r["ours_ms"] * 1e6) for r in rows
            if r["bench"] == "geglu" and r["baseline"] == "eager" and "copy_pct" in r]
    large = [(c, pct) for c, pct, moved in copy if moved >= LARGE_BYTES]
    same_size = [(r["case"], 100 * r["speedup"]) for r in rows if r["bench"] == "geglu" and r["baseline"] == "copy"]
    lines = [line("geglu, % of copy bandwidth (measured on a 512 MiB copy)", [(c, pct) for c, pct, _ in copy],
                  TARGETS["geglu_copy_pct"], "{:.0f}%"),
             line("geglu, % of the speed of a copy moving the same bytes", same_size, TARGETS["geglu_copy_pct"],
                  "{:.0f}%"),
             line(f"geglu, % of copy bandwidth where a call moves >= {LARGE_BYTES / 1e6:.0f} MB (launch and tail "
                  "costs fade)", large, TARGETS["geglu_copy_pct"], "{:.0f}%"),
             line("geglu, speedup vs eager", geglu_eager, TARGETS["geglu_x_eager"], "{:.2f}x")]
    for where in ("SD1.5", "SDXL", "SD1.5 mid"):
        pairs = [(r["case"], r["speedup"]) for r in rows
                 if r["bench"] == "linear_geglu" and r["baseline"] == "eager" and r["model"] == where]
        if pairs:
            lines.append(line(f"linear_geglu at the {where} shapes, speedup vs cuBLAS Linear + eager GEGLU", pairs,
                              TARGETS["linear_geglu_x_eager"], "{:.2f}x"))
    compiled = [(f"{r['bench']} {r['case']}", r["speedup"]) for r in rows if r["baseline"] == "compile"]
    if compiled:
        lines.append(line("speedup vs torch.compile of the same (no target)", compiled, None, "{:.2f}x"))
    return lines


def main(argv=None) -> int:
    p = bench_parser(__doc__, "geglu")
    p.add_argument("--compile-budget-s", type=float, default=35.0,
                   help="stop compiling new cases once this many seconds went into torch.compile")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    t_start = time.perf_counter()
    if on_gpu():
        device, cases = "cuda", SD_CASES
        timing = gpu_timing(args)
        copy_gbps = copy_bandwidth_gbps()
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s; {dtype}; "
              f"{'CUDA-graph replays' if args.graph else 'plain calls'}")
    else:
        print("no GPU: correctness smoke run in the Triton interpreter at tiny sizes; timings are not speed")
        device, cases, timing, copy_gbps = "cpu", SMOKE_CASES, {}, None

    if on_gpu():
        tuning.enable(["linear_geglu"])  # as sdkernels.patch(tune=True) does: the op measures its backends
    results = Results("geglu")
    results.meta["timing"] = ("median of CUDA-graph replays (do_bench)" if on_gpu() and args.graph
                              else "median of plain calls" + ("" if on_gpu() else " (CPU interpreter: not speed)"))
    results.meta["case_names"] = "M tokens, K input features, N = 2 x inner (the projection's width)"
    budget = {"spent": 0.0, "limit": args.compile_budget_s}

    def measure(case):
        M, K, N, _ = case
        with tuning_objective(timing):
            return (bench_geglu(M, N, dtype, device, timing, budget),
                    bench_linear_geglu(M, K, N, dtype, device, timing, budget))

    measured = measure_cases(cases, measure, key=lambda case: case)
    if measured is None:
        return 2
    for (M, K, N, where), (elementwise, fused) in measured.items():
        add_rows(results, "geglu", f"M={M},N={N}", dtype, elementwise, copy_gbps, where)
        add_rows(results, "linear_geglu", f"M={M},K={K},N={N}", dtype, fused, copy_gbps, where)

    print(results.table())
    print()
    for r in results.rows:
        if r["bench"] == "linear_geglu" and r["baseline"] == "eager":
            plan = f"; the triton backend's tuned plan {r['tile_plan']}" if "tile_plan" in r else ""
            print(f"linear_geglu {r['case']}: ran the {r['ours_backend']} backend{plan}")
    skipped = {(k, v) for r in results.rows for k, v in r["skipped"].items()}
    for provider, reason in sorted(skipped):
        print(f"skipped {provider}: {reason}")
    if on_gpu():
        print("\n".join(verdicts(results)))
    else:
        print("no GPU: every output matched the reference and eager; the times above are the Triton interpreter's "
              "and eager CPU's, not speed")
    out = results_path(args.out, "geglu")
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s "
          f"(torch.compile: {budget['spent']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
