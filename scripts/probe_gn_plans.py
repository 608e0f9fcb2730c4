"""Probe (GPU): every Triton GroupNorm plan forced in turn, the CUDA backend (its default plan, the two-kernel one
and any cluster settings asked for), the default dispatch, eager and a clone,
at each SD1.5 GroupNorm shape in both layouts, timed as bench/bench_group_norm.py times them (CUDA-graph replay over
input sets that overflow L2), each output checked against the reference first.

    python scripts/probe_gn_plans.py [--models sd15] [--dtype fp16]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import sdkernels  # noqa: E402
from bench.bench_group_norm import collect_cases, make_inputs, check_output, eager_group_norm_silu  # noqa: E402
from bench.common import DTYPES, bench_rotating_ms, input_sets, run_poisoned  # noqa: E402
from sdkernels.dispatch import last_backend, use_backend  # noqa: E402
from sdkernels.kernels import group_norm as k  # noqa: E402
from sdkernels.ops.group_norm import OP, group_norm_reference  # noqa: E402

PLANS = ["tile", "one_pass", "flat", "flat+finalize", "rows"]


def with_plan(plan, fn):
    """fn under a forced Triton plan: "flat+finalize" keeps the separate finalize kernel, "tile@8" sets the warps,
    "tile@8:axes" (or "tile@:axes") also one reduction per axis instead of one per statistic, ":pivot" both
    statistics in one reduction."""
    plan, _, variant = plan.partition("@")
    warps, _, sums = variant.partition(":")
    name, _, finalize = plan.partition("+")
    knobs = {"SDKERNELS_GN_PLAN": name, **({"SDKERNELS_GN_TILE_WARPS": warps} if warps else {}),
             **({"SDKERNELS_GN_TILE_SUMS": sums} if sums else {})}

    def run(*args):
        os.environ.update(knobs)
        fuse, k.FUSE_MAX_TILES = k.FUSE_MAX_TILES, (0 if finalize else k.FUSE_MAX_TILES)
        try:
            with use_backend("triton", op=OP, strict=True):
                return fn(*args)
        finally:
            k.FUSE_MAX_TILES = fuse
            for knob in knobs:
                del os.environ[knob]
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="sd15")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--layouts", default="cl,nchw")
    p.add_argument("--plans", default=",".join(PLANS), help="the Triton plans to force")
    p.add_argument("--tile-warps", default="", help="also the tile plan with each of these warp counts, e.g. 4,8,16")
    p.add_argument("--tile-sums", default="",
                   help="also each tile column with these reductions (comma-separated): axes (one per axis instead of "
                        "one over the whole tile), pivot (both statistics in one reduction)")
    p.add_argument("--cluster-knobs", default="",
                   help="also the CUDA backend under each SDKERNELS_GN_CLUSTER setting (';'-separated "
                        "'P,blocks,rows'); column cuda is its default plan, cuda2 the two-kernel one")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    plans = args.plans.split(",") + [f"tile@{w}" for w in args.tile_warps.split(",") if w]
    tiles = [p for p in plans if p.startswith("tile")]
    for sums in filter(None, args.tile_sums.split(",")):
        plans += [f"{p}{'' if '@' in p else '@'}:{sums}" for p in tiles]
    cluster_knobs = list(filter(None, args.cluster_knobs.split(";")))
    cols = plans + ["cuda", "cuda2"] + [f"cuda@{knob}" for knob in cluster_knobs] + ["default", "eager", "copy"]
    print(f"{'case':44s}" + "".join(f"{c:>14s}" for c in cols) + "   eager/default")
    for case in collect_cases(args.models.split(",")):
        if case.layout not in args.layouts.split(","):
            continue
        x, w, b = make_inputs(case, dtype, "cuda")
        G, eps = case.groups, case.eps
        expected = group_norm_reference(x.float(), G, w.float(), b.float(), eps, silu=True)
        reduction = x.numel() // (x.shape[0] * G)
        sets = [(x,)] + [(xs,) for xs, in input_sets(lambda: (torch.randn_like(x),), x.numel() * x.element_size())][1:]

        def ours(x):
            return sdkernels.group_norm(x, G, w, b, eps, silu=True)

        fns = {plan: with_plan(plan, ours) for plan in plans}

        def cuda_with(knob):
            """The CUDA backend with SDKERNELS_GN_CLUSTER=knob (None: its default plan)."""
            def run(x):
                if knob is not None:
                    os.environ["SDKERNELS_GN_CLUSTER"] = knob
                try:
                    with use_backend("cuda", op=OP, strict=True):
                        return ours(x)
                finally:
                    os.environ.pop("SDKERNELS_GN_CLUSTER", None)
            return run
        fns.update(cuda=cuda_with(None), cuda2=cuda_with("0"))
        fns.update({f"cuda@{knob}": cuda_with(knob) for knob in cluster_knobs})
        fns.update(default=ours, eager=lambda x: eager_group_norm_silu(x, w, b, G, eps), copy=lambda x: x.clone())
        Cg, S = x.shape[1] // G, x[0, 0].numel()
        row = {}
        for name, fn in fns.items():
            if name == "rows" and case.layout != "cl" or name.startswith("cuda") and case.layout != "cl":
                row[name] = "-"
                continue
            if name.startswith("tile") and k.next_power_of_2(Cg) * k.next_power_of_2(S) > 65536:
                row[name] = "-"
                continue
            try:
                if name not in ("eager", "copy"):
                    check_output(f"{case.name} {name}", run_poisoned(lambda: fn(x)), x, expected, reduction)
                row[name] = f"{1000 * bench_rotating_ms(fn, sets):.2f}"
            except Exception as e:  # a failing plan is reported in its column, the probe goes on
                row[name] = "ERR"
                print(f"  {case.name} {name}: {type(e).__name__}: {str(e)[:300]}")
        ours(x)
        chosen = last_backend(OP)
        ratio = float(row["eager"]) / float(row["default"]) if row["default"] not in ("-", "ERR") else 0
        print(f"{case.name:44s}" + "".join(f"{row[c]:>14s}" for c in cols) + f"   {ratio:.2f}x ({chosen})")
        sets = expected = None  # free this case's tensors before the next


if __name__ == "__main__":
    main()
