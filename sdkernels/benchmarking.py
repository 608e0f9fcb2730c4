"""What every benchmark shares: timing, machine facts, and the results file format. It lives in the package, not in
bench/, so that the installed ``python -m sdkernels.bench`` writes the same results as the scripts of a checkout.

Results file (bench/results/<name>.json in a checkout):
    {"gpu", "torch", "triton", "date", "copy_gbps", "rows": [{"bench", "case", "dtype", "ours_ms", "baseline",
     "baseline_ms", "speedup", "gbps", ...}]}
one row per case and baseline; "speedup" is baseline_ms / ours_ms.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def as_cuda_graph(fn, pool=None):
    """fn captured once (after a warm-up on a side stream) into a CUDA graph; returns the replay function, which
    returns what fn returned during capture (its static output, rewritten by each replay). The tensors fn reads are
    the graph's static input buffers: copy new inputs into them, never rebind them. Timing replays measures the GPU
    work without the Python and launch overhead of each call. ``pool`` (torch.cuda.graph_pool_handle()) lets
    graphs that never run at the same time share their memory (sdkernels.graphs captures one per input shape)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, graph: bool = False, cpu_calls: int = 3,
             cpu_warmup: bool = True) -> float:
    """Median time of fn() in milliseconds: triton.testing.do_bench (CUDA events, L2 flushed between runs) on a
    GPU, of CUDA-graph replays when ``graph``; on the CPU (interpreter smoke runs) the wall-clock median of
    ``cpu_calls`` calls (after a warm-up call unless the caller made one), which means nothing for speed and costs
    seconds a call in the interpreter."""
    if on_gpu():
        from triton.testing import do_bench
        if graph:
            fn = as_cuda_graph(fn)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    if cpu_warmup:
        fn()
    times = []
    for _ in range(cpu_calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def paired_ms(baseline, step, rounds: int = 12, block: int = 5) -> dict:
    """A host-bound step (a UNet step without CUDA graphs) against its baseline, timed in alternating blocks of
    ``block`` consecutive calls, the order reversed every other round: a shared host's speed drifts by tens of
    percent within minutes, which steps timed one after the other read as a difference between them, while blocks
    keep each step's own code warm in the CPU's caches as a loop of it does. Medians of per-call ms: CPU time of
    this thread and wall time (a block's calls, then the GPU finished), and of the per-round ratios baseline/step.
    """
    sync = torch.cuda.synchronize if on_gpu() else (lambda: None)
    for fn in (baseline, step):
        for _ in range(3):
            fn()
    sync()
    cpu, wall = {baseline: [], step: []}, {baseline: [], step: []}
    for i in range(rounds):
        for fn in (baseline, step) if i % 2 == 0 else (step, baseline):
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            for _ in range(block):
                fn()
            cpu[fn].append((time.thread_time() - start_cpu) / block * 1e3)
            sync()
            wall[fn].append((time.perf_counter() - start_wall) / block * 1e3)
    median = statistics.median
    return dict(baseline_cpu=median(cpu[baseline]), cpu=median(cpu[step]),
                baseline_wall=median(wall[baseline]), wall=median(wall[step]),
                cpu_ratio=median(b / s for b, s in zip(cpu[baseline], cpu[step])),
                wall_ratio=median(b / s for b, s in zip(wall[baseline], wall[step])))


def l2_cache_bytes() -> int:
    """The current GPU's L2 cache size (H100: 50 MiB, H200: 60 MiB); 50 MiB where torch does not say."""
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 50 * 2**20


def input_sets(make, bytes_per_set: int, most: int = 32) -> list:
    """Enough independent input sets (make() each) that cycling through them overflows the L2 cache three times,
    so repeated calls read device memory as a real model's layers do, not a cache-resident copy."""
    l2 = l2_cache_bytes() if on_gpu() else 0
    count = max(1, min(most, -(-3 * l2 // max(bytes_per_set, 1))))
    return [make() for _ in range(count)]


def bench_rotating_ms(fn, sets: list, warmup_ms: float = 25, rep_ms: float = 100, graph: bool = True) -> float:
    """Time per call of fn(*set), cycling through the input sets. With ``graph``, one CUDA graph holds one call per
    set back to back, as the layers of a captured model run, and the time of a replay is divided by their count:
    the launch overhead of a lone graph replay does not land on small kernels."""
    calls = [lambda s=s: fn(*s) for s in sets]
    if graph and on_gpu():
        def all_calls():
            for call in calls:
                call()
        return bench_ms(all_calls, warmup_ms, rep_ms, graph=True) / len(calls)
    state = {"i": 0}

    def next_call():
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()
    return bench_ms(next_call, warmup_ms, rep_ms)


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if on_gpu():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(gpu=None, note="no GPU: Triton interpreter on the CPU, times are not speed")
    return info


_copy_gbps = None


def copy_bandwidth_gbps() -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second), the memory-bound ceiling."""
    global _copy_gbps
    if not on_gpu():
        return None
    if _copy_gbps is None:
        src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        ms = bench_ms(lambda: dst.copy_(src))
        _copy_gbps = 2 * src.numel() / ms / 1e6
    return _copy_gbps


class Results:
    """Rows of one benchmark run, written as JSON with the machine facts."""

    def __init__(self, name: str):
        self.name = name
        self.rows = []
        self.meta = {}  # run-wide facts (e.g. how times were taken), written beside the machine facts

    def add(self, bench: str, case: str, dtype, ours_ms: float, baseline: str, baseline_ms: float,
            bytes_moved: float | None = None, flops: float | None = None, **extra) -> dict:
        row = {"bench": bench, "case": case, "dtype": str(dtype).replace("torch.", ""), "ours_ms": ours_ms,
               "baseline": baseline, "baseline_ms": baseline_ms, "speedup": baseline_ms / ours_ms}
        if bytes_moved is not None:
            row["gbps"] = bytes_moved / ours_ms / 1e6
            row["baseline_gbps"] = bytes_moved / baseline_ms / 1e6
        if flops is not None:
            row["tflops"] = flops / ours_ms / 1e9
            row["baseline_tflops"] = flops / baseline_ms / 1e9
        row.update(extra)
        self.rows.append(row)
        return row

    def write(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # The package's knobs set for this run (e.g. SDKERNELS_GN_PLAN): rows of two runs differ by these.
        knobs = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SDKERNELS_")}
        doc = dict(machine(), copy_gbps=copy_bandwidth_gbps(), knobs=knobs, **self.meta, rows=self.rows)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        return path

    def table(self) -> str:
        lines = [f"{'bench':24s} {'case':36s} {'dtype':8s} {'ours ms':>9s} {'baseline':>10s} {'base ms':>9s} "
                 f"{'speedup':>7s} {'GB/s':>7s} {'TFLOP/s':>7s}"]
        for r in self.rows:
            gb = f"{r['gbps']:7.0f}" if "gbps" in r else " " * 7
            tf = f"{r['tflops']:7.1f}" if "tflops" in r else " " * 7
            lines.append(f"{r['bench']:24s} {r['case']:36s} {r['dtype']:8s} {r['ours_ms']:9.4f} "
                         f"{r['baseline']:>10s} {r['baseline_ms']:9.4f} {r['speedup']:7.2f} {gb} {tf}")
        return "\n".join(lines)
