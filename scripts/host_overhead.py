"""Host (CPU) time per call of each op and of patched diffusers modules on tiny CUDA inputs, where the GPU work is
negligible and the time is Python, dispatch and kernel launches: ours next to eager PyTorch's. Without CUDA graphs
this overhead is what a patched UNet step pays per op (SD1.5's eager step is launch-bound on an H100).
    python scripts/host_overhead.py [--profile]      (--profile: where the patched modules' host time goes)"""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import sdkernels

DEVICE = "cuda"
CALLS = 300


def host_us(fn) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / CALLS * 1e6


def op_cases():
    h = torch.randn(2, 64, 8, 8, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(64, device=DEVICE, dtype=torch.float16)
    yield ("group_norm+silu", lambda: sdkernels.group_norm(h, 32, w, w, 1e-5, True),
           lambda: F.silu(F.group_norm(h, 32, w, w, 1e-5)))
    g = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.float16)
    yield "geglu", lambda: sdkernels.geglu(g), lambda: (lambda a, b: a * F.gelu(b))(*g.chunk(2, -1))
    x = torch.randn(2, 64, 64, device=DEVICE, dtype=torch.float16)
    lw = torch.randn(256, 64, device=DEVICE, dtype=torch.float16)
    lb = torch.randn(256, device=DEVICE, dtype=torch.float16)
    yield ("linear_geglu", lambda: sdkernels.linear_geglu(x, lw, lb),
           lambda: (lambda a, b: a * F.gelu(b))(*F.linear(x, lw, lb).chunk(2, -1)))
    q = torch.randn(2, 64, 2 * 64, device=DEVICE, dtype=torch.float16)
    q4 = q.view(2, 64, 2, 64).transpose(1, 2)
    yield ("attention d=64", lambda: sdkernels.flash_attention(q, q, q, heads=2),
           lambda: F.scaled_dot_product_attention(q4, q4, q4))


def module_cases():
    import copy
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D
    block = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32, groups=32).to(DEVICE).half().eval()
    x = torch.randn(2, 64, 8, 8, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
    t = torch.randn(2, 32, device=DEVICE, dtype=torch.float16)
    patched = sdkernels.patch(copy.deepcopy(block))
    yield "ResnetBlock2D", lambda: patched(x, t), lambda: block(x, t)
    ff = FeedForward(64, activation_fn="geglu").to(DEVICE).half().eval()
    patched_ff = sdkernels.patch(copy.deepcopy(ff))
    y = torch.randn(2, 64, 64, device=DEVICE, dtype=torch.float16)
    yield "FeedForward", lambda: patched_ff(y), lambda: ff(y)


def main():
    print(f"host time per call, us ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    print(f"  {'case':20s} {'sdkernels':>10s} {'eager':>10s} {'extra':>10s}")
    with torch.no_grad():
        for cases in (op_cases, module_cases):
            for name, ours, eager in cases():
                a, b = host_us(ours), host_us(eager)
                print(f"  {name:20s} {a:10.1f} {b:10.1f} {a - b:10.1f}")
        if "--profile" in sys.argv:
            for name, ours, _ in module_cases():
                profiler = cProfile.Profile()
                profiler.runcall(lambda: [ours() for _ in range(CALLS)])
                print(f"\n== {name}, patched: {CALLS} calls, by own time")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
