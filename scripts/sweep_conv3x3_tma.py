"""Sweep (GPU): the TMA implicit-GEMM 3x3 convolution (kernels/conv3x3_tma.py) against cuDNN (F.conv2d with its bias,
channels_last) at the SD1.5 UNet's and the VAE decoder's conv shapes, over tile configs and K splits:

    python scripts/sweep_conv3x3_tma.py [--quick]

Prints, per shape, cuDNN's time and each config's time and error against cuDNN's output (max |diff| / max |ref|),
best first. Times: triton.testing.do_bench medians (CUDA events), fp16."""
import argparse

import torch
import torch.nn.functional as F
import triton

from sdkernels.kernels import conv3x3_tma as tma

# (N, Cin, Cout, H, W): SD1.5 UNet batch 2 at 512 px, then the VAE decoder at 512 px (batch 1).
SHAPES = [(2, 1280, 1280, 8, 8), (2, 2560, 1280, 8, 8), (2, 1280, 1280, 16, 16), (2, 2560, 1280, 16, 16),
          (2, 640, 640, 32, 32), (2, 1920, 640, 32, 32), (2, 320, 320, 64, 64), (2, 640, 320, 64, 64),
          (1, 512, 512, 64, 64), (1, 512, 512, 128, 128), (1, 256, 256, 256, 256), (1, 128, 128, 512, 512)]
TILES = [(2, 8, 8, 128, 64, 4, 4), (2, 8, 8, 128, 32, 4, 5), (1, 8, 8, 128, 64, 4, 4), (1, 8, 8, 128, 32, 4, 5),
         (2, 8, 8, 64, 64, 4, 4), (1, 8, 16, 128, 64, 4, 4), (1, 16, 8, 128, 64, 4, 4), (1, 4, 32, 128, 64, 4, 4),
         (1, 8, 16, 128, 64, 4, 3), (1, 8, 16, 64, 64, 4, 4), (1, 8, 16, 128, 32, 4, 6), (1, 2, 64, 128, 64, 4, 4),
         (1, 8, 16, 256, 64, 4, 3)]


def conv_case(N, Cin, Cout, H, W) -> tuple:
    """(x, weight, bias, cuDNN's output, FLOPs) of one fp16 channels_last conv, the weight scaled for unit gain."""
    x = torch.randn(N, Cin, H, W, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = (torch.randn(Cout, Cin, 3, 3, device="cuda", dtype=torch.float16) / (3 * Cin ** 0.5)).to(
        memory_format=torch.channels_last)
    b = torch.randn(Cout, device="cuda", dtype=torch.float16)
    return x, w, b, F.conv2d(x, w, b, padding=1), 2 * N * H * W * Cout * Cin * 9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="only the automatic split count")
    p.add_argument("--top", type=int, default=5, help="configs shown per shape")
    args = p.parse_args()
    torch.manual_seed(0)
    for N, Cin, Cout, H, W in SHAPES:
        x, w, b, ref, flops = conv_case(N, Cin, Cout, H, W)
        cudnn_ms = triton.testing.do_bench(lambda: F.conv2d(x, w, b, padding=1), warmup=25, rep=100)
        rows = []
        for cfg in TILES:
            bni, bh, bw, bn, bk = cfg[:5]
            if bh > H or bw > W:
                continue
            tiles = triton.cdiv(N, bni) * triton.cdiv(H, bh) * triton.cdiv(W, bw) * triton.cdiv(Cout, bn)
            k_steps = 9 * triton.cdiv(Cin, bk)
            auto = tma.split_count(tiles, k_steps, x.device)
            for split in sorted({1, auto, 2 * auto} if not args.quick else {auto}):
                out = torch.full_like(ref, float("nan"))
                try:
                    tma.conv3x3_tma(x, w, b, None, 1.0, out, config=cfg, split=split)
                    torch.cuda.synchronize()
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    ms = triton.testing.do_bench(
                        lambda: tma.conv3x3_tma(x, w, b, None, 1.0, out, config=cfg, split=split), warmup=25,
                        rep=100)
                except Exception as e:  # a config that does not compile or fit: report and go on
                    rows.append((float("inf"), cfg, split, f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                rows.append((ms, cfg, split, f"err {err:.2e}{' WRONG' if err > 5e-3 else ''}"))
        print(f"N={N} Cin={Cin} Cout={Cout} {H}x{W}: cudnn {cudnn_ms * 1e3:.1f} us "
              f"({flops / cudnn_ms / 1e9:.0f} TFLOP/s)")
        wrong = [r for r in rows if "WRONG" in r[3]]
        if wrong:
            print(f"   {len(wrong)} configs WRONG: {sorted(set(r[1] for r in wrong))}")
        for ms, cfg, split, note in sorted(rows, key=lambda r: r[0])[:args.top]:
            print(f"   {ms * 1e3:8.1f} us {cudnn_ms / ms:5.2f}x cudnn  cfg={cfg} split={split}  {note}")


if __name__ == "__main__":
    main()
