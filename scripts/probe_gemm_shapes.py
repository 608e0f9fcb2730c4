"""Probe (GPU): the GEMMs of a patched UNet step, by shape, and whether a plain Triton matmul beats cuBLAS there.

    python scripts/probe_gemm_shapes.py --model sd15 [--top 30]

It profiles the patched step (the op choices a CUDA-graph replay gets) with shapes recorded, sums each GEMM shape's
cuBLAS kernel time per step, then times every shape alone, L2 cold and host excluded (tuning.device_ms): cuBLAS
(F.linear) against a TMA tile matmul under several tile configs (split-K ones add fp32 atomics and a cast). What
the table says is whether a linear backend of our own could take time off the step's GEMM class.
"""
import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from probe_step_ops import patched_step_profile
from sdkernels import models, tuning
from sdkernels.profile import kernel_class


@triton.jit
def _matmul_kernel(x_desc, w_desc, b_ptr, out_ptr, M, N, K, k_per_split, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    split = tl.program_id(0) // (tiles_m * tiles_n)
    pid = tl.program_id(0) - split * (tiles_m * tiles_n)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_per_split), BLOCK_K):
        x = x_desc.load([tile_m * BLOCK_M, k0])
        w = w_desc.load([tile_n * BLOCK_N, k0])
        acc = tl.dot(x, w.T, acc)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptr + offs, acc, mask=mask)


CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, SPLIT_K)
    (128, 128, 64, 3, 8, 1), (128, 128, 64, 4, 8, 1), (128, 256, 64, 3, 8, 1), (256, 128, 64, 3, 8, 1),
    (64, 128, 64, 4, 4, 1), (128, 64, 64, 4, 4, 1), (64, 64, 64, 4, 4, 1),
    (128, 128, 64, 4, 8, 2), (128, 128, 64, 4, 8, 3), (64, 128, 64, 4, 4, 2),
]


def triton_linear(x, w, b, config):
    bm, bn, bk, stages, warps, split_k = config
    M, K = x.shape
    N = w.shape[0]
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn) * split_k,)
    k_per_split = triton.cdiv(triton.cdiv(K, bk), split_k) * bk
    if split_k == 1:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
        _matmul_kernel[grid](x_desc, w_desc, b if b is not None else w, out, M, N, K, k_per_split,
                             HAS_BIAS=b is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=1,
                             num_stages=stages, num_warps=warps)
        return out
    ws = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    _matmul_kernel[grid](x_desc, w_desc, w, ws, M, N, K, k_per_split, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn,
                         BLOCK_K=bk, GROUP_M=8, SPLIT_K=split_k, num_stages=stages, num_warps=warps)
    return (ws + b).to(x.dtype) if b is not None else ws.to(x.dtype)


def gemm_shapes(model_name, steps=3):
    """{(M, N, K, bias): [calls a step, kernel us a step]} of the patched step's aten GEMMs (addmm, mm), and
    {(op, shapes): kernel us a step} of the GEMM kernels other ops launched."""
    prof = patched_step_profile(model_name, steps, objective="device")
    shapes = defaultdict(lambda: [0, 0.0])
    other = defaultdict(float)
    for event in prof.events():
        kernels = [k for k in (getattr(event, "kernels", ()) or ()) if kernel_class(k.name) == "gemm"]
        if not kernels:
            continue
        s = event.input_shapes
        if event.name == "aten::addmm" and len(s) >= 3 and len(s[1]) == 2:
            key = (s[1][0], s[2][1], s[1][1], True)
        elif event.name == "aten::mm" and len(s) >= 2 and len(s[0]) == 2:
            key = (s[0][0], s[1][1], s[0][1], False)
        else:
            other[(event.name, str(s)[:100])] += sum(k.duration for k in kernels) / steps
            continue
        shapes[key][0] += 1 / steps
        shapes[key][1] += sum(k.duration for k in kernels) / steps
    return shapes, other


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15", choices=list(models.MODELS))
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    shapes, other = gemm_shapes(args.model)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"GEMM kernels a step: {sum(v[1] for v in shapes.values()):.1f} us in addmm/mm, "
          f"{sum(other.values()):.1f} us elsewhere")
    for key, us in sorted(other.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  elsewhere {us:8.1f} us  {key[0]}  {key[1]}")
    print(f"{'M':>6s} {'N':>6s} {'K':>6s} bias {'calls':>5s} {'step us':>8s} {'cublas':>8s} {'TF/s':>5s} "
          f"{'triton':>8s} {'TF/s':>5s} {'ratio':>6s} config")
    total_cublas = total_best = 0.0
    for (M, N, K, has_bias), (calls, step_us) in sorted(shapes.items(), key=lambda kv: -kv[1][1])[:args.top]:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5
        b = torch.randn(N, device="cuda", dtype=torch.float16) if has_bias else None
        expected = F.linear(x.float(), w.float(), b.float() if b is not None else None)
        cublas_us = tuning.device_ms(lambda: F.linear(x, w, b)) * 1e3
        best = (float("inf"), None)
        for config in CONFIGS:
            try:
                got = triton_linear(x, w, b, config)
                if not torch.allclose(got.float(), expected, atol=2e-2, rtol=2e-2):
                    print(f"  wrong result: {config}")
                    continue
                us = tuning.device_ms(lambda config=config: triton_linear(x, w, b, config)) * 1e3
            except Exception as error:  # a config that does not fit (shared memory) or compile
                print(f"  {config}: {type(error).__name__}: {str(error)[:80]}")
                continue
            best = min(best, (us, config))
        flops = 2 * M * N * K
        total_cublas += calls * cublas_us
        total_best += calls * min(cublas_us, best[0])
        print(f"{M:6d} {N:6d} {K:6d} {'y' if has_bias else 'n':>4s} {calls:5.0f} {step_us:8.1f} {cublas_us:8.1f} "
              f"{flops / cublas_us / 1e6:5.0f} {best[0]:8.1f} {flops / best[0] / 1e6:5.0f} "
              f"{cublas_us / best[0]:6.2f} {best[1]}")
    print(f"the shapes above, alone and L2 cold: cuBLAS {total_cublas:.1f} us a step, the faster of the two "
          f"{total_best:.1f} us")


if __name__ == "__main__":
    main()
