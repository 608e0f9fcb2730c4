"""Probe (issue 5 without graphs): a UNet step's host time with ``patch(unet, flat=True)`` (sdkernels.flat: the
forward traced once by dynamo into one graph that runs eagerly, sdkernels' ops called directly), paired against
eager as host_profile_step --each does, next to eager flattened the same way (sdkernels.flat's backend on the
unpatched model) and the patched model unflattened, all without the step choice but the last row (patch(flat=True) as
it is: the step choice weighs the flat patched step against the flat original modules), and the flat patched step
with its op calls' replays off (sdkernels.replay, SDKERNELS_REPLAY=0); then each flat step's Python calls and its
functions by own time.
    python scripts/probe_flat_step.py [--model sd15] [--batch 2] [--resolution 512] [--rows 25] [--block 5]
        [--variants "a;b"]"""
import argparse
import copy
import cProfile
import os
import pstats
import time

import torch

import sdkernels
from sdkernels import flat, models, step_choice
from sdkernels.benchmarking import paired_ms


def timed_first_calls(step) -> float:
    """Seconds of a model's first two calls (flat: eager, then trace and run)."""
    start = time.perf_counter()
    out = [step() for _ in range(2)][-1]
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


VARIANTS = ("eager, flat", "patched", "patched, flat", "patched, flat, no replay", "as patched, flat")


def without_replay(step):
    """step with sdkernels.replay off (its recorded op calls run their implementations)."""
    def run():
        os.environ["SDKERNELS_REPLAY"] = "0"
        try:
            return step()
        finally:
            del os.environ["SDKERNELS_REPLAY"]
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--block", type=int, default=5, help="consecutive steps of each way between switches")
    p.add_argument("--variants", default=";".join(VARIANTS), help="separated by ;, of: " + "; ".join(VARIANTS))
    args = p.parse_args()
    wanted = args.variants.split(";")
    with torch.device("cuda"):
        model = models.build(args.model, init="unit", dtype=torch.float16)
    model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, args.batch, args.resolution)
    stepper = lambda m: (lambda: models.model_call(m, call_args, call_kwargs))  # noqa: E731
    eager_step = stepper(model)
    rows = {}
    with torch.no_grad():
        eager_out = eager_step()
        if "eager, flat" in wanted:
            flat_eager = torch.compile(copy.deepcopy(model), backend=flat.flat_backend)
            rows["eager, flat"] = (stepper(flat_eager), *timed_first_calls(stepper(flat_eager)), eager_out)
        patched = sdkernels.patch(copy.deepcopy(model))
        step_choice.uninstall(patched)
        rows["patched"] = (stepper(patched), *timed_first_calls(stepper(patched)), eager_out)
        for label, wrap in (("patched, flat", lambda step: step), ("patched, flat, no replay", without_replay)):
            if label in wanted:
                flat_patched = sdkernels.patch(copy.deepcopy(model), flat=True)
                step_choice.uninstall(flat_patched)
                step = wrap(stepper(flat_patched))
                rows[label] = (step, *timed_first_calls(step), rows["patched"][2])
        as_patched = None
        if "as patched, flat" in wanted:
            as_patched = sdkernels.patch(copy.deepcopy(model), flat=True)  # the step choice weighs two flat steps
            rows["as patched, flat"] = (stepper(as_patched), *timed_first_calls(stepper(as_patched)), eager_out)
        if "patched" not in wanted:
            del rows["patched"]
        print(f"{args.model} B={args.batch} {args.resolution} px on {torch.cuda.get_device_name()}, torch "
              f"{torch.__version__}: ms per step (medians of alternating runs against eager); first two calls s; "
              "max |diff| against eager (patched, flat: against patched)")
        for label, (step, first_s, out, ref) in rows.items():
            r = paired_ms(eager_step, step, block=args.block)
            diff = (out.float() - ref.float()).abs().max().item()
            print(f"  {label:24s} CPU eager {r['baseline_cpu']:7.2f} this {r['cpu']:7.2f} ({r['cpu_ratio']:.3f}x)"
                  f"   wall eager {r['baseline_wall']:7.2f} this {r['wall']:7.2f} ({r['wall_ratio']:.3f}x)"
                  f"   first calls {first_s:5.1f} s   diff {diff:.3g}", flush=True)
        for label in [v for v in ("eager, flat", "patched, flat") if v in rows]:
            profiler = cProfile.Profile()
            profiler.runcall(rows[label][0])
            torch.cuda.synchronize()
            stats = pstats.Stats(profiler)
            print(f"\n== {label}: {sum(r[1] for r in stats.stats.values())} Python calls a step, by own time")
            stats.sort_stats("tottime").print_stats(args.rows)
        choice = step_choice.installed(as_patched) if as_patched is not None else None
        print(f"\n== as patched, flat: the step choice's timings {choice.choices.timings if choice else None}")


if __name__ == "__main__":
    main()
