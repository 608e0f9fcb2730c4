"""Probe (GPU): where the host time of one Triton launch goes (issue 5: the patched UNet step without CUDA graphs is
host-bound), to decide whether launching through a cached compiled kernel is worth building.

A tiny kernel with a launch signature like sdkernels' GroupNorm tile (4 pointers, 7 ints, a float, 3 constexprs,
num_warps) is launched in loops of 256 (the GPU queue never fills: one program, ~2 us of GPU time each); host time
per launch, median of 7 loops, for:
  public        kernel[grid](...), Triton's public path (JITFunction.run)
  device+stream driver.active.get_current_device() and get_current_stream()
  binder        the generated binder (bind + native specialization)
  cache key     compute_cache_key of that specialization
  metadata      CompiledKernel.launch_metadata
  compiled.run  CompiledKernel.run(...) alone, the arguments already in hand
  signature     kernels/launch.py's launch signature of the arguments
  cached        the same kernel under @cached_launch (kernels/launch.py), launched again: what sdkernels' kernels do
and the host time of one sdkernels.group_norm call at 2x320x32x32 channels_last (fp16, SiLU), the op as patch() runs
it, for scale.

    python scripts/probe_launch_cost.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _tiny_fn(x_ptr, w_ptr, b_ptr, out_ptr, N, C, HW, G, sxn, sxc, sxs, eps,
          BLOCK: tl.constexpr, SILU: tl.constexpr, AFFINE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < N * C, other=0.0).to(tl.float32)
    if AFFINE:
        v = v * tl.load(w_ptr + offs % C, mask=offs < C, other=1.0).to(tl.float32)
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    tl.store(out_ptr + offs, (v + eps).to(out_ptr.dtype.element_ty), mask=offs < N * C)


_tiny = triton.jit(_tiny_fn)


def host_us(fn, loops=7, n=256):
    times = []
    for _ in range(loops):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        times.append((time.perf_counter_ns() - t0) / n / 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main():
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key

    from sdkernels.kernels.launch import cached_launch, signature_key

    torch.manual_seed(0)
    x = torch.randn(2, 320, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(320, device="cuda", dtype=torch.float16)
    b = torch.randn(320, device="cuda", dtype=torch.float16)
    out = torch.empty(x.numel(), device="cuda", dtype=x.dtype)  # flat: the kernel writes out[:BLOCK]
    args = (x, w, b, out, 2, 320, 1024, 32, x.stride(0), x.stride(1), x.stride(2), 1e-5)
    consts = dict(BLOCK=128, SILU=True, AFFINE=True)
    grid = (1,)
    compiled = _tiny[grid](*args, **consts, num_warps=4)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    kernel_cache, kernel_key_cache, target, backend, binder = _tiny.device_caches[device]
    bound, specialization, options = binder(*args, **consts, num_warps=4, debug=False)
    values = tuple(bound.values())
    metadata = compiled.launch_metadata(grid, stream, *values)
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    tiny_cached = cached_launch(triton.jit(_tiny_fn))

    def run_compiled():
        compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *values)

    def cached():
        tiny_cached[grid](*args, **consts, num_warps=4)

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print("host us per launch (median of 7 loops of 256)")
    rows = [
        ("public", lambda: _tiny[grid](*args, **consts, num_warps=4)),
        ("device+stream", lambda: driver.active.get_current_stream(driver.active.get_current_device())),
        ("binder", lambda: binder(*args, **consts, num_warps=4, debug=False)),
        ("cache key", lambda: compute_cache_key(kernel_key_cache, specialization, options)),
        ("metadata", lambda: compiled.launch_metadata(grid, stream, *values)),
        ("compiled.run", run_compiled),
        ("signature", lambda: signature_key(args, dict(consts, num_warps=4))),
        ("cached", cached),
    ]
    for name, fn in rows:
        fn()
        print(f"  {name:<16} {host_us(fn):7.2f}")
    # The cached launch must compute what the public one does.
    ref = out[:128].clone()
    out.fill_(float("nan"))
    cached()
    torch.cuda.synchronize()
    print("  cached launch writes the same output:", torch.equal(out[:128], ref))

    import sdkernels
    gn = lambda: sdkernels.group_norm(x, 32, w, b, 1e-5, silu=True)  # noqa: E731
    gn()
    print(f"  sdkernels.group_norm 2x320x32x32 channels_last silu: {host_us(gn):7.2f} us host per call")
    from sdkernels.kernels import launch
    launch.ENABLED = False
    print(f"  the same, its launch through Triton's path:          {host_us(gn):7.2f} us host per call")
    launch.ENABLED = True
    eager = lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-5))  # noqa: E731
    eager()
    print(f"  eager F.group_norm then F.silu, same shape:         {host_us(eager):7.2f} us host per call")


if __name__ == "__main__":
    main()
