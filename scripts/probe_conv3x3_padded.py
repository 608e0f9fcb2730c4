"""Probe (GPU): the bordered-input 3x3 convolution (kernels/conv3x3_padded.py) against cuDNN (F.conv2d, channels_last,
with and without its bias) and the 4-D-box TMA kernel (kernels/conv3x3_tma.py) at the UNets' and the VAE decoder's
conv shapes, over tile configs and K splits:

    python scripts/probe_conv3x3_padded.py [--shapes sd15|sdxl|vae|all|NxCinxCoutxHxW,...] [--top 4] [--more]
        [--splits 1,auto,2auto] [--configs 64x128x128x4x4,...] [--no-graph]

Per shape: cuDNN's time, the time to build the bordered copy of x (what a producer that cannot write the border
itself would add), triton_tma's, and the best configs' times and errors against cuDNN's output (max |diff| /
max |ref|; WRONG past 5e-3). Times: medians of CUDA-graph replays (triton.testing.do_bench_cudagraph: the host's
launch cost, which do_bench adds at the small shapes, is left out), or do_bench's with --no-graph; fp16."""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

from sdkernels.kernels import conv3x3_padded as cp
from sdkernels.kernels import conv3x3_tma as tma

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_conv3x3_tma import conv_case  # noqa: E402  (the same inputs as the triton_tma sweep)

SHAPES = {  # (N, Cin, Cout, H, W)
    "sd15": [(2, 320, 320, 64, 64), (2, 640, 320, 64, 64), (2, 640, 640, 32, 32), (2, 1280, 640, 32, 32),
             (2, 1280, 1280, 16, 16), (2, 2560, 1280, 16, 16), (2, 1280, 1280, 8, 8), (2, 2560, 1280, 8, 8)],
    "sdxl": [(2, 320, 320, 128, 128), (2, 640, 640, 64, 64), (2, 1280, 1280, 32, 32)],
    "vae": [(1, 512, 512, 64, 64), (1, 512, 512, 128, 128), (1, 512, 512, 256, 256), (1, 256, 256, 256, 256),
            (1, 256, 256, 512, 512), (1, 128, 128, 512, 512), (1, 128, 128, 1024, 1024)],
}
CONFIGS = [(128, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
           (256, 128, 64, 8, 3), (128, 64, 64, 4, 5), (64, 128, 64, 4, 5), (64, 256, 64, 4, 4),
           (128, 128, 128, 8, 3), (128, 256, 64, 8, 4), (64, 128, 128, 4, 3)]
MORE_CONFIGS = [(64, 128, 128, 4, 4), (128, 128, 128, 8, 4), (64, 64, 128, 4, 4), (128, 64, 128, 4, 4),
                (64, 256, 64, 4, 3), (128, 256, 128, 8, 2)]


def parse_shapes(spec: str) -> list:
    if spec == "all":
        return sum(SHAPES.values(), [])
    return sum((SHAPES[s] if s in SHAPES else [tuple(map(int, s.split("x")))] for s in spec.split(",")), [])


def split_choices(spec: str, auto: int) -> list:
    """The K split counts to try: integers, "auto" (split_count's) and "2auto"/"half" around it."""
    named = {"auto": auto, "2auto": 2 * auto, "4auto": 4 * auto, "half": max(1, auto // 2)}
    return sorted({named[s] if s in named else int(s) for s in spec.split(",")})


def bordered(x):
    N, C, H, W = x.shape
    xp = torch.zeros((N, H + 2, W + 2, C), device=x.device, dtype=x.dtype)
    xp[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    return xp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="all")
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--more", action="store_true", help="also the configs of MORE_CONFIGS")
    p.add_argument("--splits", default="1,auto,2auto")
    p.add_argument("--configs", help="only these (BLOCK_M x BLOCK_N x BK x warps x stages, comma-separated)")
    p.add_argument("--no-graph", action="store_true", help="time with do_bench (host launch cost included)")
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)
    configs = CONFIGS + (MORE_CONFIGS if args.more else [])
    if args.configs:
        configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
    torch.manual_seed(0)
    if args.no_graph:
        bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100)  # noqa: E731
    else:
        bench = lambda f: triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median")  # noqa: E731
    for N, Cin, Cout, H, W in shapes:
        x, w, b, ref, flops = conv_case(N, Cin, Cout, H, W)
        tf = lambda ms: flops / ms / 1e9  # noqa: E731
        cudnn = bench(lambda: F.conv2d(x, w, b, padding=1))
        cudnn_nb = bench(lambda: F.conv2d(x, w, None, padding=1))
        xp = bordered(x)
        pad_ms = bench(lambda: bordered(x))
        out_t = torch.empty_like(ref)
        tma_ms = bench(lambda: tma.conv3x3_tma(x, w, b, None, 1.0, out_t))
        rows = []
        for cfg in configs:
            bm, bn, bk = cfg[:3]
            tiles = N * triton.cdiv((H - 1) * (W + 2) + W + 1, bm) * triton.cdiv(Cout, bn)
            auto = cp.split_count(tiles, 9 * triton.cdiv(Cin, bk), x.device, whole_wave=True)
            for split in split_choices(args.splits, auto):
                out = torch.full_like(ref, float("nan"))
                kw = dict(config=cfg, split=split)
                try:
                    cp.conv3x3_padded(xp, w, b, None, None, 1.0, out, **kw)
                    torch.cuda.synchronize()
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    ms = bench(lambda: cp.conv3x3_padded(xp, w, b, None, None, 1.0, out, **kw))
                except Exception as e:  # a config that does not compile or fit: report and go on
                    rows.append((float("inf"), cfg, split, f"{type(e).__name__}: {str(e)[:100]}"))
                    continue
                rows.append((ms, cfg, split, f"err {err:.1e}{' WRONG' if not err <= 5e-3 else ''}"))
        print(f"N={N} Cin={Cin} Cout={Cout} {H}x{W}: cudnn {cudnn * 1e3:.1f} us ({tf(cudnn):.0f} TFLOP/s), "
              f"no bias {cudnn_nb * 1e3:.1f}, border copy {pad_ms * 1e3:.1f}, triton_tma {tma_ms * 1e3:.1f} "
              f"({tf(tma_ms):.0f})", flush=True)
        wrong = [r for r in rows if "WRONG" in r[3]]
        if wrong:
            print(f"   {len(wrong)} WRONG: {sorted(set((r[1], r[2]) for r in wrong))}")
        for ms, cfg, split, note in sorted(rows, key=lambda r: r[0])[:args.top]:
            print(f"   {ms * 1e3:8.1f} us {cudnn / ms:5.2f}x cudnn {tf(ms):4.0f} TFLOP/s cfg={cfg} split={split} "
                  f"{note}",
                  flush=True)
        failed = [r for r in rows if r[0] == float("inf")]
        if failed:
            print(f"   {len(failed)} failed, first: {failed[0][1:]}")


if __name__ == "__main__":
    main()
