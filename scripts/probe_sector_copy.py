"""Probe (GPU): how fast DRAM serves a channels_last tensor one narrow channel slice at a time.

GroupNorm over a channels_last tensor larger than the chip reads it twice (statistics, then normalize) and writes it
once, so it cannot pass 2/3 of a copy's bandwidth (README, GroupNorm). A kernel could instead take the tensor one
channel slice at a time (all pixels, W channels: W * 2 bytes of each pixel's row in fp16), hold the slice on chip
while its statistics are merged, and normalize it from there: one read and one write. Whether that can beat 2/3 of a
copy depends first on how well DRAM serves W-channel pieces at a stride of C channels. This copies the whole tensor
slice by slice (slice-major order, so the blocks running at once all read one slice) and compares it with a plain
copy of the same bytes:

    python scripts/probe_sector_copy.py [--shapes 1x128x1024x1024,1x512x256x256] [--widths 8,16,32,64]

Without a GPU it checks the copy kernel's indexing on a tiny tensor in Triton's interpreter (no times).
"""
import argparse
import os
import sys

if __name__ == "__main__" and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _slice_major_copy(x_ptr, out_ptr, P, C, W: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (slice s, block b) copies pixels [b * BLOCK_P, ...) of channels [s * W, s * W + W). Slices vary
    slowest in the program id, so the programs resident at once read the same slice."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(P, BLOCK_P)
    s = pid // blocks
    b = pid % blocks
    pixels = b * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = s * W + tl.arange(0, W)
    offsets = pixels[:, None].to(tl.int64) * C + channels[None, :]
    mask = pixels[:, None] < P
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


def slice_major_copy(x: torch.Tensor, out: torch.Tensor, width: int, block_bytes: int = 16384) -> None:
    """out = x for channels_last (N, C, H, W) tensors (N * H * W pixels of C contiguous channels), slice by slice."""
    N, C, H, Wd = x.shape
    P = N * H * Wd
    block_p = max(16, triton.next_power_of_2(block_bytes // (width * x.element_size())))
    grid = (C // width * triton.cdiv(P, block_p),)
    _slice_major_copy[grid](x, out, P, C, W=width, BLOCK_P=block_p, num_warps=4)


def parse_shape(text: str) -> tuple:
    return tuple(int(v) for v in text.split("x"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x128x1024x1024,1x256x512x512,1x512x256x256")
    p.add_argument("--widths", default="8,16,32,64", help="channels per slice (fp16: 2 bytes each)")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    if not torch.cuda.is_available():
        x = torch.randn(1, 64, 5, 7).to(memory_format=torch.channels_last)
        for width in widths:
            if 64 % width == 0:
                out = torch.full_like(x, float("nan"))
                slice_major_copy(x, out, width, block_bytes=64)
                assert torch.equal(out, x), f"width {width}"
        print("no GPU: the slice-major copy is exact on a tiny tensor in the interpreter (no times)")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16, "
          "median of triton.testing.do_bench; GB/s count one read and one write of the tensor")
    for shape in map(parse_shape, args.shapes.split(",")):
        x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        out = torch.empty_like(x)
        moved = 2 * x.numel() * x.element_size()
        plain = triton.testing.do_bench(lambda: out.copy_(x), return_mode="median")
        line = [f"{'x'.join(map(str, shape))} ({x.numel() * 2 >> 20} MiB): copy {plain * 1e3:7.1f} us "
                f"({moved / plain / 1e6:5.0f} GB/s)"]
        for width in widths:
            if shape[1] % width:
                continue
            out.fill_(float("nan"))
            slice_major_copy(x, out, width)
            if not torch.equal(out, x):
                print(f"WRONG: width {width} at {shape}")
                return 1
            ms = triton.testing.do_bench(lambda: slice_major_copy(x, out, width), return_mode="median")
            line.append(f"{width * 2:3d} B slices {ms * 1e3:7.1f} us ({100 * plain / ms:3.0f}% of copy)")
        print(" | ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
