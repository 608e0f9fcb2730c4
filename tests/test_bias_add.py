"""sdkernels::add_bias_residual_ against its float64 definition: NHWC and NCHW tensors, odd sizes, every dtype, bias,
residual and scale each optional, layouts the kernel refuses (reference with a warning), errors, torch integration."""
import warnings

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import sdkernels
from sdkernels import dispatch
from sdkernels.ops.bias_add import OP, add_bias_residual_, add_bias_residual_reference
from sdkernels.testing import assert_close
from conftest import DEVICE, GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["channels_last", "contiguous", "strided", "residual_other_layout"]


def make(n, c, h, w, dtype, layout, bias, residual):
    def rand(*shape):
        return (torch.randn(shape, device=DEVICE) * 2).to(dtype)

    y = rand(n, c, h, w)
    if layout in ("channels_last", "residual_other_layout"):
        y = y.to(memory_format=torch.channels_last)
    if layout == "strided":  # every other channel of a wider tensor: not dense
        y = rand(n, 2 * c, h, w)[:, ::2]
    r = rand(n, c, h, w) if residual else None
    if r is not None and layout == "channels_last":
        r = r.to(memory_format=torch.channels_last)
    return y, rand(c) if bias else None, r


def run(y, b, r, scale):
    """The triton backend where it takes the input (checked that it ran), else the reference."""
    supported = dispatch.ops()[OP].reasons(y, b, r, scale)["triton"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        with sdkernels.use_backend("triton", op=OP, strict=supported):
            out = add_bias_residual_(y, b, r, scale)
    assert dispatch.last_backend(OP) == ("triton" if supported else "reference")
    return out, supported


@given(n=st.integers(1, 3), c=st.one_of(st.sampled_from([1, 8, 320]), st.integers(1, 70)),
       h=st.integers(1, 20), w=st.integers(1, 20), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       bias=st.booleans(), residual=st.booleans(), scale=st.sampled_from([1.0, 0.5, 1 / 1.4142, -3.0]))
def test_matches_the_float64_definition(n, c, h, w, dtype, layout, bias, residual, scale):
    y, b, r = make(n, c, h, w, dtype, layout, bias, residual)
    expected = add_bias_residual_reference(y.double(), None if b is None else b.double(),
                                           None if r is None else r.double(), scale)
    strides = y.stride()
    out, supported = run(y, b, r, scale)
    note(f"triton ran: {supported}")
    assert out is y and out.stride() == strides
    assert_close(out, expected, dtype, what=f"{layout} {tuple(y.shape)} {dtype}")
    if layout in ("channels_last", "contiguous") and c > 1 and h * w > 1:
        assert supported


def test_refused_layouts_take_the_reference_with_a_warning():
    y, b, r = make(2, 6, 3, 5, torch.float32, "residual_other_layout", True, True)
    expected = add_bias_residual_reference(y.clone(), b, r, 2.0)
    assert dispatch.ops()[OP].reasons(y, b, r, 2.0)["triton"] == "residual's strides differ from y's"
    dispatch._warned.clear()  # one warning per reason and process: an earlier test may have had it
    with pytest.warns(sdkernels.SdkernelsFallbackWarning):
        out = add_bias_residual_(y, b, r, 2.0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("args, message", [
    ((torch.ones(3),), "y must be a floating-point \\(N, C, ...\\)"),
    ((torch.ones(2, 4, 3, 3, dtype=torch.int32),), "y must be a floating-point"),
    ((torch.ones(2, 4, 3, 3), torch.ones(3)), "bias must have shape \\(4,\\)"),
    ((torch.ones(2, 4, 3, 3), torch.ones(4, dtype=torch.float16)), "bias has dtype torch.float16"),
    ((torch.ones(2, 4, 3, 3), None, torch.ones(2, 4, 3, 2)), "residual must have shape \\(2, 4, 3, 3\\)"),
    ((torch.ones(2, 4, 3, 3), None, None, float("inf")), "scale=inf must be a finite number"),
], ids=["rank", "dtype", "bias_shape", "bias_dtype", "residual_shape", "scale"])
def test_invalid_inputs_raise_naming_the_op_and_the_reason(args, message):
    with pytest.raises(ValueError, match=f"sdkernels::{OP}: {message}"):
        add_bias_residual_(*args)


def test_opcheck_and_compile():
    y, b, r = make(2, 8, 3, 5, torch.float32, "channels_last", True, True)
    torch.library.opcheck(torch.ops.sdkernels.add_bias_residual_, (y, b, r, 0.5))

    def epilogue(y, b, r):
        z = y * 2
        return add_bias_residual_(z, b, r, 0.5)
    expected = epilogue(y, b, r)
    compiled = torch.compile(epilogue, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    assert_close(compiled(y, b, r), expected, torch.float32, what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 128, 512, 512), (2, 4, 64, 64)], ids=str)
def test_sd_sizes_and_cuda_graphs(shape, dtype):
    from sdkernels.benchmarking import as_cuda_graph
    for layout in ("channels_last", "contiguous"):
        y, b, r = make(*shape, dtype, layout, True, True)
        expected = add_bias_residual_reference(y.double(), b.double(), r.double(), 0.5)
        keep = y.clone()
        out, supported = run(y, b, r, 0.5)
        assert supported
        assert_close(out, expected, dtype, what=f"{layout} {shape}")
        replay = as_cuda_graph(lambda: add_bias_residual_(y.copy_(keep), b, r, 0.5))
        assert torch.equal(replay(), out)
