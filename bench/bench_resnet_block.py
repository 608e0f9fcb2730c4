"""Benchmark: the fused ResNet block (the opt-in resnet_block patcher) at every ResnetBlock2D shape of the SD models.

    python bench/bench_resnet_block.py [--models sd15,vae512] [--dtype fp16] [--quick] [--out PATH]

For each distinct block the models run (read off the models on the meta device, bench/shapes.py), one diffusers
ResnetBlock2D with unit-gain random weights, channels_last, in eval mode, timed in one process as:

  ours     the block patched with ops=["resnet_block"], run as asked (SDKERNELS_TUNING=0: not the measured
           choice between it and the unfused path): group_norm_stats, then two conv3x3_fused (Triton)
  eager    the block as diffusers runs it
  unfused  the block patched with ops=["resnet_gn_silu"]: cuDNN convolutions and our GroupNorm+SiLU op
  cudnn    the block's convolutions alone through cuDNN (conv1, conv2, the 1x1 shortcut; no bias, norm or add):
           not a block, a bound: a fused block whose convolutions ran at cuDNN's speed, with every norm, SiLU and
           add free, would take this long, so unfused / cudnn is the most any fusion gains over the unfused path
           without convolutions faster than cuDNN's
  triton_convs  the same convolutions through sdkernels::conv3x3_fused as the fused block runs it (tuning off), with
           no norm or epilogue; its triton_bordered backend still copies each input into a zero-bordered buffer, so
           this is our convolutions with those copies: the fused block's time less this is what its statistics,
           normalization and epilogues add
  conv_kernels  our bordered convolution kernels alone (kernels/conv3x3_padded.py, no bias or epilogue), each
           reading a bordered input made once per input set outside the timing (conv1's of x, conv2's of conv1's
           output), with the 1x1 shortcut through cuDNN; GPU only. unfused / 1.1 less this is what the fusion's
           statistics, normalization, adds and bordered writes may cost for issue 7's 1.1x

Every provider's output is first checked against the block in fp32 (fp64 without a GPU): a patched block further
from it than twice eager's error aborts the run before any row is written. Each row carries the bytes one block
moves along our path (the triton_bordered backend's: each normalized input written once into its bordered buffer
and read by its conv), every provider's own count, and the FLOPs of its convolutions.

Without a GPU it is a correctness smoke run: two tiny blocks run in Triton's interpreter, the times mean nothing,
and results go to bench/results/cpu_smoke/resnet_block.json (or --out).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (sdkernels imports it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (DTYPES, Abort, add_models_option, bench_parser, gpu_timing, measure_cases,  # noqa: E402
                          results_path, Results, bench_rotating_ms, copy_bandwidth_gbps, input_sets, on_gpu,
                          timing_note)
from bench.shapes import WORKLOADS, workload_calls  # noqa: E402
from sdkernels.models import rescale_to_unit_gain  # noqa: E402
from sdkernels.patch import patch, patchers  # noqa: E402
from sdkernels.testing import env_set, relative_error  # noqa: E402

BENCH = "resnet_block"
PROVIDERS = {"ours": ["resnet_block"], "eager": None, "unfused": ["resnet_gn_silu"]}
TARGETS = {"eager": 1.3, "unfused": 1.1}  # issue 7, at the SD1.5 shapes
CONV_BOUND = "cudnn"                      # the convolutions alone (see the docstring)
OUR_CONVS = "triton_convs"                # our 3x3 convolutions alone
OUR_KERNELS = "conv_kernels"              # our bordered convolution kernels alone, inputs bordered beforehand
MAX_ERROR_RATIO = 2.0                     # a patched block's error vs fp32 at most this times eager's (+ 1e-4)


@dataclasses.dataclass
class Case:
    block: torch.nn.Module = dataclasses.field(repr=False)  # a ResnetBlock2D (on the meta device for model cases)
    batch: int
    height: int
    width: int
    temb_dim: int | None                                      # None: no time embedding (the VAE's blocks)
    calls: dict = dataclasses.field(default_factory=dict)    # {model: calls per forward}

    @property
    def cin(self) -> int:
        return self.block.in_channels

    @property
    def cout(self) -> int:
        return self.block.conv2.out_channels

    @property
    def name(self) -> str:
        return f"B={self.batch},Cin={self.cin},Cout={self.cout},H={self.height},W={self.width}"

    def key(self) -> tuple:
        b = self.block
        return (self.batch, self.cin, self.cout, self.height, self.width, self.temb_dim, b.norm1.num_groups,
                b.norm2.num_groups, b.norm1.eps, b.output_scale_factor, b.conv_shortcut is not None)


def collect_cases(models: list) -> tuple:
    """([Case], {reason: count}): one case per distinct block configuration the models call, and why the fused
    path leaves the others (they are not timed here)."""
    from diffusers.models.resnet import ResnetBlock2D
    fused_why_not = next(p for p in patchers() if p.name == "resnet_block").why_not
    cases, left = {}, {}
    for model in models:
        for call in workload_calls(model, ResnetBlock2D):
            reason = fused_why_not(call.module)
            if reason:
                left[reason] = left.get(reason, 0) + 1
                continue
            (B, _, H, W), temb = call.input_shapes[0], call.input_shapes[1:]
            case = Case(call.module, B, H, W, temb[0][1] if temb else None)
            case = cases.setdefault(case.key(), case)
            case.calls[model] = case.calls.get(model, 0) + 1
    return list(cases.values()), left


def smoke_cases() -> list:
    """Tiny blocks for the interpreter: a 1x1 shortcut with a time embedding, and a VAE-style block without."""
    from diffusers.models.resnet import ResnetBlock2D
    return [Case(ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=16, groups=4), 1, 5, 6, 16,
                 {"smoke": 1}),
            Case(ResnetBlock2D(in_channels=8, temb_channels=None, groups=2, time_embedding_norm="group"), 2, 4, 4,
                 None, {"smoke": 1})]


def materialize(case: Case, device, dtype) -> torch.nn.Module:
    """The case's block with real storage: PyTorch's init rescaled to unit gain per layer, channels_last, eval."""
    block = copy.deepcopy(case.block).to_empty(device=device)
    with torch.no_grad():
        for m in block.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    rescale_to_unit_gain(block)
    return block.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def make_inputs(case: Case, dtype, device) -> tuple:
    x = torch.randn(case.batch, case.cin, case.height, case.width, device=device)
    temb = torch.randn(case.batch, case.temb_dim, device=device) if case.temb_dim else None
    return x.to(dtype=dtype, memory_format=torch.channels_last), None if temb is None else temb.to(dtype)


# ---- what a block moves and computes ---------------------------------------------------------------------------

def traffic(case: Case, dtype) -> dict:
    """Bytes one block reads and writes on each provider's path: one read of each kernel's inputs and one write of
    its output, weights once (the time-embedding projection and the statistics, a few KB, left out)."""
    size = torch.empty((), dtype=dtype).element_size()
    x = case.batch * case.cin * case.height * case.width
    h = case.batch * case.cout * case.height * case.width
    weights = 9 * case.cin * case.cout + 9 * case.cout * case.cout
    shortcut, residual = 0, x                                  # identity: conv2's epilogue reads x
    if case.block.conv_shortcut is not None:
        weights += case.cin * case.cout
        shortcut, residual = x + h, h                          # the 1x1 conv reads x, writes what conv2 adds
    temb = 2 * h if case.temb_dim else 0
    # triton_bordered: stats and the bordered GN + SiLU read x, which writes it normalized; conv1 reads that, writes
    # h; the second bordered pass reads h, writes it normalized; conv2 reads that and the residual, writes out.
    ours = 2 * x + 2 * x + h + shortcut + 2 * h + (h + residual + h) + weights
    unfused = (2 * x + x + h) + temb + (2 * h + 2 * h) + shortcut + (residual + 2 * h + 2 * h) + weights
    eager = unfused + 2 * x + 2 * h                            # GroupNorm and SiLU in separate passes, twice
    return {k: v * size for k, v in dict(ours=ours, eager=eager, unfused=unfused).items()}


def flops(case: Case) -> float:
    pixels = case.batch * case.height * case.width
    k = 9 * case.cin * case.cout + 9 * case.cout * case.cout
    if case.block.conv_shortcut is not None:
        k += case.cin * case.cout
    return 2.0 * pixels * k


# ---- measuring -------------------------------------------------------------------------------------------------

def as_asked(provider: str):
    """The fused provider with sdkernels' measured choices off, so the patched block runs the fused path as asked
    (with them on it would run the unfused one wherever that measured faster, and the row would time that)."""
    return env_set("SDKERNELS_TUNING", "0") if provider == "ours" else contextlib.nullcontext()


def convolutions_only(block, ours: bool = False):
    """The block's convolutions alone on its channels_last input, without their biases (PyTorch adds a bias after
    cuDNN's kernel on a channels_last output), norms or adds: through cuDNN, what no block that runs cuDNN's
    convolutions can go under; with ``ours`` the 3x3 ones through sdkernels::conv3x3_fused (with the bordered
    backend's input copies; the shortcut stays cuDNN's, as in the fused block)."""
    import torch.nn.functional as F
    from sdkernels.ops.conv3x3 import conv3x3_fused

    def conv3x3(x, weight):
        return conv3x3_fused(x, weight)[0] if ours else F.conv2d(x, weight, None, padding=1)

    def run(x, temb):
        out = conv3x3(conv3x3(x, block.conv1.weight), block.conv2.weight)
        if block.conv_shortcut is not None:
            F.conv2d(x, block.conv_shortcut.weight)  # launched and timed (eager and a graph's capture keep it)
        return out
    return run


def bordered_kernels_only(block, sets):
    """Our two bordered convolution kernels alone (no bias or epilogue) on each input set's bordered buffers, made
    here once (conv2's from conv1's output), so the copies are out of the timing; the 1x1 shortcut through cuDNN."""
    import torch.nn.functional as F
    from sdkernels.kernels.conv3x3_padded import conv3x3_padded, gn_silu_bordered
    prepared = {}
    for x, _temb in sets:
        h = torch.empty((x.shape[0], block.conv1.out_channels, *x.shape[2:]), device=x.device, dtype=x.dtype,
                        memory_format=torch.channels_last)
        xp1 = gn_silu_bordered(x)
        conv3x3_padded(xp1, block.conv1.weight, None, None, None, 1.0, h)
        prepared[x.data_ptr()] = (xp1, h, gn_silu_bordered(h), torch.empty_like(h))

    def run(x, temb):
        xp1, h, xp2, out = prepared[x.data_ptr()]
        conv3x3_padded(xp1, block.conv1.weight, None, None, None, 1.0, h)
        conv3x3_padded(xp2, block.conv2.weight, None, None, None, 1.0, out)
        if block.conv_shortcut is not None:
            F.conv2d(x, block.conv_shortcut.weight)
        return out
    return run


def measure_case(case: Case, dtype, device, timing: dict) -> dict:
    """Check, then time, every provider on one case: {"ms": {provider: ms}, "error": {provider: relative error}}."""
    base = materialize(case, device, dtype)
    x, temb = make_inputs(case, dtype, device)
    up = torch.float64 if device == "cpu" else torch.float32
    with torch.no_grad():
        expected = copy.deepcopy(base).to(up)(x.to(up), None if temb is None else temb.to(up))
    blocks = {}
    for provider, ops in PROVIDERS.items():
        blocks[provider] = copy.deepcopy(base)
        if ops is not None:
            patch(blocks[provider], ops=ops)
    sets = [(x, temb)] + input_sets(lambda: make_inputs(case, dtype, device), x.numel() * x.element_size())[1:]
    ms, errors = {}, {}
    with torch.no_grad():
        for provider, block in blocks.items():
            with as_asked(provider):
                errors[provider] = relative_error(block(x, temb), expected)
        bound = MAX_ERROR_RATIO * errors["eager"] + 1e-4
        wrong = {p: e for p, e in errors.items() if not e <= bound}  # NaN is wrong too
        if wrong:
            raise Abort(f"{BENCH} {case.name} {dtype}: relative error vs {up} {wrong}, above {bound:.2e} "
                        f"(2x eager's {errors['eager']:.2e})")
        for provider, block in blocks.items():
            with as_asked(provider):
                ms[provider] = bench_rotating_ms(block, sets, **timing)
        ms[CONV_BOUND] = bench_rotating_ms(convolutions_only(base), sets, **timing)
        with as_asked("ours"):
            ms[OUR_CONVS] = bench_rotating_ms(convolutions_only(base, ours=True), sets, **timing)
        if device == "cuda":
            ms[OUR_KERNELS] = bench_rotating_ms(bordered_kernels_only(base, sets), sets, **timing)
    return {"ms": ms, "error": errors}


def add_rows(results: Results, case: Case, dtype, m: dict, copy_gbps) -> None:
    moved = traffic(case, dtype)
    extra = dict(models=list(case.calls), calls=case.calls, bytes=moved, rel_error=m["error"],
                 groups=case.block.norm1.num_groups, temb=case.temb_dim is not None,
                 shortcut="conv1x1" if case.block.conv_shortcut is not None else "identity")
    if copy_gbps:
        extra.update(floor_ms=moved["ours"] / copy_gbps / 1e6)
    for baseline in ("eager", "unfused", CONV_BOUND, OUR_CONVS, OUR_KERNELS):
        if baseline not in m["ms"]:
            continue
        results.add(BENCH, case.name, dtype, m["ms"]["ours"], baseline, m["ms"][baseline], bytes_moved=moved["ours"],
                    flops=flops(case), **extra)


def case_table(cases, measured, dtype, copy_gbps) -> str:
    us = lambda v: f"{1e3 * v:9.1f}"  # noqa: E731
    lines = [f"{'case':36s} {'calls':>5s} {'MB ours':>8s} {'MB eager':>8s} {'floor us':>9s} {'ours us':>9s} "
             f"{'eager us':>9s} {'unfus us':>9s} {'conv us':>9s} {'ourconv':>9s} {'kernels':>9s} {'x eager':>7s} "
             f"{'x unfus':>7s} "
             f"{'unf/conv':>8s} "
             f"{'TFLOP/s':>7s}"]
    for case in cases:
        ms, moved = measured[case.name]["ms"], traffic(case, dtype)
        floor = us(moved["ours"] / copy_gbps / 1e6) if copy_gbps else f"{'-':>9s}"
        lines.append(f"{case.name:36s} {sum(case.calls.values()):5d} {moved['ours'] / 1e6:8.2f} "
                     f"{moved['eager'] / 1e6:8.2f} {floor} {us(ms['ours'])} {us(ms['eager'])} {us(ms['unfused'])} "
                     f"{us(ms[CONV_BOUND])} {us(ms[OUR_CONVS])} "
                     f"{us(ms[OUR_KERNELS]) if OUR_KERNELS in ms else format('-', '>9s')} "
                     f"{ms['eager'] / ms['ours']:7.2f} "
                     f"{ms['unfused'] / ms['ours']:7.2f} "
                     f"{ms['unfused'] / ms[CONV_BOUND]:8.2f} "
                     f"{flops(case) / ms['ours'] / 1e9:7.1f}")
    return "\n".join(lines)


def summary(cases, measured) -> str:
    lines = []
    for baseline, target in TARGETS.items():
        ratios = [(c.name, measured[c.name]["ms"][baseline] / measured[c.name]["ms"]["ours"])
                  for c in cases if "sd15" in c.calls]
        if not ratios:
            continue
        missed = [n for n, r in ratios if r < target]
        verdict = "met at every shape" if not missed else f"MISSED at {len(missed)} of {len(ratios)}: " + \
            ", ".join(missed)
        lines.append(f"SD1.5 shapes, speedup vs {baseline}: min {min(r for _, r in ratios):.2f}x, median "
                     f"{statistics.median(r for _, r in ratios):.2f}x; target {target}x: {verdict}")
    ceilings = [(c.name, measured[c.name]["ms"]["unfused"] / measured[c.name]["ms"][CONV_BOUND])
                for c in cases if "sd15" in c.calls]
    if ceilings:
        under = [n for n, r in ceilings if r < TARGETS["unfused"]]
        lines.append(f"SD1.5 shapes, unfused / cuDNN's convolutions alone (the most a fusion can gain over unfused "
                     f"with cuDNN-speed convolutions): min {min(r for _, r in ceilings):.2f}x, median "
                     f"{statistics.median(r for _, r in ceilings):.2f}x; under {TARGETS['unfused']}x at "
                     f"{len(under)} of {len(ceilings)}" + (": " + ", ".join(under) if under else ""))
    sd15 = [measured[c.name]["ms"] for c in cases if "sd15" in c.calls]
    if sd15:
        speed = [m[CONV_BOUND] / m[OUR_CONVS] for m in sd15]
        cost = [1e3 * (m["ours"] - m[OUR_CONVS]) for m in sd15]
        lines.append(f"SD1.5 shapes, our convolutions (with their bordered input copies) against cuDNN's: "
                     f"{min(speed):.2f}x-{max(speed):.2f}x its speed (median {statistics.median(speed):.2f}x); the "
                     f"fused block less them (statistics, normalization, epilogues): median "
                     f"{statistics.median(cost):.1f} us")
    if sd15 and OUR_KERNELS in sd15[0]:
        speed = [m[CONV_BOUND] / m[OUR_KERNELS] for m in sd15]
        budget = [1e3 * (m["unfused"] / TARGETS["unfused"] - m[OUR_KERNELS]) for m in sd15]
        lines.append(f"SD1.5 shapes, our convolution kernels alone (bordered inputs made outside the timing) against "
                     f"cuDNN's: {min(speed):.2f}x-{max(speed):.2f}x its speed (median "
                     f"{statistics.median(speed):.2f}x); left at {TARGETS['unfused']}x unfused for everything else "
                     f"(unfused / {TARGETS['unfused']} less them): {min(budget):.1f} to {max(budget):.1f} us, median "
                     f"{statistics.median(budget):.1f}; the fused block spends "
                     f"{statistics.median(1e3 * (m['ours'] - m[OUR_KERNELS]) for m in sd15):.1f} (median)")
    for model in dict.fromkeys(m for c in cases for m in c.calls):
        per_forward = {p: sum(c.calls[model] * measured[c.name]["ms"][p] for c in cases if model in c.calls)
                       for p in PROVIDERS}
        lines.append(f"{model}: ResNet blocks per forward: " + ", ".join(f"{p} {v:.3f} ms"
                                                                         for p, v in per_forward.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = bench_parser(__doc__, BENCH)
    add_models_option(p, "sd15,vae512", WORKLOADS)
    args = p.parse_args(argv)
    models, dtype, t_start = args.models, DTYPES[args.dtype], time.perf_counter()
    torch.manual_seed(0)

    if on_gpu():
        device = "cuda"
        cases, left = collect_cases(models)
        timing = gpu_timing(args)
        copy_gbps = copy_bandwidth_gbps()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s; {len(cases)} blocks "
              f"({', '.join(models)}), {dtype}, channels_last")
    else:
        device, timing, copy_gbps, left = "cpu", {}, None, {}
        cases = smoke_cases()
        print(f"no GPU: correctness smoke run of {len(cases)} tiny blocks in Triton's interpreter; times are not "
              "speed")
    for reason, n in left.items():
        print(f"left to the unfused path (not timed): {n} calls, {reason}")

    measured = measure_cases(cases, lambda case: measure_case(case, dtype, device, timing))
    if measured is None:
        return 2

    results = Results(BENCH)
    results.meta.update(timing=timing_note(args.graph), left_unfused=left)
    for case in cases:
        add_rows(results, case, dtype, measured[case.name], copy_gbps)
    verdict = summary(cases, measured) if on_gpu() else \
        "no GPU: every provider matched the reference; the times above are the interpreter's, not speed"
    print("\n\n".join([results.table(), case_table(cases, measured, dtype, copy_gbps), verdict]))
    out = results_path(args.out, BENCH)
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
