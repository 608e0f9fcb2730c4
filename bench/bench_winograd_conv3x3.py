"""Benchmark: sdkernels::conv3x3 (3x3 convolution + bias [+ residual, * scale]) at every stride-1 3x3 convolution of
the SD models, Winograd F(2x2, 3x3) against cuDNN.

    python bench/bench_winograd_conv3x3.py [--models sd15,sdxl,vae512,vae1024] [--dtype fp16] [--residual]
                                           [--cudnn-benchmark] [--quick] [--out PATH]

The shapes are read off the diffusers models on the meta device (bench/shapes.py): the SD1.5 UNet (batch 2, 512 px),
the SDXL UNet (batch 2, 1024 px) and the VAE decoder (512 and 1024 px), every Conv2d with a 3x3 kernel, stride 1,
padding 1 and one group (the stride-2 downsamplers and 1x1 convolutions are not this op), deduplicated, with their
calls per forward. For each case, channels_last inputs with unit-gain weights, every backend of the op is forced in
turn (cudnn: F.conv2d in the input dtype + the eager epilogue, the baseline; winograd; triton_winograd;
triton_igemm; triton_tma) and its output checked first against float64 within the Winograd error bound
(sdkernels/ops/winograd.py; on a 256x256 crop for the largest VAE shapes, whose float64 check would take tens of
GB); a wrong output aborts the run before any row is written. Rows report the direct-convolution-equivalent TFLOP/s,
2 N H W K 9 C / time, for every provider, so Winograd's 2.25x fewer multiplies show as a higher rate. Per case also
the Winograd call split into stages (measure_stages): cuBLAS's time for the same 16 GEMMs, and each stage's bytes at
copy bandwidth. --quick times shorter and keeps, per model, the three cases that take most of its convolution time
(FLOPs x calls).

Without a GPU it is a correctness smoke run on tiny shapes (cudnn is eager CPU, the Triton backends the interpreter,
winograd unavailable); results go to bench/results/cpu_smoke/winograd_conv3x3.json (or --out).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (sdkernels imports it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch import nn  # noqa: E402

import sdkernels  # noqa: E402
from bench.common import (DTYPES, results_path, Abort, Results, add_models_option, bench_ms,  # noqa: E402
                          bench_parser, bench_rotating_ms, copy_bandwidth_gbps, env_set, gpu_timing, input_sets,
                          measure_cases, on_gpu, run_poisoned, timing_note)
from bench.shapes import WORKLOADS, workload_calls  # noqa: E402
from sdkernels.dispatch import use_backend  # noqa: E402
from sdkernels.ops.conv3x3_plain import OP, conv3x3_dispatch  # noqa: E402
from sdkernels import _ext  # noqa: E402
from sdkernels.ops.winograd import error_bound, operand_dtype, transformed_filter  # noqa: E402

BENCH = "winograd_conv3x3"
BASELINE = "cudnn"
# The first that ran is "ours" in the rows. winograd_wmma: the winograd backend's first CUDA kernel (WMMA, V through
# shared memory), which "winograd" (the mma.sync kernel for fp16/bf16) replaced; timed beside it.
# cudnn_epilogue: cuDNN's conv, our one-pass epilogue (with --residual only).
OURS = ("winograd", "winograd_wmma", "triton_winograd", "triton_igemm", "triton_tma", "cudnn_epilogue")
# The mma kernel's stages, each timed by leaving it out (the binding's bench-only ablate, fp16): how much less time.
ABLATIONS = {"filter_copies": 1, "input_copies": 2, "input_transform": 3, "mmas": 4, "output_transform": 5}
QUICK_CASES_PER_MODEL = 3
FULL_CHECK_ELEMENTS = 2**25             # above this, the float64 check runs on a crop
CHECK_CROP = 256
SMOKE_CASES = [(1, 8, 16, 5, 7), (2, 16, 8, 9, 4), (1, 12, 8, 6, 6)]  # the last: C not a multiple of 8


@dataclasses.dataclass
class Case:
    batch: int
    cin: int
    cout: int
    height: int
    width: int
    calls: dict = dataclasses.field(default_factory=dict)  # {model: calls per forward}

    @property
    def name(self) -> str:
        return f"B={self.batch},C={self.cin},K={self.cout},H={self.height},W={self.width}"

    @property
    def flops(self) -> float:
        """Of the direct convolution: a multiply and an add per output element, tap and input channel."""
        return 2.0 * self.batch * self.height * self.width * self.cout * 9 * self.cin


def is_plain_3x3(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def collect_cases(models: list) -> list:
    """One case per distinct (input shape, output channels) of the models' plain 3x3 convolutions."""
    cases = {}
    for model in models:
        for call in workload_calls(model, nn.Conv2d):
            if not is_plain_3x3(call.module):
                continue
            (B, C, H, W), K = call.input_shapes[0], call.module.out_channels
            case = cases.setdefault((B, C, K, H, W), Case(B, C, K, H, W))
            case.calls[model] = case.calls.get(model, 0) + 1
    return list(cases.values())


def quick_subset(cases: list, models: list) -> list:
    """Per model, the QUICK_CASES_PER_MODEL cases with the most FLOPs per forward; in the original order."""
    keep = set()
    for model in models:
        mine = sorted((c for c in cases if model in c.calls), key=lambda c: -c.flops * c.calls[model])
        keep.update(c.name for c in mine[:QUICK_CASES_PER_MODEL])
    return [c for c in cases if c.name in keep]


def make_inputs(case: Case, dtype, device, residual: bool):
    """channels_last x (unit variance), unit-gain channels_last weight, bias, and optionally a residual."""
    x = torch.randn(case.batch, case.cin, case.height, case.width, device=device)
    w = torch.randn(case.cout, case.cin, 3, 3, device=device) / math.sqrt(9 * case.cin)
    b = 0.5 * torch.randn(case.cout, device=device)
    r = torch.randn(case.batch, case.cout, case.height, case.width, device=device) if residual else None
    cl = lambda t: None if t is None else t.to(dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
    return cl(x), cl(w), b.to(dtype), cl(r)


def check(label, out, x, w, b, r, scale):
    """out within the Winograd bound of the float64 result (a crop's for the largest tensors)."""
    if x.numel() > FULL_CHECK_ELEMENTS:
        crop = lambda t: None if t is None else t[..., :CHECK_CROP, :CHECK_CROP]  # noqa: E731
        # The crop's own border is zero-padded where the full image is not: compare away from it.
        inner = (..., slice(0, CHECK_CROP - 1), slice(0, CHECK_CROP - 1))
        exact, bound = error_bound(crop(x), w, b, crop(r), scale)
        out, exact, bound = out[inner], exact[inner], bound[inner]
    else:
        exact, bound = error_bound(x, w, b, r, scale)
    err = (out.double() - exact).abs()
    if not bool((err <= bound).all()):  # NaN fails
        worst = (err / bound).nan_to_num(float("inf")).max().item()
        raise Abort(f"{label}: outside the Winograd error bound (worst error / bound {worst:.3g})")


def forced(backend):
    def run(x, w, b, r, scale):
        with use_backend(backend, op=OP, strict=True):
            return sdkernels.conv3x3(x, w, b, r, scale)
    return run


def measure_case(case: Case, dtype, device, timing: dict, residual: bool) -> dict:
    """{"ms": {backend: ms}, "skipped": {backend: why}, "checked_on": "full" or "crop"} for one case."""
    x, w, b, r = make_inputs(case, dtype, device, residual)
    scale = 1 / math.sqrt(2) if residual else 1.0
    sets = [(x,)] + input_sets(lambda: (torch.randn_like(x),), x.numel() * x.element_size())[1:]
    ms, skipped = {}, {}
    for backend, reason in conv3x3_dispatch.reasons(x, w, b, r, scale).items():
        if reason:
            skipped[backend] = reason
            continue
        run = forced(backend)
        out = run_poisoned(lambda: run(x, w, b, r, scale))  # the check sees any element a kernel never wrote
        check(f"{BENCH} {case.name} {dtype} backend={backend}", out, x, w, b, r, scale)
        del out
        ms[backend] = bench_rotating_ms(lambda x: run(x, w, b, r, scale), sets, **timing)
        if backend == "winograd" and on_gpu() and dtype != torch.float32:
            with env_set("SDKERNELS_WINOGRAD_KERNEL", "wmma"):
                out = run_poisoned(lambda: run(x, w, b, r, scale))
                check(f"{BENCH} {case.name} {dtype} backend=winograd (WMMA kernel)", out, x, w, b, r, scale)
                del out
                ms["winograd_wmma"] = bench_rotating_ms(lambda x: run(x, w, b, r, scale), sets, **timing)
    return {"ms": ms, "skipped": skipped,
            "checked_on": "full" if x.numel() <= FULL_CHECK_ELEMENTS else f"{CHECK_CROP}x{CHECK_CROP} crop"}


def measure_stages(case: Case, dtype, device, timing: dict) -> dict:
    """Where a Winograd call's time can go, stage by stage, next to the fused kernel's total: the 16 GEMMs
    M[e] = V[e] @ U[e] as cuBLAS runs them (torch.bmm on V (16, tiles, C) and U (16, C, K) in the operand dtype:
    what the GEMM stage could take), and the bytes each stage moves, with their time at the measured copy
    bandwidth: x read and out written (the fused kernel's floor), and V and M, which an unfused pipeline would
    write and read back (the fused kernel keeps them on chip)."""
    tiles = case.batch * ((case.height + 1) // 2) * ((case.width + 1) // 2)
    operand = operand_dtype(dtype)
    v = torch.randn(16, tiles, case.cin, device=device, dtype=operand)
    u = torch.randn(16, case.cin, case.cout, device=device, dtype=operand) / math.sqrt(case.cin)
    gemm_ms = bench_ms(lambda: torch.bmm(v, u), **timing)
    size = torch.tensor([], dtype=dtype).element_size()
    io_bytes = size * case.batch * case.height * case.width * (case.cin + case.cout)
    vm_bytes = 2 * size * 16 * tiles * (case.cin + case.cout)  # V and M, each written once and read once
    gbps = copy_bandwidth_gbps() if on_gpu() else None
    at_copy = (lambda n: n / gbps / 1e6) if gbps else (lambda n: None)
    return {**ablation_ms(case, dtype, device, timing), "gemm_cublas_ms": gemm_ms,
            "gemm_tflops": 2 * 16 * tiles * case.cin * case.cout / gemm_ms / 1e9,
            "io_bytes": io_bytes, "io_ms_at_copy_bw": at_copy(io_bytes),
            "unfused_vm_bytes": vm_bytes, "unfused_vm_ms_at_copy_bw": at_copy(vm_bytes)}


def ablation_ms(case: Case, dtype, device, timing: dict) -> dict:
    """{"mma_kernel_ms": t, "mma_saved_ms": {stage: t - t without it}}: the mma kernel (fp16, conv + bias) whole and
    with each stage left out (ABLATIONS), the stages' shares of its time; {} where it does not run."""
    if device != "cuda" or dtype != torch.float16:
        return {}
    x, w, b, _ = make_inputs(case, dtype, device, residual=False)
    u, out = transformed_filter(w), torch.empty(case.batch, case.cout, case.height, case.width, device=device,
                                                dtype=dtype, memory_format=torch.channels_last)
    launch = _ext.load().winograd_conv3x3
    whole = bench_ms(lambda: launch(x, u, b, None, out, 1.0, kernel=2), **timing)
    saved = {stage: whole - bench_ms(lambda a=ablate: launch(x, u, b, None, out, 1.0, kernel=2, ablate=a), **timing)
             for stage, ablate in ABLATIONS.items()}
    return {"mma_kernel_ms": whole, "mma_saved_ms": saved}


def stages_table(cases: list, measured: dict) -> str:
    lines = [f"{'case':34s} {'winograd us':>12s} {'cuBLAS GEMMs us':>16s} {'GEMM TF/s':>10s} {'x+out us @copy':>15s} "
             f"{'V+M us @copy':>13s}  mma kernel without each stage: us saved ({', '.join(ABLATIONS)})"]
    for case in cases:
        m = measured[case.name]
        stages = m.get("stages")
        if stages is None:
            continue
        at_copy = lambda key: f"{1e3 * stages[key]:.1f}" if stages[key] is not None else "-"  # noqa: E731
        ours = f"{1e3 * m['ms']['winograd']:.1f}" if "winograd" in m["ms"] else "-"
        saved = stages.get("mma_saved_ms", {})
        lines.append(f"{case.name:34s} {ours:>12s} {1e3 * stages['gemm_cublas_ms']:16.1f} "
                     f"{stages['gemm_tflops']:10.1f} {at_copy('io_ms_at_copy_bw'):>15s} "
                     f"{at_copy('unfused_vm_ms_at_copy_bw'):>13s}  "
                     + " ".join(f"{1e3 * saved[k]:.1f}" for k in ABLATIONS if k in saved))
    return "\n".join(lines)


def add_rows(results: Results, case: Case, dtype, m: dict, residual: bool) -> None:
    ms = m["ms"]
    ours = next((o for o in OURS if o in ms), None)
    if ours is None:
        return
    extra = dict(models=list(case.calls), calls=case.calls, ours_backend=ours,
                 epilogue="bias+residual*scale" if residual else "bias", backend_ms=ms,
                 backend_tflops={k: case.flops / v / 1e9 for k, v in ms.items()}, skipped=m["skipped"],
                 checked_on=m["checked_on"], stages=m.get("stages"))
    for baseline in [BASELINE] + [o for o in OURS if o != ours]:
        if baseline in ms:
            results.add(BENCH, case.name, dtype, ms[ours], baseline, ms[baseline], flops=case.flops, **extra)
    for other in OURS:  # each other convolution of ours against cuDNN, under its own bench name
        if other != ours and other in ms and BASELINE in ms:
            results.add(f"conv3x3_{other}", case.name, dtype, ms[other], BASELINE, ms[BASELINE], flops=case.flops,
                        **dict(extra, ours_backend=other))


def case_table(cases: list, measured: dict) -> str:
    backends = [b.name for b in conv3x3_dispatch.backends]
    head = (f"{'case':34s} {'calls':>5s} " + " ".join(f"{b + ' us':>15s}" for b in backends)
            + " " + " ".join(f"{b[:9] + ' TF/s':>14s}" for b in backends) + f" {'wino x cudnn':>12s}")
    lines = [head]
    for case in cases:
        ms = measured[case.name]["ms"]
        us = " ".join(f"{1e3 * ms[b]:15.1f}" if b in ms else f"{'-':>15s}" for b in backends)
        tf = " ".join(f"{case.flops / ms[b] / 1e9:14.1f}" if b in ms else f"{'-':>14s}" for b in backends)
        ratio = f"{ms[BASELINE] / ms['winograd']:12.2f}" if "winograd" in ms and BASELINE in ms else f"{'-':>12s}"
        lines.append(f"{case.name:34s} {sum(case.calls.values()):5d} {us} {tf} {ratio}")
    skips = {}
    for case in cases:
        for backend, reason in measured[case.name]["skipped"].items():
            skips.setdefault((backend, reason), []).append(case.name)
    for (backend, reason), names in sorted(skips.items()):
        lines.append(f"  {backend} skipped at {len(names)} case(s) ({', '.join(names[:2])}{', ...' * (len(names) > 2)})"
                     f": {reason}")
    return "\n".join(lines)


def per_forward(cases: list, measured: dict, models: list) -> str:
    """Convolution time per forward of each model: cuDNN alone, the faster of cuDNN and Winograd per shape, and the
    fastest backend per shape (what the measured chooser picks)."""
    lines = []
    for model in models:
        mine = [c for c in cases if model in c.calls and BASELINE in measured[c.name]["ms"]]
        if not mine:
            continue
        cudnn = sum(c.calls[model] * measured[c.name]["ms"][BASELINE] for c in mine)
        best = sum(c.calls[model] * min(measured[c.name]["ms"].get(b, math.inf) for b in (BASELINE, "winograd"))
                   for c in mine)
        wins = sum(measured[c.name]["ms"].get("winograd", math.inf) < measured[c.name]["ms"][BASELINE] for c in mine)
        fastest = sum(c.calls[model] * min(measured[c.name]["ms"].values()) for c in mine)
        lines.append(f"{model}: 3x3 convolutions per forward ({len(mine)} shapes): cudnn {cudnn:.3f} ms, best of "
                     f"cudnn/winograd per shape {best:.3f} ms ({cudnn / best:.2f}x); winograd faster at {wins}; "
                     f"fastest backend per shape {fastest:.3f} ms ({cudnn / fastest:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = bench_parser(__doc__, BENCH)
    add_models_option(p, "sd15,sdxl,vae512,vae1024", WORKLOADS)
    p.add_argument("--residual", action="store_true",
                   help="time (conv + bias + residual) / sqrt(2), the ResNet block's second convolution, instead "
                        "of conv + bias")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms per shape first (torch.backends.cudnn.benchmark), a stronger "
                        "baseline than eager's default heuristics")
    args = p.parse_args(argv)
    models = args.models
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    t_start = time.perf_counter()

    if on_gpu():
        torch.backends.cudnn.allow_tf32 = False  # fp32 runs compare fp32 with fp32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        device, timing = "cuda", gpu_timing(args)
        cases = collect_cases(models)
        if args.quick:
            cases = quick_subset(cases, models)
        print(f"{torch.cuda.get_device_name()}: {len(cases)} cases ({', '.join(models)}), {dtype}")
    else:
        print("no GPU: correctness smoke run at tiny sizes, timings are not speed")
        device, timing = "cpu", {}
        cases = [Case(*shape, calls={"smoke": 1}) for shape in SMOKE_CASES]

    measured = measure_cases(cases, lambda case: measure_case(case, dtype, device, timing, args.residual))
    if measured is None:
        return 2
    for case in cases:
        if "winograd" in measured[case.name]["ms"] or not on_gpu():
            measured[case.name]["stages"] = measure_stages(case, dtype, device, timing)

    results = Results(BENCH)
    results.meta["timing"] = timing_note(args.graph)
    results.meta["tflops"] = "direct-convolution equivalent: 2 N H W K 9 C / time"
    results.meta["cudnn_benchmark"] = args.cudnn_benchmark
    for case in cases:
        add_rows(results, case, dtype, measured[case.name], args.residual)
    print(results.table())
    print()
    print(case_table(cases, measured))
    print()
    print(per_forward(cases, measured, models if on_gpu() else ["smoke"]))
    print()
    print("Winograd by stage: the fused kernel against cuBLAS on its 16 GEMMs, and the bytes of each stage at copy "
          "bandwidth")
    print(stages_table(cases, measured))
    out = results_path(args.out, BENCH)
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
