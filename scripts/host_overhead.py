"""Host (CPU) time per call of each op and of patched diffusers modules on tiny CUDA inputs, where the GPU work is
negligible and the time is Python, dispatch and kernel launches: ours next to eager PyTorch's. Without CUDA graphs
this overhead is what a patched UNet step pays per op (SD1.5's eager step is launch-bound on an H100).
    python scripts/host_overhead.py [--profile] [--sd15]
(--profile: where the patched modules' host time goes; --sd15: SD1.5's largest shapes instead of tiny ones, with
patch()'s measured backend choices on, so each op runs what it runs in a patched step)"""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import sdkernels
from sdkernels import dispatch, tuning

DEVICE = "cuda"
CALLS = 300
# Sizes of the cases: tiny (GPU work negligible), or SD1.5's first level at batch 2, 512 px (tokens 4096, width 320)
SIZES = dict(batch=2, width=64, side=8, tokens=64, heads=2, head_dim=64)
SD15_SIZES = dict(batch=2, width=320, side=64, tokens=4096, heads=8, head_dim=40)


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
    B, C, S, N, H = (SIZES[k] for k in ("batch", "width", "side", "tokens", "heads"))
    h = torch.randn(B, C, S, S, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(C, device=DEVICE, dtype=torch.float16)
    yield ("group_norm+silu", lambda: sdkernels.group_norm(h, 32, w, w, 1e-5, True),
           lambda: F.silu(F.group_norm(h, 32, w, w, 1e-5)))
    g = torch.randn(B, N, 8 * C, device=DEVICE, dtype=torch.float16)
    yield "geglu", lambda: sdkernels.geglu(g), lambda: (lambda a, b: a * F.gelu(b))(*g.chunk(2, -1))
    x = torch.randn(B, N, C, device=DEVICE, dtype=torch.float16)
    lw = torch.randn(8 * C, C, device=DEVICE, dtype=torch.float16)
    lb = torch.randn(8 * C, device=DEVICE, dtype=torch.float16)
    yield ("linear_geglu", lambda: sdkernels.linear_geglu(x, lw, lb),
           lambda: (lambda a, b: a * F.gelu(b))(*F.linear(x, lw, lb).chunk(2, -1)))
    D = SIZES["head_dim"]
    q = torch.randn(B, N, H * D, device=DEVICE, dtype=torch.float16)
    q4 = q.view(B, N, H, D).transpose(1, 2)
    yield (f"attention d={D}", lambda: sdkernels.flash_attention(q, q, q, heads=H),
           lambda: F.scaled_dot_product_attention(q4, q4, q4))


def module_cases():
    import copy
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D
    B, C, S, N = (SIZES[k] for k in ("batch", "width", "side", "tokens"))
    block = ResnetBlock2D(in_channels=C, out_channels=C, temb_channels=32, groups=32).to(DEVICE).half().eval()
    block.to(memory_format=torch.channels_last)
    x = torch.randn(B, C, S, S, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
    t = torch.randn(B, 32, device=DEVICE, dtype=torch.float16)
    patched = sdkernels.patch(copy.deepcopy(block))
    yield "ResnetBlock2D", lambda: patched(x, t), lambda: block(x, t)
    ff = FeedForward(C, activation_fn="geglu").to(DEVICE).half().eval()
    patched_ff = sdkernels.patch(copy.deepcopy(ff))
    y = torch.randn(B, N, C, device=DEVICE, dtype=torch.float16)
    yield "FeedForward", lambda: patched_ff(y), lambda: ff(y)


def main():
    if "--sd15" in sys.argv:
        SIZES.update(SD15_SIZES)
        tuning.enable()  # as patch() does: each op runs the backend measured fastest for its shape
    print(f"host time per call, us ({torch.cuda.get_device_name()}, torch {torch.__version__}; sizes {SIZES})")
    print(f"  {'case':20s} {'sdkernels':>10s} {'eager':>10s} {'extra':>10s}  backends")
    with torch.no_grad():
        for cases in (op_cases, module_cases):
            for name, ours, eager in cases():
                dispatch._last_backend.clear()
                a, b = host_us(ours), host_us(eager)
                backends = {op: dispatch.last_backend(op) for op in dispatch.ops()}
                print(f"  {name:20s} {a:10.1f} {b:10.1f} {a - b:10.1f}  "
                      + ", ".join(f"{k}={v}" for k, v in backends.items() if v))
        if "--profile" in sys.argv:
            for name, ours, _ in module_cases():
                profiler = cProfile.Profile()
                profiler.runcall(lambda: [ours() for _ in range(CALLS)])
                print(f"\n== {name}, patched: {CALLS} calls, by own time")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
