"""Where a patched, graphed denoising loop loses time against its UNet steps: the loop's wall time next to 20 UNet
graph replays back to back, the GPU's idle time inside the loop (torch.profiler's device events), and the host
functions of one loop by cumulative time (cProfile).
    python scripts/probe_loop_gaps.py [--model sd15] [--steps 20] [--scheduler ddim] [--top 25]"""
import argparse
import cProfile
import pstats
import time

import torch

import sdkernels
from sdkernels import models, pipelines


def wall_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def gpu_idle_us(fn):
    """(GPU busy us, loop window us, idle gaps > 5 us as (count, total us)) of one call of fn."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, gaps, end = 0.0, [], spans[0][0]
    for s, e in spans:
        if s > end:
            gaps.append(s - end)
        if e > end:
            busy += e - max(s, end)
            end = e
    big = [g for g in gaps if g > 5]
    return busy, end - spans[0][0], len(big), sum(big), sorted(big)[-8:]


def host_path_us(fn, steps):
    """Per step, the host's time from the end of each wait for the GPU (a sync: DDIM indexes a CPU tensor by the GPU
    timestep) to the next CUDA graph launch, while the GPU idles: (median us, the ops run in those windows by total
    us)."""
    from collections import defaultdict
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
             or e.name == "aten::_local_scalar_dense"]
    launches = [e for e in events if e.name == "cudaGraphLaunch"]
    windows = []
    for launch in launches:
        before = [s.time_range.end for s in syncs if s.time_range.end <= launch.time_range.start]
        if before:
            windows.append((max(before), launch.time_range.start))
    ops = defaultdict(float)
    for e in events:
        if e.name.startswith("aten::") or e.name.startswith("cuda"):
            for a, b in windows:
                if a <= e.time_range.start and e.time_range.end <= b:
                    ops[e.name] += (e.time_range.end - e.time_range.start) / max(len(windows), 1)
    gaps = sorted(b - a for a, b in windows)
    return (gaps[len(gaps) // 2] if gaps else float("nan")), sorted(ops.items(), key=lambda kv: -kv[1])[:15]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    with torch.device("cuda"):  # (not set_default_device: its mode would then intercept every call of the loop)
        unet = models.build(a.model, init="unit", dtype=torch.float16).to(memory_format=torch.channels_last)
    _, kwargs = models.model_inputs(unet, batch=2, resolution=models.spec(a.model).resolution)
    sdkernels.patch(unet, cuda_graph=True)
    scheduler = pipelines.make_scheduler(a.scheduler)
    latents, states, added = pipelines.loop_inputs(kwargs, images=1)

    def loop():
        return pipelines.denoise(unet, scheduler, latents, states, a.steps, added_cond_kwargs=added)

    def steps_only():
        for _ in range(a.steps):
            unet(**kwargs)

    loop_ms, step_ms = wall_ms(loop), wall_ms(steps_only)
    print(f"{a.model} {a.scheduler}: loop {loop_ms:.2f} ms = {loop_ms / a.steps:.3f} ms/step; {a.steps} graphed "
          f"UNet calls back to back {step_ms:.2f} ms = {step_ms / a.steps:.3f} ms/step; "
          f"difference {(loop_ms - step_ms) / a.steps:.3f} ms/step")
    for name, fn in (("loop", loop), ("unet calls", steps_only)):
        busy, window, n, idle, largest = gpu_idle_us(fn)
        print(f"{name}: GPU busy {busy / 1e3:.2f} of {window / 1e3:.2f} ms; {n} gaps > 5 us, {idle / 1e3:.2f} ms "
              f"({idle / a.steps:.0f} us/step); largest {[round(g) for g in largest]}")
    median, ops = host_path_us(loop, a.steps)
    print(f"host time from a sync to the next graph launch: median {median:.0f} us; ops in those windows (us/step):")
    for name, us in ops:
        print(f"  {us:8.1f}  {name}")
    prof = cProfile.Profile()
    prof.enable()
    loop()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
