"""Benchmark: fused GroupNorm+SiLU (sdkernels.group_norm(..., silu=True)) at every GroupNorm shape of the SD models.

    python bench/bench_group_norm.py [--models sd15,sdxl,vae512,vae1024] [--dtype fp16] [--quick] [--out PATH]

For each distinct (shape, groups) the models run (bench/shapes.py), channels_last for all and NCHW as well for the
SD1.5 UNet, it times in one process: every sdkernels backend forced in turn, the default dispatch, eager
``F.silu(F.group_norm(...))`` and torch.compile of that function. Every backend's output is first checked against
the op's reference (fp32 math on the same inputs); a mismatch aborts the run before any row is written. Each case
prints its floor: one read of x and one write of the output at the measured copy bandwidth.

Without a GPU it is a correctness smoke run: the Triton kernels run in Triton's interpreter on a few tiny shapes,
torch.compile is skipped, and the times mean nothing; results go to bench/results/cpu_smoke/ (or --out).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (sdkernels imports it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

import sdkernels  # noqa: E402
from bench.common import (DTYPES, Abort, add_models_option, bench_parser, gpu_timing, measure_cases,  # noqa: E402
                          results_path, Results, bench_rotating_ms, copy_bandwidth_gbps, input_sets, on_gpu,
                          run_poisoned, timing_note)
from bench.shapes import WORKLOADS, group_norm_case, group_norm_shapes  # noqa: E402
from sdkernels.dispatch import last_backend, use_backend  # noqa: E402
from sdkernels.ops.group_norm import OP, group_norm_dispatch, group_norm_reference  # noqa: E402
from sdkernels.testing import assert_close, tolerance  # noqa: E402

BENCH = "group_norm_silu"
# torch.compile costs seconds per case; within the budget, cases are compiled in this order of the models they
# belong to (the VAE 1024 px shapes carry the compile target), channels_last before NCHW.
COMPILE_PRIORITY = ["vae1024", "sd15", "vae512", "sdxl", "sd21"]
# No GPU: tiny (shape, groups) that still reach both Triton plans (one pass; split, where Cg*H*W > 8192) and a
# rank-3 input, in both layouts.
SMOKE_SHAPES = [((2, 8, 5, 7), 4), ((1, 12, 6, 6), 3), ((2, 16, 33, 33), 2), ((1, 8, 37), 4)]


@dataclasses.dataclass
class Case:
    shape: tuple
    groups: int
    eps: float
    layout: str                                           # "cl" (channels fastest) or "nchw" (contiguous)
    calls: dict = dataclasses.field(default_factory=dict)  # {model: GroupNorm calls per forward at this shape}
    silu_calls: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{group_norm_case(self.shape, self.groups)},layout={self.layout}"

    @property
    def models(self) -> list:
        return list(self.calls)

    def compile_rank(self) -> tuple:
        rank = min(COMPILE_PRIORITY.index(m) if m in COMPILE_PRIORITY else len(COMPILE_PRIORITY) for m in self.calls)
        return (self.layout != "cl", rank)


def collect_cases(models: list) -> list:
    """One case per distinct (shape, groups, layout) over the models (eps differs between calls of one shape, not
    their cost: the first one seen is used); channels_last for every model, NCHW as well for the SD1.5 UNet."""
    cases = {}
    for layout in ("cl", "nchw"):
        for model in models:
            if layout == "nchw" and model != "sd15":
                continue
            for s in group_norm_shapes(model):
                case = cases.setdefault((s.shape, s.groups, layout), Case(s.shape, s.groups, s.eps, layout))
                case.calls[model] = case.calls.get(model, 0) + s.count
                case.silu_calls[model] = case.silu_calls.get(model, 0) + s.silu_count
    return list(cases.values())


def make_inputs(case: Case, dtype, device):
    """Random x (non-zero mean, as activations have) in the case's layout, and random weight and bias."""
    N, C, *spatial = case.shape
    x = torch.randn(N, *spatial, C, device=device) * 2 + 0.5
    x = x.movedim(-1, 1) if case.layout == "cl" else x.movedim(-1, 1).contiguous()
    w = torch.randn(C, device=device)
    b = torch.randn(C, device=device)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def eager_group_norm_silu(x, w, b, groups, eps):
    return F.silu(F.group_norm(x, groups, w, b, eps))


def check_output(label, out, x, expected, reduction_size):
    """out against the reference within the fp16/bf16/fp32 tolerance of x's dtype, keeping x's layout. The bulk
    check runs on the device (the VAE tensors hold 10^8 elements); assert_close explains a failure."""
    if out.shape != x.shape or out.dtype != x.dtype or out.stride() != x.stride():
        raise Abort(f"{label}: output {tuple(out.shape)} {out.dtype} stride {out.stride()}, expected x's "
                    f"{tuple(x.shape)} {x.dtype} stride {x.stride()}")
    atol, rtol = tolerance(x.dtype, reduction_size)
    e = expected.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if bool(((out.to(e.dtype) - e).abs() <= atol + rtol * e.abs()).all()):  # NaN fails the comparison
        return
    try:
        assert_close(out, expected, x.dtype, reduction_size, what=label)
    except AssertionError as err:
        raise Abort(str(err)) from None
    raise Abort(f"{label}: outside the tolerance on the device, within it in float64 on the CPU")


def forced(backend, fn):
    def run(*args):
        with use_backend(backend, op=OP, strict=True):
            return fn(*args)
    return run


def measure_case(case: Case, dtype, device, timing: dict, compile_skip: str | None) -> dict:
    """Check, then time, every provider on one case. Returns {"ms": {provider: ms}, "skipped": {provider: why},
    "default": backend name, "compile_s": seconds or None}."""
    x, w, b = make_inputs(case, dtype, device)
    G, eps = case.groups, case.eps
    up = torch.float64 if dtype == torch.float32 else torch.float32
    expected = group_norm_reference(x.to(up), G, w.to(up), b.to(up), eps, silu=True)
    reduction = x.numel() // (x.shape[0] * G)
    # Every provider is timed over the same rotating input sets (x first, then fresh copies).
    sets = [(x,)] + [(xs,) for xs, in input_sets(lambda: (torch.empty_like(x).copy_(torch.randn_like(x)),),
                                                  x.numel() * x.element_size())][1:]

    def ours(x):
        return sdkernels.group_norm(x, G, w, b, eps, silu=True)

    def time_it(fn):
        return bench_rotating_ms(fn, sets, **timing)

    ms, skipped = {}, {}
    for backend in group_norm_dispatch.backends:
        reason = group_norm_dispatch.reasons(x, G, w, b, eps, True, None)[backend.name]
        if reason:
            skipped[backend.name] = reason
            continue
        fn = forced(backend.name, ours)
        check_output(f"{BENCH} {case.name} {dtype} backend={backend.name}", run_poisoned(lambda: fn(x)), x,
                     expected, reduction)
        ms[backend.name] = time_it(fn)
    out = run_poisoned(lambda: ours(x))
    default = last_backend(OP)
    check_output(f"{BENCH} {case.name} {dtype} default dispatch ({default})", out, x, expected, reduction)
    # The default dispatch runs one of the backends just timed; time it only when it fell back to the reference.
    ms["default"] = ms[default] if default in ms else time_it(ours)
    del out, expected

    try:
        ms["eager"] = time_it(lambda x: eager_group_norm_silu(x, w, b, G, eps))
    except Exception as e:  # e.g. a dtype eager lacks on the CPU: a missing baseline, not a failed run
        skipped["eager"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

    # "copy": a clone of x, one kernel reading and writing the op's bytes: what any single kernel of this op costs at
    # least in this harness (at the small shapes, mostly launch and DRAM latency, not bandwidth).
    ms["copy"] = time_it(lambda x: x.clone())

    compile_s = None
    if compile_skip:
        skipped["compile"] = compile_skip
    else:
        try:
            torch.compiler.reset()  # a fresh cache per case: dynamo's recompile limit must not send it to eager
            compiled = torch.compile(lambda x, w, b: eager_group_norm_silu(x, w, b, G, eps), dynamic=False)
            t0 = time.perf_counter()
            compiled(x, w, b)
            if x.is_cuda:
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms["compile"] = time_it(lambda x: compiled(x, w, b))
        except Exception as e:  # a baseline that cannot be built is reported, never fatal
            skipped["compile"] = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return {"ms": ms, "skipped": skipped, "default": default, "compile_s": compile_s}


def bytes_floor(case: Case, dtype) -> int:
    """Read x once and write the output once (+ weight and bias)."""
    numel = 1
    for d in case.shape:
        numel *= d
    size = torch.empty((), dtype=dtype).element_size()
    return (2 * numel + 2 * case.shape[1]) * size


def add_rows(results: Results, case: Case, dtype, m: dict, copy_gbps) -> None:
    ms, ours_ms = m["ms"], m["ms"]["default"]
    moved = bytes_floor(case, dtype)
    extra = dict(layout=case.layout, models=case.models, calls=case.calls, silu_calls=case.silu_calls,
                 ours_backend=m["default"], backend_ms={k: v for k, v in ms.items() if k not in ("eager", "compile",
                                                                                                  "default")},
                 skipped=m["skipped"], compile_s=m["compile_s"])
    if copy_gbps:
        extra.update(floor_ms=moved / copy_gbps / 1e6, copy_pct=100 * moved / ours_ms / 1e6 / copy_gbps)
    baselines = ["eager", "compile", "copy"] + [b.name for b in group_norm_dispatch.backends if b.name != m["default"]]
    for baseline in baselines:
        if baseline in ms:
            results.add(BENCH, case.name, dtype, ours_ms, baseline, ms[baseline], bytes_moved=moved, **extra)


def case_table(cases, measured, dtype, copy_gbps) -> str:
    backends = [b.name for b in group_norm_dispatch.backends]
    us = lambda v: f"{1e3 * v:9.1f}" if v is not None else f"{'-':>9s}"  # noqa: E731
    head = (f"{'case':40s} {'calls':>5s} {'floor us':>9s} {'copy us':>9s} {'eager us':>9s} {'compile':>9s} "
            + " ".join(f"{b + ' us':>9s}" for b in backends)
            + f" {'ours':>7s} {'x eager':>7s} {'x comp':>7s} {'GB/s':>6s} {'%copy':>6s}")
    lines = [head]
    for case in cases:
        m = measured[case.name]
        ms, ours = m["ms"], m["ms"]["default"]
        moved = bytes_floor(case, dtype)
        floor = moved / copy_gbps / 1e6 if copy_gbps else None
        ratio = lambda k: f"{ms[k] / ours:7.2f}" if k in ms else f"{'-':>7s}"  # noqa: E731
        pct = f"{100 * floor / ours:6.0f}" if floor else f"{'-':>6s}"
        lines.append(f"{case.name:40s} {sum(case.calls.values()):5d} {us(floor)} {us(ms.get('copy'))} {us(ms.get('eager'))} "
                     f"{us(ms.get('compile'))} " + " ".join(us(ms.get(b)) for b in backends)
                     + f" {m['default']:>7s} {ratio('eager')} {ratio('compile')} {moved / ours / 1e6:6.0f} {pct}")
    skips = {}
    for case in cases:
        for provider, reason in measured[case.name]["skipped"].items():
            skips.setdefault((provider, reason), []).append(case.name)
    if skips:
        lines.append("skipped:")
    for (provider, reason), names in sorted(skips.items()):
        where = ", ".join(names) if len(names) <= 3 else f"{len(names)} cases ({', '.join(names[:2])}, ...)"
        lines.append(f"  {provider} at {where}: {reason}")
    return "\n".join(lines)


def _stats(label, values, target, fmt, higher=True):
    """'label: min .. (case), median ..; target ..: met / MISSED at n of m'."""
    if not values:
        return f"{label}: no measurements"
    worst = min(values, key=lambda kv: kv[1]) if higher else max(values, key=lambda kv: kv[1])
    missed = [c.split(",layout=")[0] for c, v in values if (v < target if higher else v > target)]
    verdict = "met at every shape" if not missed else f"MISSED at {len(missed)} of {len(values)}: " + ", ".join(missed)
    return (f"{label}: min {fmt.format(worst[1])} ({worst[0]}), median "
            f"{fmt.format(statistics.median(v for _, v in values))}; target {fmt.format(target)}: {verdict}")


def summary(cases, measured, dtype, copy_gbps) -> str:
    lines = []
    for layout in ("cl", "nchw"):
        sd15 = [(c.name, measured[c.name]["ms"]["eager"] / measured[c.name]["ms"]["default"])
                for c in cases if "sd15" in c.calls and c.layout == layout and "eager" in measured[c.name]["ms"]]
        if sd15:
            lines.append(_stats(f"SD1.5 UNet shapes ({layout}), speedup vs eager", sd15, 5.0, "{:.2f}x"))
            # Where a fifth of eager's time is less than a clone of x takes, no single kernel can reach 5x.
            below = [c.name.split(",layout=")[0] for c in cases if "sd15" in c.calls and c.layout == layout
                     and "eager" in measured[c.name]["ms"]
                     and measured[c.name]["ms"]["eager"] / 5 < measured[c.name]["ms"]["copy"]]
            lines.append(f"SD1.5 UNet shapes ({layout}) where eager / 5 is less than a clone of x takes: "
                         f"{len(below)} of {len(sd15)}" + (f" ({', '.join(below)})" if below else ""))
    vae = [c for c in cases if "vae1024" in c.calls and c.layout == "cl"]
    if vae and copy_gbps:
        pct = [(c.name, 100 * bytes_floor(c, dtype) / copy_gbps / 1e6 / measured[c.name]["ms"]["default"])
               for c in vae]
        lines.append(_stats("VAE 1024 px shapes (cl), % of copy bandwidth", pct, 70.0, "{:.0f}%"))
    comp = [(c.name, measured[c.name]["ms"]["compile"] / measured[c.name]["ms"]["default"])
            for c in vae if "compile" in measured[c.name]["ms"]]
    if vae:
        lines.append(_stats("VAE 1024 px shapes (cl), speedup vs torch.compile", comp, 1.5, "{:.2f}x"))
    for model in dict.fromkeys(m for c in cases for m in c.calls):
        rows = [c for c in cases if model in c.calls and c.layout == "cl" and "eager" in measured[c.name]["ms"]]
        if rows:
            per_forward = lambda k: sum(c.calls[model] * measured[c.name]["ms"][k] for c in rows)  # noqa: E731
            lines.append(f"{model}: GroupNorm+SiLU time per forward (channels_last, {len(rows)} shapes): eager "
                         f"{per_forward('eager'):.3f} ms, ours {per_forward('default'):.3f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = bench_parser(__doc__, "group_norm")
    add_models_option(p, "sd15,sdxl,vae512,vae1024", WORKLOADS)
    p.add_argument("--compile-budget-s", type=float, default=50.0,
                   help="stop compiling new cases once this many seconds went into torch.compile")
    args = p.parse_args(argv)
    models = args.models
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    t_start = time.perf_counter()

    model_cases = collect_cases(models)
    if on_gpu():
        device, cases = "cuda", sorted(model_cases, key=Case.compile_rank)
        timing = gpu_timing(args)
        copy_gbps = copy_bandwidth_gbps()
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s; {len(cases)} cases "
              f"({', '.join(models)}), {dtype}")
    else:
        print("no GPU: correctness smoke run at tiny sizes, timings are not speed "
              f"(the GPU run would time {len(model_cases)} cases of {', '.join(models)})")
        device, timing, copy_gbps = "cpu", {}, None
        cases = [Case(shape, g, 1e-5, layout, {"smoke": 1}, {"smoke": 1})
                 for shape, g in SMOKE_SHAPES for layout in ("cl", "nchw")]

    compile_spent = 0.0

    def measure(case):
        nonlocal compile_spent
        compile_skip = None
        if not on_gpu():
            compile_skip = "no GPU: the torch.compile baseline runs only in the GPU run"
        elif args.quick and "vae1024" not in case.calls:
            compile_skip = "--quick: compiled only at the VAE 1024 px shapes"
        elif compile_spent > args.compile_budget_s:
            compile_skip = f"compile budget of {args.compile_budget_s:.0f} s spent (--compile-budget-s)"
        m = measure_case(case, dtype, device, timing, compile_skip)
        compile_spent += m["compile_s"] or 0.0
        return m

    measured = measure_cases(cases, measure)
    if measured is None:
        return 2

    order = {c.name: i for i, c in enumerate(model_cases)} if on_gpu() else {c.name: i for i, c in enumerate(cases)}
    cases.sort(key=lambda c: order[c.name])
    results = Results("group_norm")
    results.meta["timing"] = timing_note(args.graph)
    for case in cases:
        add_rows(results, case, dtype, measured[case.name], copy_gbps)
    print(results.table())
    print()
    print(case_table(cases, measured, dtype, copy_gbps))
    print()
    if on_gpu():
        print(summary(cases, measured, dtype, copy_gbps))
    else:
        print("no GPU: every backend that can run on the CPU matched the reference; the times above are the "
              "Triton interpreter's and eager CPU's, not speed")
    out = results_path(args.out, "group_norm")
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s "
          f"(torch.compile: {compile_spent:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
