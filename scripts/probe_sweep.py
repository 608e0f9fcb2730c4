"""What the GPU probes share: time a call only after checking its output, and sweep tile configs that way."""
import triton

from sdkernels.testing import relative_error


def graph_us(fn, rep=100) -> float:
    """Microseconds per call: the median of CUDA-graph replays (triton.testing.do_bench_cudagraph)."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep) * 1e3


def checked_us(call, out, expected, time_us, bound=1e-2):
    """(microseconds, note): call() writes `out`, poisoned with NaN first, and is timed with time_us(call) only if
    its relative error against `expected` is below `bound`; (inf, why) when it is wrong or fails to compile."""
    try:
        out.fill_(float("nan"))
        call()
        err = relative_error(out, expected)
        if not err < bound:
            return float("inf"), f"WRONG {err:.2g}"
        return time_us(call), ""
    except Exception as e:  # noqa: BLE001  (a config the compiler refuses)
        return float("inf"), type(e).__name__


def sweep(configs, call_with, out, expected, time_us):
    """[(microseconds, config, note)] for call_with(config) over the configs, fastest first."""
    results = []
    for config in configs:
        us, note = checked_us(lambda: call_with(config), out, expected, time_us)
        results.append((us, config, note))
    return sorted(results, key=lambda r: r[0])
