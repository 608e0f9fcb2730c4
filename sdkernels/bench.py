"""python -m sdkernels.bench: one UNet step or VAE decode, eager PyTorch against sdkernels, side by side in one run.

    python -m sdkernels.bench --model sd15 --batch 2 --resolution 512 [--compile] [--out r.json] [--plot r.png]
    sdkernels-bench --model vae --resolution 1024           # the same, installed as a console command
    python -m sdkernels.bench --model tiny-unet             # no GPU: a tiny config in Triton's interpreter
    python -m sdkernels.bench --model sd15 --pipeline       # a 20-step DDIM loop with classifier-free guidance

Variants, all on one model (random weights from sdkernels.models, or --model-path) and one set of inputs; the model
is patched in place after the eager variants and unpatched at the end (a UNet's eager twin aside, below):
  eager             the diffusers model as it is
  eager_graph       the same, captured into one CUDA graph and replayed
  compile           torch.compile(mode="reduce-overhead") of the eager model (--compile), with its compile time
  sdkernels         after sdkernels.patch(model)
  sdkernels_flat    after sdkernels.patch(model, flat=True) (--flat; a UNet: its forward as one dynamo-traced graph
                    per signature, op calls replayed, no CUDA graphs); its setup includes the trace
  sdkernels_graph   after sdkernels.patch(model, cuda_graph=True): its graph per input signature, each call
                    with the wrapper's checks, input copies and output clone (what a pipeline gets)
Each is timed (median ms of do_bench: CUDA events after a warm-up) and given its it/s, speedup over eager, peak
memory (max_memory_allocated above the weights and inputs; it includes a graph's pool) and the error of its output
against eager's in the same dtype: max |out - eager| / max |eager| ("max rel err"), and the norm ratio. A patched
output beyond MAX_REL_ERR fails the run (exit 1, after the results are written). "setup s" is the time from the
model as it stood to the first output: patching, capture or compilation, and the first call with its kernel
compiles. One UNet step is unet(sample, t, encoder_hidden_states[, added_cond_kwargs]).sample; a VAE step is
vae.decode(latents).sample.

A UNet step without CUDA graphs is host-bound (its Python and launches outlast its GPU work), and a shared host's
speed drifts by tens of percent within minutes, which variants timed one after the other read as a difference
between them. So on a GPU the UNet's no-graph variants (sdkernels, sdkernels_flat) are also timed against an
unpatched copy of the model in alternating blocks of consecutive steps (benchmarking.paired_ms, wall time): their
rows against eager and the table's "vs eager" take those paired times ("paired" in the row); --no-paired skips the
copy (one set of weights held) and the pairing.

With --pipeline each variant runs a whole denoising loop instead (sdkernels.pipelines.denoise, diffusers' text-to-
image loop: --steps UNet calls, default 20, each on both halves of classifier-free guidance, and the --scheduler's
steps, default DDIM); text encoding and VAE decode are left out (random text states stand in for the encoder's).
Its ms are those of the whole loop, its it/s denoising steps per second (what diffusers' progress bar shows), its
errors those of the final latents; eager_graph is then the unpatched UNet through the per-call CUDA graphs of
sdkernels.graphs (what cuda_graph=True installs), since the scheduler's host-side state keeps a whole loop out of
one graph. --batch counts the UNet's batch, both halves: 2 (the default) is one image.

Results JSON (sdkernels.benchmarking's format): one row per (ours, baseline) with ours sdkernels or
sdkernels_graph and baseline eager, eager_graph or compile; bench "unet_step", "vae_decode" or "pipeline", case
"model=sd15,B=2,res=512" (a pipeline's with ",steps=20,scheduler=ddim").

Without a GPU it is a correctness smoke run: the Triton kernels run in Triton's interpreter (a tiny model is the
one to pick), CUDA graphs and torch.compile are skipped, and the times mean nothing.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import math
import os
import sys
import time
import traceback
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (our kernels import it)

from . import graphs, models, pipelines, step_choice  # noqa: E402
from .benchmarking import DTYPES, Results, as_cuda_graph, bench_ms, machine, on_gpu, paired_ms  # noqa: E402
from .patch import patch, patchers, summary, unpatch  # noqa: E402
from .testing import relative_error  # noqa: E402

BASELINES = ("eager", "eager_graph", "compile")
OURS = ("sdkernels", "sdkernels_flat", "sdkernels_graph")
# A patched output further than this from eager's (max |ours - eager| / max |eager|) fails the run. fp16: about ten
# times the spread of eager's own SD1.5 output over cuDNN's algorithm choices (1.5e-3); fp32 leaves room for TF32.
MAX_REL_ERR = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}
PIPELINE_STEPS = 20
# by --quick; each variant's first call, which measure() makes, is the CPU's warm-up
TIMING = {False: dict(warmup_ms=250, rep_ms=2000, cpu_calls=3, cpu_warmup=False),
          True: dict(warmup_ms=100, rep_ms=500, cpu_calls=1, cpu_warmup=False)}
# by --quick, then by whether a call is a whole loop (--pipeline): paired_ms's rounds and block of consecutive calls
PAIRING = {False: (dict(rounds=12, block=5), dict(rounds=6, block=1)),
           True: (dict(rounds=6, block=5), dict(rounds=4, block=1))}
PAIRED = ("sdkernels", "sdkernels_flat")  # host-bound: timed against the eager twin in alternation as well


@dataclasses.dataclass(frozen=True)
class Case:
    model: str          # a name in sdkernels.models.MODELS
    batch: int
    resolution: int     # image size in pixels
    compile: bool = False
    steps: int = 0      # > 0: a denoising loop of this many steps (--pipeline), not one call
    scheduler: str = "ddim"

    @property
    def bench(self) -> str:
        if self.steps:
            return "pipeline"
        return "vae_decode" if models.spec(self.model).kind == "vae" else "unet_step"

    @property
    def name(self) -> str:
        loop = f",steps={self.steps},scheduler={self.scheduler}" if self.steps else ""
        return f"model={self.model},B={self.batch},res={self.resolution}{loop}"

    @property
    def steps_per_call(self) -> int:
        return self.steps or 1


@dataclasses.dataclass
class Measurement:
    variant: str
    ms: float
    setup_s: float
    peak_mib: Optional[float] = None     # GPU only
    max_rel_err: Optional[float] = None  # None where eager's own output is not finite: nothing to compare with
    rel_err: Optional[float] = None
    paired: Optional[dict] = None        # benchmarking.paired_ms against the eager twin (PAIRED variants, GPU)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdkernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15", choices=list(models.MODELS),
                   help="sd15/sd21/sdxl: a UNet step; vae: a VAE decode; tiny-*: tiny configs for the CPU")
    p.add_argument("--batch", type=positive_int, help="default: 2 for a UNet (classifier-free guidance), 1 for a VAE")
    p.add_argument("--resolution", type=positive_int,
                   help="image size in pixels (default: the model's own: 512 sd15 and vae, 768 sd21, 1024 sdxl)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--compile", action="store_true",
                   help='also time torch.compile(mode="reduce-overhead") of the eager model (minutes to compile)')
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph variants")
    p.add_argument("--flat", action="store_true",
                   help="also sdkernels.patch(model, flat=True): a UNet's steps as flat graphs without CUDA graphs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="model and inputs channels_last (default), as fast SD pipelines run them; every variant "
                        "runs the same layout")
    p.add_argument("--init", choices=models.INITS, default="unit",
                   help="random weights: diffusers' init rescaled to unit gain per layer (default), or as it is")
    p.add_argument("--model-path", help="a local diffusers pipeline folder (its unet/ or vae/) or model folder, "
                                        "loaded instead of random weights; nothing is downloaded")
    p.add_argument("--ops", help="comma-separated sdkernels patchers to apply (default: sdkernels.default_ops())")
    p.add_argument("--low-memory", action="store_true",
                   help="patch with low_memory=True (large activations in bands of rows: lower peak, some speed)")
    p.add_argument("--out", help="results JSON (default sdkernels-bench-<model>.json here)")
    p.add_argument("--plot", help="bar chart PNG (default: the --out path with .png; needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="shorter timing")
    p.add_argument("--no-paired", action="store_true",
                   help="time a UNet's no-graph variants only one after the other, not also in alternation with an "
                        "unpatched copy (which holds a second copy of the weights)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every variant (cuDNN times its convolution "
                        "algorithms per shape instead of taking its heuristic's pick)")
    p.add_argument("--pipeline", action="store_true",
                   help="time a whole denoising loop (UNet and scheduler, classifier-free guidance), not one step")
    p.add_argument("--steps", type=positive_int, help=f"--pipeline: denoising steps (default {PIPELINE_STEPS})")
    p.add_argument("--scheduler", choices=list(pipelines.SCHEDULERS), help="--pipeline: the scheduler (default ddim)")
    return p


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A text progress bar, e.g. "[########------------] 2/5": a case's variants can take minutes each."""
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    spec = models.spec(args.model)
    case = Case(args.model, args.batch or spec.batch, args.resolution or spec.resolution, args.compile)
    if args.pipeline:
        case = dataclasses.replace(case, batch=args.batch or 2, steps=args.steps or PIPELINE_STEPS,
                                   scheduler=args.scheduler or "ddim")
    try:
        check_options(args)
        check_resolution(case, args.model_path)
    except ValueError as e:
        p.error(str(e))
    out = args.out or f"sdkernels-bench-{args.model}.json"
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return run_and_report([case], args, out, args.plot)


def check_options(args) -> None:
    """ValueError naming what is wrong with the options that apply to every case."""
    if args.ops is not None:
        known = [q.name for q in patchers()]
        unknown = [name for name in _ops(args) if name not in known]
        if unknown or not _ops(args):
            raise ValueError(f"--ops: {f'unknown patchers {unknown}' if unknown else 'no patcher named'}; "
                             f"known: {', '.join(known)}")
    if args.model_path is not None:
        models.weights_subfolder(args.model_path, models.spec(args.model).kind)
    if not args.pipeline and (args.steps or args.scheduler):
        raise ValueError("--steps and --scheduler go with --pipeline")
    if args.pipeline and models.spec(args.model).kind != "unet":
        raise ValueError(f"--pipeline runs a UNet's denoising loop; {args.model} is a VAE")
    if args.pipeline and (args.batch or 2) % 2:
        raise ValueError(f"--batch {args.batch}: --pipeline runs classifier-free guidance, whose UNet batch holds "
                         "both halves, so it must be even")


def check_resolution(case: Case, model_path: Optional[str] = None) -> None:
    step = models.pixels_per_latent(case.model, model_path)
    if case.resolution % step:
        raise ValueError(f"--resolution {case.resolution}: must be a multiple of {step} for {case.model} "
                         f"(one latent covers {step}x{step} pixels)")


def run_and_report(cases: list, args, out: str, plot: Optional[str] = None) -> int:
    """Run the cases, print their tables, write the results JSON (and the chart); 1 if a patched output is wrong."""
    t_start = time.perf_counter()
    results, runs, failures = run(cases, args)
    print(f"wrote {results.write(out)} in {time.perf_counter() - t_start:.0f} s")
    write_plot(runs, plot or os.path.splitext(out)[0] + ".png")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def run(cases: list, args) -> tuple:
    """(Results, [(case, [Measurement])], [failure messages]) of every case."""
    dtype = DTYPES[args.dtype or ("fp16" if on_gpu() else "fp32")]
    results = Results("sdkernels_bench")
    results.meta.update(
        timing=(f"median of do_bench (CUDA events), {'quick' if args.quick else 'full'} timing" if on_gpu()
                else "wall-clock median on the CPU, Triton interpreter: not speed"),
        weights=args.model_path or f"random, init={args.init}",
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        layout="channels_last" if args.channels_last else "contiguous (NCHW)",
        errors="max |out - eager| / max |eager| and ||out - eager|| / ||eager||, outputs in the run's dtype",
        patched={})
    if args.low_memory:
        results.meta["low_memory"] = "sdkernels variants patched with low_memory=True (sdkernels.banded)"
    if any(case.steps for case in cases):
        results.meta["pipeline"] = ("ms of the whole denoising loop (UNet with classifier-free guidance and scheduler "
                                    "steps; no text encoding, no VAE decode), its = steps per second, errors of the "
                                    "final latents")
    if not on_gpu():
        print("no GPU: correctness smoke run in the Triton interpreter; CUDA graphs and torch.compile skipped, "
              "timings are not speed")
    runs, failures = [], []
    for i, case in enumerate(cases, 1):
        label = f"[{i}/{len(cases)}] {case.bench} {case.name} {str(dtype).replace('torch.', '')}"
        measured, patched, raised = run_case(case, args, dtype, label)
        results.meta["patched"][f"{case.bench} {case.name}"] = (
            {"replaced": patched.replaced, "summary": str(patched)} if patched else {"replaced": {}, "summary": None})
        add_rows(results, case, dtype, measured)
        runs.append((case, measured))
        print(table(label, measured, case.steps_per_call))
        failures += [f"{case.name}: {m.variant} output differs from eager's by {m.max_rel_err:.3g} (max rel err; "
                     f"limit {MAX_REL_ERR[dtype]:g} for {dtype})" for m in measured
                     if m.variant in OURS and m.max_rel_err is not None and not m.max_rel_err <= MAX_REL_ERR[dtype]]
        failures += [f"{case.name}: {variant} raised {error}" for variant, error in raised if variant in OURS]
        for variant, error in raised:
            if variant not in OURS:
                print(f"{label}: baseline {variant} left out: it raised {error}")
    return results, runs, failures


def run_case(case: Case, args, dtype: torch.dtype, label: str) -> tuple:
    """([Measurement] of each variant in order, the PatchSummary (None if patching raised), [(variant, error)] of
    the variants that raised) of one case. A variant that raises is left out (its traceback printed) and the others
    still run: a failed capture or compile costs its rows, not the run. Eager raising ends the case: there is
    nothing to compare the others with."""
    device = "cuda" if on_gpu() else "cpu"
    torch.manual_seed(0)
    if not on_gpu() and not case.model.startswith("tiny"):
        print(f"{label}: no GPU: the Triton interpreter takes hours on a full-size model; tiny-unet and tiny-vae are "
              "the CPU smoke runs")
    print(f"{label}: building the model", flush=True)
    with torch.device(device if args.model_path is None else "cpu"):  # random init is fast on the GPU
        model = models.build(case.model, init=args.init, path=args.model_path, dtype=dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    call_args, call_kwargs = models.model_inputs(model, case.batch, case.resolution)
    call_args = [_as_layout(x, memory_format) for x in call_args]
    call_kwargs = {k: _as_layout(v, memory_format) for k, v in call_kwargs.items()}
    run_with = _runner(case, call_args, call_kwargs)
    step = functools.partial(run_with, models.entry(model))
    twin_step = None  # the unpatched twin's step, timed in alternation with the host-bound variants
    if on_gpu() and models.spec(case.model).kind == "unet" and not args.no_paired:
        twin_step = functools.partial(run_with, models.entry(copy.deepcopy(model)))

    def patched(cuda_graph=False, flat=False):
        graphs.uninstall(model)  # the pipeline's eager_graph leaves its graphs on the unpatched model
        patch(model, ops=_ops(args), cuda_graph=cuda_graph, low_memory=args.low_memory,
              channels_last=args.channels_last, flat=flat)  # every variant in the run's one layout
        print(f"{label}: {summary(model)}", flush=True)
        if flat:
            step()  # a flat model's first call runs eagerly; measure's first call traces (its setup time)
        return step

    with_graphs = on_gpu() and not args.no_graph
    plan = [("eager", lambda: step)]  # (variant, make): make() prepares the model and returns the step to time
    if with_graphs:
        plan.append(("eager_graph", lambda: _eager_graphed(case, model, step)))
    if case.compile and on_gpu():
        plan.append(("compile", lambda: functools.partial(run_with, _compiled(model))))
    elif case.compile:
        print(f"{label}: torch.compile skipped: reduce-overhead mode is a CUDA-graph baseline, and there is no GPU")
    plan.append(("sdkernels", patched))
    if args.flat and models.spec(case.model).kind != "vae":
        plan.append(("sdkernels_flat", lambda: patched(flat=True)))
    elif args.flat:
        print(f"{label}: --flat skipped: flat graphs are for UNets (a VAE decode is GPU-bound)")
    if with_graphs:
        plan.append(("sdkernels_graph", lambda: patched(cuda_graph=True)))

    measured, raised, reference = [], [], None
    timing = TIMING[args.quick]
    try:
        with torch.no_grad():
            for done, (variant, make) in enumerate(plan):
                print(f"{label}: {progress_bar(done, len(plan))} {variant} ...", flush=True)
                try:
                    pairing = ((twin_step, PAIRING[args.quick][bool(case.steps)])
                               if variant in PAIRED and twin_step is not None else None)
                    m, out = measure(variant, make, reference, timing, pairing)
                    _require_graphs(variant, model)
                except Exception as e:
                    if reference is None:
                        raise
                    traceback.print_exc()
                    raised.append((variant, f"{type(e).__name__}: {e}"))
                    continue
                finally:
                    if variant == "compile":
                        torch._dynamo.reset()  # drops the compiled graphs and their CUDA-graph pool
                reference = out if reference is None else reference
                measured.append(m)
                print(f"{label}: {variant}: {m.ms:.3f} ms, setup {m.setup_s:.1f} s", flush=True)
                choice = step_choice.installed(model)
                if variant == "sdkernels" and choice is not None:  # which modules its steps ran, per signature
                    print(f"{label}: step choice (patched or original modules): "
                          f"{sorted(set(choice.choices.choices.values())) or 'not measured'}", flush=True)
        patched_summary = summary(model)
        if on_gpu() and measured and measured[0].variant == "eager" and len(measured) > 1:
            # Variants run one after another; a shared host's speed drifts within minutes, which moves launch-bound
            # (host-bound) rows: eager timed again at the end shows by how much (scripts/host_profile_step.py
            # --each times patched and eager steps in alternation instead)
            unpatch(model)
            again = bench_ms(step, **timing)
            print(f"{label}: eager again at the end: {again:.3f} ms (first {measured[0].ms:.3f} ms, "
                  f"{again / measured[0].ms:.2f}x): the host's drift over the run", flush=True)
        return measured, patched_summary, raised
    finally:
        unpatch(model)


def _require_graphs(variant: str, model) -> None:
    """A graph variant whose calls ran eagerly (a failed capture falls back with a warning) timed something else
    than its name says: raise, so that it is reported as failed, not as a row."""
    call = graphs.graphed(model)
    if variant.endswith("_graph") and call is not None and call.warned:
        raise RuntimeError(f"{variant} ran without CUDA graphs: {'; '.join(sorted(call.warned))}")


def _runner(case: Case, call_args: list, call_kwargs: dict):
    """run(entry) -> the output one timed call computes, ``entry`` standing for the model (itself, its decode, a
    compiled version): one step's output, or for a pipeline case the final latents of its denoising loop."""
    if not case.steps:
        return lambda entry: entry(*call_args, **call_kwargs).sample
    scheduler = pipelines.make_scheduler(case.scheduler)
    latents, states, added = pipelines.loop_inputs(call_kwargs, images=case.batch // 2)
    return lambda entry: pipelines.denoise(entry, scheduler, latents, states, case.steps, added_cond_kwargs=added)


def _eager_graphed(case: Case, model, step):
    """The eager model in CUDA graphs: one step captured whole; a loop's UNet calls through sdkernels' per-call
    graphs with no op replaced (the scheduler's host-side state keeps the loop itself out of a graph)."""
    if not case.steps:
        return as_cuda_graph(step)
    graphs.install(model, "eager")
    return step


def measure(variant: str, make, reference, timing: dict, pairing: Optional[tuple] = None) -> tuple:
    """(Measurement, first output). make() returns the step function (capturing or compiling on the way); its first
    call's output is compared with the reference (eager's; None: this is eager), then the step is timed, and with
    ``pairing`` ((the eager twin's step, paired_ms's arguments)) also timed in alternation with the twin."""
    base = _memory_start()
    start = time.perf_counter()
    fn = make()
    out = fn()
    if on_gpu():
        torch.cuda.synchronize()
    m = Measurement(variant, math.nan, time.perf_counter() - start)
    # Compared now: the next call may rewrite it (a CUDA graph's static output, reduce-overhead's pool).
    m.max_rel_err, m.rel_err = output_errors(out, out if reference is None else reference)
    if on_gpu():  # the peak of a warm call: the first one's autotuning and compiling are setup, not the step's
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        m.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    if reference is not None:
        out = None  # a graph's static output: the timing replays rewrite it
    m.ms = bench_ms(fn, **timing)
    if pairing is not None:
        m.paired = paired_ms(pairing[0], fn, **pairing[1])
    return m, out


def output_errors(out: torch.Tensor, reference: torch.Tensor) -> tuple:
    """(max |out - ref| / max |ref|, ||out - ref|| / ||ref||); (None, None) where ref is not finite."""
    if not torch.isfinite(reference).all():
        return None, None
    ref = reference.double()
    worst = (out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
    return worst.item(), relative_error(out, reference)


def add_rows(results: Results, case: Case, dtype: torch.dtype, measured: list) -> None:
    by_name = {m.variant: m for m in measured}
    for ours in (by_name[v] for v in OURS if v in by_name):
        for base in (by_name[v] for v in BASELINES if v in by_name):
            ours_ms, base_ms, extra = ours.ms, base.ms, {}
            if base.variant == "eager" and ours.paired:  # the pair's times, not those of runs minutes apart
                ours_ms, base_ms = ours.paired["wall"], ours.paired["baseline_wall"]
                extra = dict(paired=True, timing="median wall ms per step, alternating blocks of steps with an "
                                                 "unpatched copy (benchmarking.paired_ms)")
            results.add(case.bench, case.name, dtype, ours_ms, base.variant, base_ms, ours=ours.variant,
                        its=case.steps_per_call * 1e3 / ours_ms, baseline_its=case.steps_per_call * 1e3 / base_ms,
                        peak_mib=ours.peak_mib, baseline_peak_mib=base.peak_mib, max_rel_err=_number(ours.max_rel_err),
                        baseline_max_rel_err=_number(base.max_rel_err), rel_err=_number(ours.rel_err),
                        setup_s=ours.setup_s, baseline_setup_s=base.setup_s, **extra)


def speedup_label(m: Measurement, eager: Measurement) -> str:
    """m's speedup over eager: paired ("*") where m was timed in alternation with the eager twin."""
    if m.paired:
        return f"{m.paired['baseline_wall'] / m.paired['wall']:.2f}x*"
    return f"{eager.ms / m.ms:.2f}x "


def table(label: str, measured: list, steps_per_call: int = 1) -> str:
    lines = [label, f"  {'variant':16s} {'ms':>10s} {'it/s':>9s} {'vs eager':>8s} {'peak MiB':>9s} "
                    f"{'max rel err':>11s} {'setup s':>8s}"]
    for m in measured:
        peak = f"{m.peak_mib:9.0f}" if m.peak_mib is not None else f"{'-':>9s}"
        err = f"{m.max_rel_err:11.2e}" if m.max_rel_err is not None else f"{'-':>11s}"
        its = steps_per_call * 1e3 / m.ms
        lines.append(f"  {m.variant:16s} {m.ms:10.3f} {its:9.2f} {speedup_label(m, measured[0]):>9s}{peak} {err} "
                     f"{m.setup_s:8.1f}")
    lines += [f"  * {m.variant} paired with an unpatched copy in alternating blocks: eager "
              f"{m.paired['baseline_wall']:.3f} ms, {m.variant} {m.paired['wall']:.3f} ms a step (wall)"
              for m in measured if m.paired]
    return "\n".join(lines)


def write_plot(runs: list, path: str) -> Optional[str]:
    """A bar chart of each case's variants (ms, speedup over eager on each bar); skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib to get {path})")
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 4.2), squeeze=False)
    for ax, (case, measured) in zip(axes[0], runs):
        bars = ax.bar([m.variant for m in measured], [m.ms for m in measured],
                      color=["tab:orange" if m.variant in OURS else "tab:gray" for m in measured])
        for bar, m in zip(bars, measured):
            ax.annotate(speedup_label(m, measured[0]).strip(), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{case.bench} {case.name}", fontsize=9)
        ax.set_ylabel("ms per call" + ("; *: speedup paired with eager" if any(m.paired for m in measured) else ""))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    gpu = machine()["gpu"]
    fig.suptitle(f"sdkernels vs eager on {gpu}" if gpu else "CPU, Triton interpreter: times are not speed")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _compiled(model):
    """torch.compile(mode="reduce-overhead") of what one step calls, called like it."""
    compiled = torch.compile(models.entry(model), mode="reduce-overhead")

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: its outputs may be overwritten
        return compiled(*args, **kwargs)
    return call


def _memory_start() -> int:
    if not on_gpu():
        return 0
    gc.collect()  # the last variant's CUDA graphs (and their pools) sit in reference cycles: free them now, not later
    torch.cuda.synchronize()
    # cuBLAS keeps a workspace per stream in the caching allocator, freed only when something clears them all (CUDA
    # graph trees do): a workspace another variant's side streams left would count against the next one's base.
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _as_layout(x, memory_format):
    return x.contiguous(memory_format=memory_format) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _ops(args) -> Optional[list]:
    return None if args.ops is None else [name.strip() for name in args.ops.split(",") if name.strip()]


def _number(x: Optional[float]) -> Optional[float]:
    """x for JSON: None where it is missing or not finite (JSON has no NaN)."""
    return x if x is not None and math.isfinite(x) else None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


if __name__ == "__main__":
    sys.exit(main())
