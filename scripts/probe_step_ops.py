"""Probe (GPU): which PyTorch ops, at which input shapes, launch the kernels whose names match a pattern in a patched
UNet step:

    python scripts/probe_step_ops.py --model sd15 --kernel "elementwise_kernel<128, 4"
"""
import argparse
import contextlib
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sdkernels import models, step_choice, tuning
from sdkernels.patch import patch


def patched_step_profile(model_name: str, steps: int, objective=None):
    """torch.profiler's record (CPU ops with their input shapes, and their kernels) of ``steps`` steps of the
    patched model, after three warm-up steps: the patched modules' ops, not the originals the step choice may
    pick; ``objective`` (sdkernels.tuning's, e.g. "device": the choices a CUDA-graph replay gets) or the default."""
    spec = models.spec(model_name)
    with torch.device("cuda"):
        model = models.build(model_name, init="unit", dtype=torch.float16)
    model = model.to(memory_format=torch.channels_last)
    call_args, call_kwargs = models.model_inputs(model, spec.batch, spec.resolution)
    patch(model)
    step_choice.uninstall(model)

    def step():
        with torch.no_grad():
            return models.model_call(model, call_args, call_kwargs)

    with tuning.optimizing_for(objective) if objective else contextlib.nullcontext():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    return prof


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15", choices=list(models.MODELS))
    p.add_argument("--kernel", default="elementwise_kernel<128, 4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--regex", action="store_true", help="--kernel is a regular expression, not a substring")
    args = p.parse_args()
    prof = patched_step_profile(args.model, args.steps)
    pattern = re.compile(args.kernel if args.regex else re.escape(args.kernel))
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        for kernel in getattr(event, "kernels", ()) or ():
            if pattern.search(kernel.name):
                key = (event.name, kernel.name[:60], str(event.input_shapes)[:120])
                totals[key] += kernel.duration / args.steps
                counts[key] += 1
    print(f"kernels matching {args.kernel!r}: {sum(totals.values()):.1f} us per step")
    for key, us in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{us:8.1f} us {counts[key] // args.steps:4d}x  {key[0]}  {key[1]}  {key[2]}")


if __name__ == "__main__":
    main()
