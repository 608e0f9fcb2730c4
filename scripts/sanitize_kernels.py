"""Every kernel once on odd shapes, for compute-sanitizer memcheck (scripts/gpu_lane.sh runs it). Each backend is
forced strictly so nothing silently takes the reference path; results are checked against the reference."""
import contextlib
import itertools
import os

import torch

import sdkernels
from sdkernels.ops import (attention_reference, geglu_reference, gelu_reference, group_norm_reference,
                           linear_geglu_reference)
from sdkernels.ops import (add_bias_residual_reference, conv3x3_eager, conv3x3_reference, group_norm_stats_reference,
                           winograd_conv3x3_reference)
from sdkernels.ops import add_layer_norm, add_layer_norm_reference, group_norm_apply_reference
from sdkernels.ops.attention import GPU_UNSAFE_HEAD_DIMS
from sdkernels.testing import assert_close, env_set, relative_error
from probe_gn_plans import with_plan  # scripts/: forces a Triton GroupNorm plan


def group_norm_cases():
    for backend, layout in (("triton", torch.contiguous_format), ("triton", torch.channels_last),
                            ("cuda", torch.channels_last)):
        for shape, G in (((1, 24, 7, 9), 3), ((3, 40, 13, 5), 4), ((2, 80, 33, 31), 8), ((1, 16, 97, 101), 2)):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout)
                w = torch.randn(shape[1], device="cuda", dtype=dtype)
                r = torch.randn_like(x)
                yield backend, (x, G, w, w, 1e-5, True, r)
                yield backend, (x, G, w, w, 1e-5, True, None, torch.randn(shape[:2], device="cuda", dtype=dtype))


def group_norm_plan_cases():
    """Every Triton plan forced (the launcher's own choice reaches only some at these shapes), flat also with its
    separate finalize kernel (more tiles a group than the apply pass merges)."""
    for plan in ("tile", "one_pass", "flat", "flat+finalize", "rows"):
        for layout in (torch.contiguous_format, torch.channels_last):
            if plan == "rows" and layout != torch.channels_last:
                continue
            for shape, G in (((1, 24, 7, 9), 3), ((2, 80, 33, 31), 8)):
                x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=layout)
                w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
                yield plan, (x, G, w, w, 1e-5, True, torch.randn_like(x))


def group_norm_stats_cases():
    """group_norm_stats by plan: the tile kernel's statistics-only mode, the flat partials + finalize, the rows plan;
    and group_norm_apply (the banded VAE's normalize pass) on the statistics, with and without SiLU."""
    for plan in ("tile", "flat", "rows"):
        for layout in (torch.contiguous_format, torch.channels_last):
            if plan == "rows" and layout != torch.channels_last:
                continue
            for shape, G in (((1, 24, 7, 9), 3), ((2, 80, 33, 31), 8)):
                x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=layout)
                yield plan, (x, G, 1e-5)


def group_norm_apply_cases():
    for layout in (torch.contiguous_format, torch.channels_last):
        for shape, G in (((1, 24, 7, 9), 3), ((2, 80, 33, 31), 8)):
            x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=layout)
            w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            stats = group_norm_stats_reference(x, G, 1e-5).float().contiguous()
            yield (x, stats, w, w, True)
            yield (x, stats, None, None, False)


def geglu_cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for rows, inner, k in ((1, 37, 24), (77, 100, 40), (130, 1280, 320)):
            h = torch.randn(rows, 2 * inner, device="cuda", dtype=dtype)
            yield "gelu", sdkernels.gelu, gelu_reference, (h[:, 1:], "none")
            yield "geglu", sdkernels.geglu, geglu_reference, (h, "none")
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            w = torch.randn(2 * inner, k, device="cuda", dtype=dtype) / k**0.5
            b = torch.randn(2 * inner, device="cuda", dtype=dtype)
            yield "linear_geglu", sdkernels.linear_geglu, linear_geglu_reference, (x, w, b, "none")


def linear_geglu_plan_cases():
    """Two-launch plans with every tail config (split-K ones with their epilogue kernel), TMA where it runs."""
    from sdkernels.kernels import linear_geglu as kernel
    for dtype in (torch.float16, torch.bfloat16):
        M, K, inner = 133, 200, 301
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randn(2 * inner, K, device="cuda", dtype=dtype) / K**0.5
        b = torch.randn(2 * inner, device="cuda", dtype=dtype)
        tma = kernel.tma_ok(x, w)
        main = kernel.TMA_CONFIGS[0] if tma else kernel.CONFIGS[0]
        flags = dict(HAS_BIAS=True, APPROXIMATE_TANH=False, INPUT_PRECISION="tf32", DOT_IN_FP32=False)
        for tail in kernel.TAIL_CONFIGS:
            if tail.kwargs["USE_TMA"] and not tma:
                continue

            def run(x=x, w=w, b=b, main=main, tail=tail, flags=flags):
                out = torch.full((x.shape[0], w.shape[0] // 2), float("nan"), device="cuda", dtype=x.dtype)
                kernel._Launch(x, w, b, out, flags).run(((main, 0, 128), (tail, 128, out.shape[1])))
                return out
            yield f"linear_geglu plan [{main}] + [{tail}]", run, (x, w, b, "none")


def attention_cases():
    """Odd token counts (masked tails), each kernel head dim, diffusers' layout and (B, H, N, d), a key mask."""
    for backend in ("flash", "partial_softmax", "partial_softmax_cuda"):
        for dtype in (torch.float16, torch.bfloat16):
            shapes = [(1, 3, 77, 77, 64), (2, 2, 131, 77, 64), (1, 2, 65, 300, 80), (2, 1, 33, 19, 128),
                      (1, 1, 17, 129, 160), (2, 3, 99, 77, 40)]
            for B, H, N, Nk, d in (s for s in shapes if s[-1] not in GPU_UNSAFE_HEAD_DIMS):
                q = torch.randn(B, N, H * d, device="cuda", dtype=dtype)
                k, v = (torch.randn(B, Nk, H * d, device="cuda", dtype=dtype) for _ in range(2))
                mask = torch.where(torch.rand(B, 1, 1, Nk, device="cuda") < 0.3, -10000.0, 0.0).to(dtype)
                yield backend, (q, k, v, d ** -0.5, mask, H)
                yield backend, (q.unflatten(-1, (H, d)).transpose(1, 2), k.unflatten(-1, (H, d)).transpose(1, 2),
                                v.unflatten(-1, (H, d)).transpose(1, 2), d ** -0.5, None, 0)
                if backend == "flash":  # unmasked, diffusers' layout: the descriptor (TMA) kernel, forced
                    yield "flash tma", (q, k, v, d ** -0.5, None, H)
                if backend == "partial_softmax_cuda":  # head-dim stride 2: the CUDA statistics' scalar loads
                    q2, k2, v2 = (torch.randn(B, H, n, 2 * d, device="cuda", dtype=dtype)[..., ::2]
                                  for n in (N, Nk, Nk))
                    yield backend, (q2, k2, v2, d ** -0.5, mask, 0)


def conv3x3_cases():
    """Pixel and channel tails, both epilogues (statistics; shortcut and scale), contiguous and channels_last
    weights."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for N, cin, cout, H, W in ((1, 24, 40, 7, 9), (2, 80, 36, 13, 5), (1, 320, 640, 33, 31)):
            x = torch.randn(N, cin, H, W, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, 3, 3, device="cuda", dtype=dtype) / (9 * cin) ** 0.5
            if cin == 80:
                w = w.to(memory_format=torch.channels_last)
            stats = group_norm_stats_reference(x, 4, 1e-5)
            affine = torch.randn(cin, device="cuda", dtype=dtype)
            b, add = torch.randn(cout, device="cuda", dtype=dtype), torch.randn(N, cout, device="cuda", dtype=dtype)
            r = torch.randn(N, cout, H, W, device="cuda", dtype=dtype)
            yield (x, w, b, stats, affine, affine, add, None, 1.0, 4, 1e-6)
            yield (x, w, b, stats, affine, affine, None, r, 2.0, 0, 1e-6)


def conv3x3_bordered_cases():
    """conv3x3_fused's triton_bordered backend: pixel and channel tails, one pixel, a split K (8 x 8 at 512
    channels), both epilogues; channels_last weights as it takes them."""
    for dtype in (torch.float16, torch.bfloat16):
        for N, cin, cout, H, W in ((1, 24, 40, 7, 9), (2, 16, 36, 1, 1), (1, 320, 200, 33, 31), (2, 512, 72, 8, 8)):
            x = torch.randn(N, cin, H, W, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
            w = (torch.randn(cout, cin, 3, 3, device="cuda", dtype=dtype) / (9 * cin) ** 0.5).to(
                memory_format=torch.channels_last)
            stats = group_norm_stats_reference(x, 4, 1e-5).float()
            affine = torch.randn(cin, device="cuda", dtype=dtype)
            b, add = torch.randn(cout, device="cuda", dtype=dtype), torch.randn(N, cout, device="cuda", dtype=dtype)
            r = torch.randn(N, cout, H, W, device="cuda", dtype=dtype)
            yield (x, w, b, stats, affine, affine, add, None, 1.0, 4, 1e-6)
            yield (x, w, b, stats, affine, affine, None, r, 2.0, 0, 1e-6)
            yield (x, w, None, None, None, None, None, None, 1.0, 0, 1e-6)


def winograd_cases():
    """The Winograd conv3x3 (CUDA C++) on odd sizes and channel counts that are multiples of 8 (what it takes), with
    and without bias, residual and scale; against the reference that rounds as the kernel does."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for N, C, K, H, W in ((1, 8, 16, 1, 1), (2, 24, 40, 7, 9), (1, 64, 72, 33, 31), (2, 320, 320, 17, 16)):
            x = torch.randn(N, C, H, W, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
            w = torch.randn(K, C, 3, 3, device="cuda", dtype=dtype) / (9 * C) ** 0.5
            b = torch.randn(K, device="cuda", dtype=dtype)
            r = torch.randn(N, K, H, W, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
            yield (x, w, None, None, 1.0)
            yield (x, w, b, r, 0.5)


def conv3x3_tma_cases():
    """The TMA implicit-GEMM conv3x3 (Triton): odd sizes, a box wider than the image, two samples per tile with
    split-K (8 x 8), channels_last x and weight as it takes them."""
    for dtype in (torch.float16, torch.bfloat16):
        for N, C, K, H, W in ((1, 8, 16, 1, 1), (3, 24, 40, 7, 9), (1, 64, 72, 33, 31), (3, 512, 200, 8, 8)):
            cl = torch.channels_last
            x = torch.randn(N, C, H, W, device="cuda", dtype=dtype).to(memory_format=cl)
            w = (torch.randn(K, C, 3, 3, device="cuda", dtype=dtype) / (9 * C) ** 0.5).to(memory_format=cl)
            b = torch.randn(K, device="cuda", dtype=dtype)
            r = torch.randn(N, K, H, W, device="cuda", dtype=dtype)  # NCHW: read through its strides
            yield (x, w, None, None, 1.0)
            yield (x, w, b, r, 0.5)


def bias_add_cases():
    for layout in (torch.channels_last, torch.contiguous_format):
        for N, C, H, W in ((1, 24, 7, 9), (2, 40, 13, 5), (2, 320, 33, 31)):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                y = torch.randn(N, C, H, W, device="cuda", dtype=dtype).to(memory_format=layout)
                b = torch.randn(C, device="cuda", dtype=dtype)
                yield (y, b, torch.randn_like(y), 0.5)
                yield (y, b, None, 1.0)


def add_layer_norm_cases():
    """Row and column tails (one row, odd widths, 154 CLIP rows), the widest row the kernel takes, affine or not."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((1, 1), (7, 3), (2, 77, 768), (3, 11, 333), (5, 8192)):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            w = torch.randn(shape[-1], device="cuda", dtype=dtype)
            yield (x, torch.randn_like(x), w, torch.randn_like(w), 1e-5)
            yield (x, torch.randn_like(x), None, None, 1e-6)


def describe_args(args) -> str:
    return " ".join(f"{tuple(a.shape)}:{str(a.dtype)[6:]}" if isinstance(a, torch.Tensor) else repr(a) for a in args)


def _with_env(name, value, run):
    """run() with environment variable ``name`` set to ``value`` where value is not empty, else as it is."""
    with env_set(name, value) if value else contextlib.nullcontext():
        return run()


def cases():
    """(label, run, reference, relative-error bound or None for group_norm's elementwise tolerance)."""
    for label, args in attention_cases():
        backend, _, tma = label.partition(" ")
        yield (f"flash_attention[{label}]", backend,
               lambda a=args, t=tma: _with_env("SDKERNELS_FLASH_TMA", t and "1", lambda: sdkernels.flash_attention(
                   *a[:3], scale=a[3], attn_mask=a[4], heads=a[5])),
               lambda a=args: attention_reference(*a), args, 2e-2)
    for backend, args in group_norm_cases():
        yield (f"group_norm[{backend}]", backend, lambda a=args: sdkernels.group_norm(*a),
               lambda a=args: group_norm_reference(*a), args, None)
        for knob in ("0", "3,1,8") if backend == "cuda" else ():  # the two-kernel plan; clusters of 3, 8 rows held
            yield (f"group_norm[cuda SDKERNELS_GN_CLUSTER={knob}]", backend,
                   lambda a=args, k=knob: _with_env("SDKERNELS_GN_CLUSTER", k, lambda: sdkernels.group_norm(*a)),
                   lambda a=args: group_norm_reference(*a), args, None)
    for plan, args in group_norm_plan_cases():
        yield (f"group_norm[triton plan={plan}]", "triton",
               lambda p=plan, a=args: with_plan(p, sdkernels.group_norm)(*a),
               lambda a=args: group_norm_reference(*a), args, None)
    for plan, args in group_norm_stats_cases():
        yield (f"group_norm_stats[triton plan={plan}]", "triton",
               lambda p=plan, a=args: _with_env("SDKERNELS_GN_PLAN", p, lambda: sdkernels.ops.group_norm_stats(*a)),
               lambda a=args: group_norm_stats_reference(*a).float(), args, None)
    for args in group_norm_apply_cases():
        yield ("group_norm_apply", "triton", lambda a=args: sdkernels.ops.group_norm_apply(*a),
               lambda a=args: group_norm_apply_reference(*a), args, None)
    for name, op, reference, args in geglu_cases():
        yield name, "triton", lambda o=op, a=args: o(*a), lambda r=reference, a=args: r(*a), args, 2e-2
    for label, run, args in linear_geglu_plan_cases():
        yield label, "triton", run, lambda a=args: linear_geglu_reference(*a), args, 2e-2
    for kernel, args in itertools.product(("", "wmma"), winograd_cases()):  # default (mma for 16-bit), WMMA
        yield (f"conv3x3 winograd {kernel or 'default'}", "winograd",
               lambda a=args, k=kernel: _with_env("SDKERNELS_WINOGRAD_KERNEL", k, lambda: sdkernels.conv3x3(*a)),
               lambda a=args: winograd_conv3x3_reference(*a), args, 2e-2)
    for args in winograd_cases():  # the Triton Winograd kernel on the same shapes
        yield ("conv3x3 triton_winograd", "triton_winograd", lambda a=args: sdkernels.conv3x3(*a),
               lambda a=args: winograd_conv3x3_reference(*a), args, 2e-2)
    for args in conv3x3_tma_cases():
        yield ("conv3x3 tma", "triton_tma", lambda a=args: sdkernels.conv3x3(*a), lambda a=args: conv3x3_eager(*a),
               args, 2e-2)
    for args in bias_add_cases():
        yield ("add_bias_residual_", "triton", lambda a=args: sdkernels.ops.add_bias_residual_(a[0].clone(), *a[1:]),
               lambda a=args: add_bias_residual_reference(a[0].clone(), *a[1:]), args, 2e-2)
    for args in add_layer_norm_cases():  # (total, normed) stacked: both checked elementwise
        yield ("add_layer_norm", "triton", lambda a=args: torch.stack(add_layer_norm(*a)),
               lambda a=args: torch.stack(add_layer_norm_reference(*a)), args, None)
    for args in conv3x3_cases():
        yield ("conv3x3_fused", "triton", lambda a=args: torch.ops.sdkernels.conv3x3_fused(*a)[0],
               lambda a=args: conv3x3_reference(*a)[0], args, 2e-2)
    for args in conv3x3_bordered_cases():  # split-K where launch_config splits
        yield ("conv3x3_fused bordered", "triton_bordered", lambda a=args: torch.ops.sdkernels.conv3x3_fused(*a)[0],
               lambda a=args: conv3x3_reference(*a)[0], args, 2e-2)


def shard_filter(shard: str):
    """SANITIZE_SHARD="i/n" (gpu_lane.sh, one process a GPU): a predicate on case labels that deals whole case
    families (a label up to its first "[") to the n shards in turn, in the order they first appear, so each kernel
    compiles in one process only; "" keeps every case."""
    if not shard:
        return lambda label: True
    index, count = (int(v) for v in shard.split("/"))
    families = {}
    return lambda label: families.setdefault(label.split("[")[0], len(families)) % count == index


def main():
    n, failures = 0, []
    # e.g. "linear_geglu plan" or "bordered (2, 512, 8, 8)": just the cases whose label and arguments hold it
    only = os.environ.get("SANITIZE_MATCH", "")
    skip = os.environ.get("SANITIZE_SKIP")  # e.g. "conv3x3_fused": all but those (two processes share the cases)
    in_shard = shard_filter(os.environ.get("SANITIZE_SHARD", ""))
    for label, backend, run, reference, args, bound in cases():
        what = f"{label} {describe_args(args)}"
        if only not in what or (skip and skip in label) or not in_shard(label):
            continue
        print(what, flush=True)  # the last line before a memory error names its case
        try:
            with sdkernels.use_backend(backend, strict=True):
                out = run()
            torch.cuda.synchronize()
            expected = reference()
            if bound is None:
                assert_close(out, expected, args[0].dtype, what=what)
            else:
                rel = relative_error(out, expected)
                assert rel < bound, f"{what}: relative error {rel:.3g}"
        except Exception as e:  # noqa: BLE001  (report every failing case, then fail)
            failures.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if "CUDA error" in str(e):
                break  # the context is lost: nothing after this can run
        n += 1
    print(f"sanitize_kernels: {n} kernel calls run, {len(failures)} failed")
    for line in failures:
        print("FAILED", line)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
