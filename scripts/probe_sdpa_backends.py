"""Time each of torch's SDPA backends (flash, cuDNN, memory-efficient) and our flash kernel at the attention shapes
of SD1.5 / SDXL, inputs in diffusers' (B, N, heads * d) layout viewed as (B, heads, N, d) (strided, as the
attention op gets them), and print each one's relative error against the fp32 reference:
    python scripts/probe_sdpa_backends.py [--dtype fp16|bf16]
A backend that refuses a shape prints why (its first line)."""
import argparse
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdkernels import dispatch
from sdkernels.benchmarking import bench_ms
from sdkernels.ops.attention import as_bhnd, attention_reference, flash_attention
from sdkernels.testing import relative_error

CASES = (  # B, heads, N, Nk, d
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64),
    (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64), (2, 10, 16384, 16384, 64), (1, 1, 16384, 16384, 512),
)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[parser.parse_args().dtype]
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for B, H, N, Nk, d in CASES:
        q, k, v = (torch.randn(B, n, H * d, device="cuda", dtype=dtype) for n in (N, Nk, Nk))
        q4, k4, v4 = (as_bhnd(t, H) for t in (q, k, v))
        flops = 4 * B * H * N * Nk * d
        expected = attention_reference(q, k, v, d ** -0.5, None, H) if N * Nk <= 4096 * 4096 else None
        line = [f"B={B},H={H},N={N},Nk={Nk},d={d}:"]
        runs = {name: (lambda b=backend: _sdpa(b, q4, k4, v4)) for name, backend in BACKENDS.items()}
        runs["default"] = lambda: F.scaled_dot_product_attention(q4, k4, v4)
        runs["ours_flash"] = lambda: _ours(q, k, v, H)
        for name, run in runs.items():
            try:
                out = run()
                ms = bench_ms(run)
            except Exception as error:  # a backend that refuses the shape says why
                line.append(f"{name}=refused({str(error).splitlines()[0][:60]})")
                continue
            err = "" if expected is None else f" err={relative_error(_as_bnd(out, q), expected):.1e}"
            line.append(f"{name}={1e3 * ms:.1f}us({flops / ms / 1e9:.0f}TF{err})")
        print(" ".join(line), flush=True)


def _sdpa(backend, q4, k4, v4):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q4, k4, v4)


def _ours(q, k, v, heads):
    with dispatch.use_backend("flash", op="flash_attention", strict=True):
        return flash_attention(q, k, v, heads=heads)


def _as_bnd(out, q):
    return out if out.shape == q.shape else out.transpose(1, 2).reshape(q.shape[:-1] + (-1,))


if __name__ == "__main__":
    main()
