"""Probe (GPU): the conv3x3 patcher in a whole model, with and without it in one process:

    python scripts/probe_conv3x3_patch.py --model vae --resolution 1024

For each variant (every default patcher; with conv3x3 too; with conv3x3 forced to its triton_tma backend where
that takes the shape; the first again, for the drift): CUDA-graph replay time (median of CUDA events, sdkernels.tuning.cuda_event_ms),
the steady-state peak of one call (max_memory_allocated after the warm-up and tuning, reset before the call), and
the first call's peak (tuning included); then which backend the measured dispatch chose per conv3x3 shape, with
the times it measured."""
import argparse
import contextlib

import torch

from sdkernels import dispatch, models, patch, step_choice, tuning, unpatch
from sdkernels.benchmarking import as_cuda_graph
from sdkernels.patch import default_ops
from sdkernels.tuning import cuda_event_ms


def call_of(model, spec, resolution):
    args, kwargs = models.model_inputs(model, spec.batch, resolution)
    args = [a.to(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
            for a in args]
    return lambda: models.model_call(model, args, kwargs)


def mib(nbytes):
    return nbytes / 2**20


def measure(model, call, label):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        call()  # the first call: compiles and tuning
    torch.cuda.synchronize()
    first_peak = mib(torch.cuda.max_memory_allocated() - base)
    retained = mib(torch.cuda.memory_allocated() - base)  # what the first call left allocated (caches)
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
    steady_peak = mib(torch.cuda.max_memory_allocated() - base)
    del out
    with torch.no_grad():
        replay = as_cuda_graph(call)
    graph_ms = cuda_event_ms(replay)
    print(f"{label:>16}: graph {graph_ms:8.3f} ms, steady peak {steady_peak:7.0f} MiB, "
          f"first-call peak {first_peak:7.0f} MiB, retained after it {retained:6.0f} MiB", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vae", choices=list(models.MODELS))
    p.add_argument("--resolution", type=int)
    args = p.parse_args()
    spec = models.spec(args.model)
    with torch.device("cuda"):
        model = models.build(args.model, init="unit", dtype=torch.float16)
    model = model.to(memory_format=torch.channels_last).eval()
    call = call_of(model, spec, args.resolution or spec.resolution)
    without = [name for name in default_ops() if name != "conv3x3"]
    variants = (("without conv3x3", without, None), ("with conv3x3", without + ["conv3x3"], None),
                ("forced tma", without + ["conv3x3"], "triton_tma"), ("without again", without, None))
    for label, ops, forced in variants:
        patch(model, ops=ops, cuda_graph=False)
        step_choice.uninstall(model)
        force = dispatch.use_backend(forced, op="conv3x3") if forced else contextlib.nullcontext()
        with tuning.optimizing_for("device"), force:
            measure(model, call, label)
        unpatch(model)
    chooser = dispatch.ops()["conv3x3"].chooser
    for key, times in getattr(chooser, "timings", {}).items():
        shapes = f"x {key[1][1]} strides {key[1][2]} weight {key[2][1]} strides {key[2][2]} {key[3:]}"
        ranked = ", ".join(f"{name} {ms * 1e3:.0f} us" for name, ms in sorted(times.items(), key=lambda kv: kv[1]))
        print(f"  conv3x3 {key[0]} {shapes}: {ranked}")


if __name__ == "__main__":
    main()
