"""Where the fused ResNet-block conv (kernels/conv3x3.py) loses its time, on the GPU: per shape, the plain implicit
GEMM, the GroupNorm+SiLU prologue as it is and with its variants (SiLU through tanh.approx, a per-channel
scale/shift table, no SiLU), tile configs, against cuDNN and the unfused path (our GroupNorm+SiLU op + cuDNN).
    python scripts/probe_conv_prologue.py [--quick]
Prints one line per (shape, variant): median ms (do_bench), TFLOP/s, ratio to cuDNN, and the error against an fp32
reference next to the unfused fp16 path's own."""
import argparse

import torch
import torch.nn.functional as F

from sdkernels.benchmarking import bench_ms
from sdkernels.kernels.conv3x3 import conv3x3_triton
from sdkernels.ops import group_norm
from sdkernels.ops.group_norm import group_norm_stats_reference

SHAPES = [  # (N, Cin, Cout, H, W)
    (2, 320, 320, 64, 64), (2, 640, 640, 32, 32), (2, 1280, 1280, 16, 16), (2, 1280, 1280, 8, 8),
    (1, 512, 512, 128, 128), (1, 256, 256, 256, 256), (1, 128, 128, 512, 512),
]
CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (128, 256, 64, 8, 3), (64, 256, 64, 4, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
           (64, 64, 64, 4, 4)]


def max_rel(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    for N, Cin, Cout, H, W in SHAPES[:3] if args.quick else SHAPES:
        G = 32
        x = (torch.randn(N, Cin, H, W, device=dev) * 2 + 0.5).to(dt).to(memory_format=torch.channels_last)
        w = (torch.randn(Cout, Cin, 3, 3, device=dev) / (3 * Cin ** 0.5)).to(dt).to(memory_format=torch.channels_last)
        b = torch.randn(Cout, device=dev).to(dt)
        gamma = (1 + 0.2 * torch.randn(Cin, device=dev)).to(dt)
        beta = (0.2 * torch.randn(Cin, device=dev)).to(dt)
        stats = group_norm_stats_reference(x, G).float().contiguous()             # (N, G, 2)
        mean, rstd = stats[..., 0].repeat_interleave(Cin // G, 1), stats[..., 1].repeat_interleave(Cin // G, 1)
        scale = rstd * gamma.float()
        table = torch.stack([scale, beta.float() - mean * scale], -1).contiguous()  # (N, C, 2)
        a32 = F.silu(F.group_norm(x.float(), G, gamma.float(), beta.float()))
        ref = F.conv2d(a32, w.float(), b.float(), padding=1)
        flops = 2 * N * H * W * Cout * Cin * 9
        out = torch.empty(N, Cout, H, W, device=dev, dtype=dt).to(memory_format=torch.channels_last)

        def line(name, fn, err=None):
            ms = bench_ms(fn)
            print(f"  {name:44s} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.0f} TF/s  cudnn/ours {cudnn_ms / ms:5.2f}"
                  + (f"  err {err:.2e}" if err is not None else ""), flush=True)
            return ms

        print(f"== N={N} Cin={Cin} Cout={Cout} H={H} W={W}", flush=True)
        cudnn_ms = bench_ms(lambda: F.conv2d(x, w, b, padding=1))
        line("cudnn conv", lambda: F.conv2d(x, w, b, padding=1))
        unfused = lambda: F.conv2d(group_norm(x, G, gamma, beta, silu=True), w, b, padding=1)  # noqa: E731
        line("unfused: sdkernels GN+SiLU + cudnn", unfused, max_rel(unfused(), ref))
        line("plain igemm (no prologue), default", lambda: conv3x3_triton(x, w, b, None, None, None, 1.0, 0, 0.0, out))
        variants = {
            "fused exact (stats + affine)": dict(norm=(stats, gamma, beta)),
            "fused fast silu": dict(norm=(stats, gamma, beta), fast_silu=True),
            "fused table + exact silu": dict(norm=(table,)),
            "fused table + fast silu": dict(norm=(table,), fast_silu=True),
            "fused table, no silu": dict(norm=(table,), norm_silu=False),
        }
        for name, v in variants.items():
            v = dict(v)
            norm = v.pop("norm")
            run = lambda config=None: conv3x3_triton(x, w, b, norm, None, None, 1.0, 0, 0.0, out,  # noqa: E731
                                                     config=config, **v)
            run()
            err = max_rel(out, ref) if v.get("norm_silu", True) else None
            line(name + ", default", run, err)
        for config in ([] if args.quick else CONFIGS):
            if config[1] > 2 * Cout or config[0] > 2 * H * W:
                continue
            try:
                line(f"plain {config}", lambda: conv3x3_triton(x, w, b, None, None, None, 1.0, 0, 0.0, out,
                                                              config=config))
                line(f"fused table + fast silu {config}",
                     lambda: conv3x3_triton(x, w, b, (table,), None, None, 1.0, 0, 0.0, out, config=config,
                                            fast_silu=True))
            except Exception as e:  # a config that does not fit the shared memory
                print(f"  {config}: {type(e).__name__}: {str(e)[:100]}")


if __name__ == "__main__":
    main()
