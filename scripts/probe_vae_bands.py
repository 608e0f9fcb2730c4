"""VAE decode at 1024 px on the GPU with the band forwards (sdkernels.banded) at several band sizes and without:
median ms (CUDA events) and peak MiB of each, and the top kernels of one banded decode (torch.profiler).
    python scripts/probe_vae_bands.py [--res 1024]"""
import argparse
import copy

import torch

import sdkernels
from sdkernels import banded, models
from sdkernels.benchmarking import bench_ms


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    args = ap.parse_args()
    torch.set_default_device("cuda")
    vae = models.build("vae", init="unit", dtype=torch.float16).to(memory_format=torch.channels_last)
    (latents,), _ = models.model_inputs(vae, 1, args.res)
    eager = lambda: vae.decode(latents).sample  # noqa: E731
    print(f"eager: {bench_ms(eager):.2f} ms, peak {peak_mib(eager):.0f} MiB", flush=True)
    patched = sdkernels.patch(copy.deepcopy(vae))
    run = lambda: patched.decode(latents).sample  # noqa: E731
    for band_mib in (0, 16, 32, 64):
        banded.MIN_BYTES = (64 << 20) if band_mib else (1 << 50)
        banded.BAND_BYTES = max(band_mib, 1) << 20
        run()
        print(f"bands of {band_mib} MiB: {bench_ms(run):.2f} ms, peak {peak_mib(run):.0f} MiB", flush=True)
    banded.MIN_BYTES, banded.BAND_BYTES = 64 << 20, 32 << 20
    run()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    banded.MIN_BYTES = 1 << 50
    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
