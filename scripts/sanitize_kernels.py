"""Every kernel once on odd shapes, for compute-sanitizer memcheck (scripts/gpu_lane.sh runs it). Each backend is
forced strictly so nothing silently takes the reference path; results are checked against the reference."""
import torch

import sdkernels
from sdkernels.ops import attention_reference, geglu_reference, gelu_reference, group_norm_reference, linear_geglu_reference
from sdkernels.testing import assert_close, relative_error


def group_norm_cases():
    for backend, layout in (("triton", torch.contiguous_format), ("triton", torch.channels_last),
                            ("cuda", torch.channels_last)):
        for shape, G in (((1, 24, 7, 9), 3), ((3, 40, 13, 5), 4), ((2, 80, 33, 31), 8), ((1, 16, 97, 101), 2)):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout)
                w = torch.randn(shape[1], device="cuda", dtype=dtype)
                r = torch.randn_like(x)
                yield backend, (x, G, w, w, 1e-5, True, r)


def geglu_cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for rows, inner, k in ((1, 37, 24), (77, 100, 40), (130, 1280, 320)):
            h = torch.randn(rows, 2 * inner, device="cuda", dtype=dtype)
            yield "gelu", sdkernels.gelu, gelu_reference, (h[:, 1:], "none")
            yield "geglu", sdkernels.geglu, geglu_reference, (h, "none")
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            w = torch.randn(2 * inner, k, device="cuda", dtype=dtype) / k**0.5
            b = torch.randn(2 * inner, device="cuda", dtype=dtype)
            yield "linear_geglu", sdkernels.linear_geglu, linear_geglu_reference, (x, w, b, "none")


def attention_cases():
    """Odd token counts (masked tails), each kernel head dim, diffusers' layout and (B, H, N, d), a key mask."""
    for backend in ("flash", "partial_softmax", "partial_softmax_cuda"):
        for dtype in (torch.float16, torch.bfloat16):
            for B, H, N, Nk, d in ((1, 3, 77, 77, 40), (2, 2, 131, 77, 64), (1, 2, 65, 300, 80), (2, 1, 33, 19, 128),
                                   (1, 1, 17, 129, 160)):
                q = torch.randn(B, N, H * d, device="cuda", dtype=dtype)
                k, v = (torch.randn(B, Nk, H * d, device="cuda", dtype=dtype) for _ in range(2))
                mask = torch.where(torch.rand(B, 1, 1, Nk, device="cuda") < 0.3, -10000.0, 0.0).to(dtype)
                yield backend, (q, k, v, d ** -0.5, mask, H)
                yield backend, (q.unflatten(-1, (H, d)).transpose(1, 2), k.unflatten(-1, (H, d)).transpose(1, 2),
                                v.unflatten(-1, (H, d)).transpose(1, 2), d ** -0.5, None, 0)


def main():
    n = 0
    for backend, args in group_norm_cases():
        with sdkernels.use_backend(backend, strict=True):
            out = sdkernels.group_norm(*args)
        assert_close(out, group_norm_reference(*args), args[0].dtype, what=f"group_norm {backend}")
        n += 1
    for name, op, reference, args in geglu_cases():
        with sdkernels.use_backend("triton", strict=True):
            out = op(*args)
        expected = reference(*args)
        rel = relative_error(out, expected)
        assert rel < 2e-2, f"{name} {args[0].dtype}: relative error {rel:.3g}"
        n += 1
    for backend, args in attention_cases():
        with sdkernels.use_backend(backend, strict=True):
            out = sdkernels.flash_attention(*args[:3], scale=args[3], attn_mask=args[4], heads=args[5])
        rel = relative_error(out, attention_reference(*args))
        assert rel < 2e-2, f"flash_attention {backend} {args[0].dtype} {tuple(args[0].shape)}: relative error {rel:.3g}"
        n += 1
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {n} kernel calls checked")


if __name__ == "__main__":
    main()
