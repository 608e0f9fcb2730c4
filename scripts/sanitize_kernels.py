"""Every kernel once on odd shapes, for compute-sanitizer memcheck (scripts/gpu_lane.sh runs it). Each backend is
forced strictly so nothing silently takes the reference path; results are checked against the reference."""
import torch

import sdkernels
from sdkernels.ops import geglu_reference, gelu_reference, group_norm_reference, linear_geglu_reference
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
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {n} kernel calls checked")


if __name__ == "__main__":
    main()
