"""Benchmark: sdkernels::flash_attention's backends at the attention shapes of SD1.5, SD2.1 and SDXL, batch 2.

    python bench/bench_attention.py [--dtype fp16] [--quick] [--no-graph] [--out PATH]
    python bench/bench_attention.py --sweep [--sweep-dims 40]   # time every tile config per head dim

Case names: B batch, H heads, N queries, Nk keys, d head dim; q, k, v in diffusers' (B, tokens, H*d) layout.
Benches (TFLOP/s counts 4*B*H*N*Nk*d, the two matmuls):
  flash_attention            backend "flash" vs "sdpa" (F.scaled_dot_product_attention: torch's best backend)
                             and "math" (eager matmul, softmax, matmul in the input dtype)
  partial_softmax_attention  backend "partial_softmax" (row max/sum, then softmax . V) vs "math", "sdpa" and
                             "flash"; peak memory (max_memory_allocated over the call) of ours and of math
  partial_softmax_attention_cuda_stats   the same with the row statistics in CUDA C++, where the extension has them
Every output is checked against an fp32 reference (our error at most 2x SDPA's) before anything is timed; a
mismatch aborts the run before any row is written. Times are medians of CUDA-graph replays (--no-graph: calls), as
the other benches take them (bench_rotating_ms): one graph holds one call per input set, back to back as a captured
model runs its layers, over enough sets to overflow the L2 cache, and its time is divided by the calls; so no
provider's time carries a lone graph launch (~5 us, most of a call at N = 256; up to session 17 this bench timed
one call per replay).

Without a GPU it is a correctness smoke run: the kernels run in Triton's interpreter at tiny shapes, the times mean
nothing, and results go to bench/results/cpu_smoke/attention.json (not committed).
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (sdkernels imports it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from bench.common import (DTYPES, Abort, bench_parser, gpu_timing, measure_cases, results_path, Results,  # noqa: E402
                          bench_rotating_ms, input_sets, on_gpu, timing_note)
from sdkernels.dispatch import last_backend, use_backend  # noqa: E402
from sdkernels.ops import attention as attn_ops  # noqa: E402
from sdkernels.ops.attention import as_bhnd, flash_attention, from_bhnd  # noqa: E402
from sdkernels.testing import tolerance  # noqa: E402

OP = "flash_attention"
# (B, H, N, Nk, d, where)
SD_CASES = [
    (2, 8, 4096, 4096, 40, "SD1.5 64x64 self"), (2, 8, 4096, 77, 40, "SD1.5 64x64 cross"),
    (2, 8, 1024, 1024, 80, "SD1.5 32x32 self"), (2, 8, 1024, 77, 80, "SD1.5 32x32 cross"),
    (2, 8, 256, 256, 160, "SD1.5 16x16 self"), (2, 8, 256, 77, 160, "SD1.5 16x16 cross"),
    (2, 10, 4096, 4096, 64, "SD2.1/SDXL d=64 self"), (2, 10, 4096, 77, 64, "SD2.1/SDXL d=64 cross"),
    (2, 10, 16384, 16384, 64, "d=64 128x128 self"), (2, 8, 4096, 4096, 128, "d=128 self"),
]
SMOKE_CASES = [(1, 2, 40, 77, 40, "smoke"), (1, 2, 33, 50, 80, "smoke"), (2, 1, 20, 20, 160, "smoke")]
TARGETS = [  # (case, baseline, minimum speedup, minimum TFLOP/s or None)
    ("B=2,H=8,N=4096,Nk=4096,d=40", "sdpa", 1.3, None),
    ("B=2,H=8,N=1024,Nk=1024,d=80", "sdpa", 1.0, None),
    ("B=2,H=8,N=256,Nk=256,d=160", "sdpa", 1.0, None),
    ("B=2,H=8,N=4096,Nk=77,d=40", "sdpa", 1.0, None),
    ("B=2,H=10,N=16384,Nk=16384,d=64", "sdpa", 1.0, 450.0),
]
PARTIAL_VS_MATH = 3.0
MATH_MEMORY_FRACTION = 0.6  # skip the math baseline where its N x Nk matrices would not fit in this much memory


def case_name(B, H, N, Nk, d):
    return f"B={B},H={H},N={N},Nk={Nk},d={d}"


def make_inputs(B, H, N, Nk, d, dtype, device):
    q = torch.randn(B, N, H * d, device=device, dtype=dtype)
    k = torch.randn(B, Nk, H * d, device=device, dtype=dtype)
    v = torch.randn(B, Nk, H * d, device=device, dtype=dtype)
    return q, k, v, H


def sdpa(q, k, v, heads):
    q4, k4, v4 = (as_bhnd(t, heads) for t in (q, k, v))
    return from_bhnd(F.scaled_dot_product_attention(q4, k4, v4), heads)


def math_attention(q, k, v, heads):
    q4, k4, v4 = (as_bhnd(t, heads) for t in (q, k, v))
    s = (q4 @ k4.transpose(-1, -2)) * q4.shape[-1] ** -0.5
    return from_bhnd(torch.softmax(s, dim=-1) @ v4, heads)


def ours(backend, q, k, v, heads):
    with use_backend(backend, op=OP, strict=True):
        return flash_attention(q, k, v, heads=heads)


def reference_fp32(q, k, v, heads, max_bytes=2**30):
    """fp32 math attention, a few heads at a time so that N x Nk fp32 scores stay under max_bytes."""
    q4, k4, v4 = (as_bhnd(t, heads) for t in (q, k, v))
    B, H, N, d = q4.shape
    out = torch.empty(B, H, N, d, device=q.device, dtype=torch.float32)
    per_head = N * k4.shape[2] * 4
    step = max(1, max_bytes // per_head)
    for b in range(B):
        for h in range(0, H, step):
            sl = (b, slice(h, h + step))
            s = (q4[sl].float() @ k4[sl].float().transpose(-1, -2)) * d ** -0.5
            out[sl] = torch.softmax(s, dim=-1) @ v4[sl].float()
    return from_bhnd(out, heads)


def check(label, out, ref, baseline_out, dtype):
    """Our max error against the fp32 reference at most 2x SDPA's (the same algorithm in torch) + slack."""
    err = (out.float() - ref).abs().max().item()
    base_err = (baseline_out.float() - ref).abs().max().item()
    if not (err <= 2 * base_err + tolerance(dtype)[0] / 4):
        raise Abort(f"{label}: max error {err:.3g} vs the fp32 reference; SDPA's is {base_err:.3g}")
    return err


def peak_mib(fn) -> float | None:
    """Memory the call allocates at its peak beyond what was allocated before (outputs included), in MiB."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def math_fits(B, H, N, Nk, dtype) -> tuple:
    need = 2 * B * H * N * Nk * torch.empty((), dtype=dtype).element_size()  # scores and probabilities
    if not on_gpu():
        return True, None
    free, _ = torch.cuda.mem_get_info()
    if need > MATH_MEMORY_FRACTION * free:
        return False, f"math needs {need / 2**30:.1f} GiB for its N x Nk matrices ({free / 2**30:.1f} GiB free)"
    return True, None


def cuda_stats_reason():
    return attn_ops._cuda_stats_available() if on_gpu() else "no GPU"


def bench_case(B, H, N, Nk, d, dtype, device, timing):
    q, k, v, heads = make_inputs(B, H, N, Nk, d, dtype, device)
    label = f"{case_name(B, H, N, Nk, d)} {dtype}"
    ref = reference_fp32(q, k, v, heads)
    sdpa_out = sdpa(q, k, v, heads)
    backends = ["flash", "partial_softmax"] + (["partial_softmax_cuda"] if cuda_stats_reason() is None else [])
    providers, errors, ran = {}, {}, {}
    for backend in backends:
        out = ours(backend, q, k, v, heads)
        ran[backend] = last_backend(OP)
        errors[backend] = check(f"{label} {backend}", out, ref, sdpa_out, dtype)
        providers[backend] = lambda q, k, v, b=backend: ours(b, q, k, v, heads)
        del out
    del ref
    providers["sdpa"] = lambda q, k, v: sdpa(q, k, v, heads)
    skipped = {}
    fits, why = math_fits(B, H, N, Nk, dtype)
    if fits:
        providers["math"] = lambda q, k, v: math_attention(q, k, v, heads)
    else:
        skipped["math"] = why
    sets = [(q, k, v)] + input_sets(lambda: make_inputs(B, H, N, Nk, d, dtype, device)[:3],
                                    sum(t.numel() * t.element_size() for t in (q, k, v)))[1:]
    ms = {name: bench_rotating_ms(fn, sets, **timing) for name, fn in providers.items()}
    memory = {name: peak_mib(lambda fn=fn: fn(q, k, v)) for name, fn in providers.items()}
    return dict(ms=ms, errors=errors, memory=memory, skipped=skipped, ran=ran, flops=4.0 * B * H * N * Nk * d)


def add_rows(results, case, dtype, m, where):
    ms, memory = m["ms"], m["memory"]
    benches = {"flash": ("flash_attention", ["sdpa", "math"]),
               "partial_softmax": ("partial_softmax_attention", ["math", "sdpa", "flash"]),
               "partial_softmax_cuda": ("partial_softmax_attention_cuda_stats", ["math", "sdpa", "flash",
                                                                                 "partial_softmax"])}
    for backend, (bench, baselines) in benches.items():
        if backend not in ms:
            continue
        for baseline in baselines:
            if baseline not in ms:
                continue
            results.add(bench, case, dtype, ms[backend], baseline, ms[baseline], flops=m["flops"], model=where,
                        ours_backend=m["ran"][backend], max_abs_error=m["errors"][backend],
                        peak_mib=memory.get(backend), baseline_peak_mib=memory.get(baseline), skipped=m["skipped"])


def verdicts(results: Results) -> list:
    rows = {(r["bench"], r["case"], r["baseline"]): r for r in results.rows}
    lines = []
    for case, baseline, speedup, tflops in TARGETS:
        r = rows.get(("flash_attention", case, baseline))
        if r is None:
            lines.append(f"flash {case} vs {baseline}: not measured")
            continue
        ok = r["speedup"] >= speedup and (tflops is None or r["tflops"] >= tflops)
        want = f">= {speedup:.2f}x" + (f" and >= {tflops:.0f} TFLOP/s" if tflops else "")
        lines.append(f"flash {case} vs {baseline}: {r['speedup']:.2f}x, {r['tflops']:.0f} TFLOP/s; target {want}: "
                     f"{'met' if ok else 'MISSED'}")
    partial = [r for r in results.rows if r["bench"] == "partial_softmax_attention" and r["baseline"] == "math"]
    if partial:
        worst = min(partial, key=lambda r: r["speedup"])
        missed = [r["case"] for r in partial if r["speedup"] < PARTIAL_VS_MATH]
        lines.append(f"partial_softmax vs math: worst {worst['speedup']:.2f}x ({worst['case']}); target >= "
                     f"{PARTIAL_VS_MATH:.1f}x: " + ("met at every case" if not missed else f"MISSED at {missed}"))
        for r in partial:
            lines.append(f"  {r['case']}: peak {r['peak_mib']:.0f} MiB (math {r['baseline_peak_mib']:.0f} MiB)")
    vs_flash = [r for r in results.rows if r["bench"].startswith("partial_softmax") and r["baseline"] == "flash"]
    for r in vs_flash:
        lines.append(f"{r['bench']} vs flash at {r['case']}: {r['speedup']:.2f}x (no target: where it wins, "
                     "dispatch may choose it)")
    return lines


# ---- --sweep: tile configs per head dim ------------------------------------------------------------------------

SWEEP_CASES = {40: (2, 8, 4096, 4096), 64: (2, 10, 4096, 4096), 80: (2, 8, 1024, 1024), 128: (2, 8, 4096, 4096),
               160: (2, 8, 256, 256)}


def sweep(dtype, timing, dims, nk=None) -> None:
    """Every tile config at each head dim's case; at head dims of a padded split (40) both chunk layouts (the second
    chunk padded, or overlapping the first: flash_attention.OVERLAP_LAST_CHUNK). ``nk``: every case with that many
    keys instead (77: cross-attention)."""
    import triton
    from sdkernels.kernels import flash_attention as fa
    best, default_overlap = {}, fa.OVERLAP_LAST_CHUNK
    for d, (B, H, N, Nk) in ((d, SWEEP_CASES[d]) for d in dims):
        Nk = nk or Nk
        q, k, v, heads = make_inputs(B, H, N, Nk, d, dtype, "cuda")
        q4, k4, v4 = (as_bhnd(t, heads) for t in (q, k, v))
        expected = F.scaled_dot_product_attention(q4, k4, v4)
        flops = 4.0 * B * H * N * Nk * d
        sets = [(q4, k4, v4)] + input_sets(
            lambda: tuple(as_bhnd(t, heads) for t in make_inputs(B, H, N, Nk, d, dtype, "cuda")[:3]),
            3 * q.numel() * q.element_size())[1:]
        timings = []
        padded = sum(fa.HEAD_DIM_CHUNKS[d]) > d and fa.HEAD_DIM_CHUNKS[d][1] > 0
        for overlap in ((False, True) if padded else (False,)):
            fa.OVERLAP_LAST_CHUNK = overlap
            for config in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
                label = f"d={d} {case_name(B, H, N, Nk, d)} {config}" + (" overlapping chunks" if overlap else "")
                out = torch.empty_like(q4)
                try:
                    fa.flash_attention_triton(q4, k4, v4, out, d ** -0.5, None, config=config)
                except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
                    print(f"{label}: {type(e).__name__}")
                    continue
                if not torch.allclose(out, expected, atol=2e-2, rtol=2e-2):
                    print(f"{label}: WRONG OUTPUT")
                    continue
                ms = bench_rotating_ms(lambda q4, k4, v4, c=config, o=out: fa.flash_attention_triton(
                    q4, k4, v4, o, d ** -0.5, None, config=c), sets, **timing)
                timings.append((ms, config, overlap))
                print(f"{label}: {ms:.4f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        fa.OVERLAP_LAST_CHUNK = default_overlap
        sdpa_ms = bench_rotating_ms(F.scaled_dot_product_attention, sets, **timing)
        ms, config, overlap = min(timings)
        best[d] = config
        print(f"== d={d}: best {config}{' with overlapping chunks' if overlap else ''} {ms:.4f} ms "
              f"({sdpa_ms / ms:.2f}x SDPA); table now {fa.HALF_CONFIGS[d]}")
    print("HALF_CONFIGS = {\n" + "".join(f"    {d}: {c},\n" for d, c in best.items()) + "}")


def main(argv=None) -> int:
    p = bench_parser(__doc__, "attention")
    p.add_argument("--sweep", action="store_true", help="time every tile config per head dim (GPU, minutes)")
    p.add_argument("--sweep-dims", default="40,64,80,128,160", help="head dims the sweep covers (comma-separated)")
    p.add_argument("--sweep-nk", type=int, help="the sweep's key length (default: each case's own; 77: cross-attention)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    t_start = time.perf_counter()
    if on_gpu():
        device, cases = "cuda", SD_CASES
        timing = gpu_timing(args)
        print(f"{torch.cuda.get_device_name()}; {dtype}; {'CUDA-graph replays' if args.graph else 'plain calls'}; "
              f"CUDA row statistics: {cuda_stats_reason() or 'available'}")
        if args.sweep:
            sweep(dtype, timing, [int(d) for d in args.sweep_dims.split(",")], args.sweep_nk)
            return 0
    else:
        if args.sweep:
            print("--sweep needs a GPU")
            return 2
        print("no GPU: correctness smoke run in the Triton interpreter at tiny sizes; timings are not speed")
        device, cases, timing = "cpu", SMOKE_CASES, {}

    results = Results("attention")
    results.meta["timing"] = timing_note(args.graph)
    results.meta["case_names"] = "B batch, H heads, N queries, Nk keys, d head dim; (B, tokens, H*d) layout"
    results.meta["flops"] = "4*B*H*N*Nk*d"
    measured = measure_cases(cases, lambda case: bench_case(*case[:5], dtype, device, timing), key=lambda case: case)
    if measured is None:
        return 2
    for (B, H, N, Nk, d, where), m in measured.items():
        add_rows(results, case_name(B, H, N, Nk, d), dtype, m, where)

    print(results.table())
    print()
    for provider, reason in sorted({(k, v) for r in results.rows for k, v in r["skipped"].items()}):
        print(f"skipped {provider}: {reason}")
    if on_gpu():
        print("\n".join(verdicts(results)))
    else:
        print("no GPU: every output matched the reference; the times above are the Triton interpreter's and eager "
              "CPU's, not speed")
    out = results_path(args.out, "attention")
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
