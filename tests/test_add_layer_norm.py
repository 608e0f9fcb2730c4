"""sdkernels::add_layer_norm against its definition: total bit for bit eager's x + residual, normed within the
dtype's tolerance of a float64 LayerNorm of that rounded total. Odd row counts and widths, every dtype, affine or
not; the tile plans; inputs the kernel refuses (reference with a warning); errors; torch integration; SD sizes and
CUDA graphs in the GPU lane."""
import warnings

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import sdkernels
from sdkernels import dispatch
from sdkernels.ops.add_layer_norm import (OP, TRITON_MAX_C, add_layer_norm, add_layer_norm_reference,
                                          layer_norm_reference)
from sdkernels.testing import assert_close
from conftest import DEVICE, GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AFFINES = ["both", "weight", "bias", "none"]


def make(lead, C, dtype, affine="both", device=DEVICE):
    """Random x (with a non-zero mean, as activations have) and residual of shape (*lead, C); weight near 1 and bias
    near 0 where ``affine`` asks for them."""
    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, device=device) * scale + offset).to(dtype)

    x, r = rand(*lead, C, scale=2.0, offset=0.5), rand(*lead, C)
    w = rand(C, scale=0.5, offset=1.0) if affine in ("both", "weight") else None
    b = rand(C, scale=0.5) if affine in ("both", "bias") else None
    return x, r, w, b


def expected(x, r, w, b, eps):
    """(eager's x + residual, the float64 LayerNorm of that rounded sum)."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    total = x + r
    return total, layer_norm_reference(total.double(), up(w), up(b), eps)


def run(x, r, w, b, eps):
    """The triton backend where it takes the input (checked that it ran), else the reference: (total, normed,
    whether triton ran)."""
    supported = dispatch.ops()[OP].reasons(x, r, w, b, eps)["triton"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        with sdkernels.use_backend("triton", op=OP, strict=supported):
            total, normed = add_layer_norm(x, r, w, b, eps)
    assert dispatch.last_backend(OP) == ("triton" if supported else "reference")
    return total, normed, supported


def check(x, r, w, b, eps, what=""):
    """Run and compare both outputs; returns whether the kernel ran."""
    what = f"{what} {tuple(x.shape)} {x.dtype} weight={w is not None} bias={b is not None} eps={eps}"
    total, normed, supported = run(x, r, w, b, eps)
    want_total, want_normed = expected(x, r, w, b, eps)
    for out in (total, normed):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), what
        assert out.data_ptr() not in (x.data_ptr(), r.data_ptr()), what
    assert torch.equal(total, want_total), f"{what}: total is not eager's x + residual bit for bit " \
        f"({int((total != want_total).sum())} of {total.numel()} elements differ)"
    assert_close(normed, want_normed, x.dtype, x.shape[-1], what=what)
    return supported


# ---- properties (CPU lane: the interpreter at small sizes) ---------------------------------------------------

@given(lead=st.one_of(st.tuples(st.integers(1, 70)), st.tuples(st.just(2), st.integers(1, 35)),
                      st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5))),
       C=st.sampled_from([1, 3, 7, 32, 40, 320, 333]), dtype=st.sampled_from(DTYPES),
       affine=st.sampled_from(AFFINES), eps=st.sampled_from([1e-5, 1e-6, 1e-3, 0.1]))
def test_matches_the_definition(lead, C, dtype, affine, eps):
    note(f"lead={lead} C={C} {dtype} affine={affine} eps={eps}")
    assert check(*make(lead, C, dtype, affine), eps), "contiguous inputs must run the kernel"


@pytest.mark.parametrize("dtype", DTYPES)
def test_total_is_eager_add_bit_for_bit(dtype):
    """Sums that must round (large and small magnitudes mixed; about one in ten exactly halfway between two values
    of the dtype) come out as eager's ``x + residual``: one rounding of the fp32 sum, to nearest even."""
    x = (torch.randn(5, 33, 320, device=DEVICE) * torch.logspace(-3, 3, 320, device=DEVICE)).to(dtype)
    r = (torch.randn(5, 33, 320, device=DEVICE) * 7).to(dtype)
    total, _, supported = run(x, r, None, None, 1e-5)
    assert supported and torch.equal(total, x + r)
    # the rounding mattered: the fp32 sum is not representable in the narrow dtypes
    assert dtype == torch.float32 or not torch.equal(total.float(), x.float() + r.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_come_from_the_rounded_total(dtype):
    """x on a grid of whole ulps (fp16 at 1024: 1, bf16 at 256: 2), residual under half an ulp: the sum rounds back
    to x, so the LayerNorm must normalize x's spread, not x + residual's."""
    ulp = 1.0 if dtype == torch.float16 else 2.0
    base = 1024.0 if dtype == torch.float16 else 256.0
    x = (base + ulp * torch.randint(1, 5, (6, 40), device=DEVICE)).to(dtype)  # x + r >= base: steps of ulp
    r = ((torch.rand(6, 40, device=DEVICE) - 0.5) * 0.8 * ulp).to(dtype)
    total, normed, supported = run(x, r, None, None, 1e-5)
    assert supported and torch.equal(total, x)
    assert_close(normed, layer_norm_reference(x.double()), dtype, 40)


@pytest.mark.parametrize("tile", [1, 512, None, 1 << 15])
@pytest.mark.parametrize("rows, C", [(37, 40), (70, 333), (9, 1280)])
def test_tile_plans(tile, rows, C, monkeypatch):
    """One row a program, a few, the default and more rows than the input has: tails of rows and of columns."""
    from sdkernels.kernels import add_layer_norm as kernel
    if tile is not None:
        monkeypatch.setenv(kernel.TILE_KNOB, str(tile))
    assert check(*make((rows,), C, torch.float16), 1e-5, what=f"tile={tile}")


@pytest.mark.parametrize("C", [2048, TRITON_MAX_C])
def test_wide_rows(C):
    assert check(*make((3,), C, torch.float32), 1e-5)


def test_large_mean_small_spread():
    """Two-pass variance: in fp32, E[t^2] - E[t]^2 of rows with mean 100 and spread 1 is off by ~1e-3 (an ulp of
    1e4), far outside fp32's tolerance; (t - mean)^2 keeps it."""
    x = torch.randn(4, 300, device=DEVICE) + 100.0
    assert check(x, torch.randn_like(x) * 1e-2, None, None, 1e-6)


def test_outputs_are_poisoned_before_the_kernel_writes(monkeypatch):
    """The test lanes fill fresh outputs with NaN (SDKERNELS_POISON_OUTPUTS=1, conftest), so an element the kernel
    never writes fails the comparisons above."""
    from sdkernels.kernels import add_layer_norm as kernel
    monkeypatch.setattr(kernel, "add_layer_norm_triton", lambda *args: (args[-2], args[-1]))  # writes nothing
    x, r, w, b = make((3,), 8, torch.float32)
    with sdkernels.use_backend("triton", op=OP, strict=True):
        total, normed = add_layer_norm(x, r, w, b)
    assert total.isnan().all() and normed.isnan().all()


def test_empty_rows():
    x, r, w, b = make((0,), 8, torch.float16)
    total, normed, supported = run(x, r, w, b, 1e-5)
    assert supported and total.shape == normed.shape == (0, 8)


# ---- inputs the kernel refuses, errors --------------------------------------------------------------------------

@pytest.mark.parametrize("case, reason", [
    ("x_strided", "x is not contiguous"),
    ("residual_transposed", "residual is not contiguous"),
    ("weight_strided", "weight or bias is not contiguous"),
    ("fp64", "dtype torch.float64 is not one of fp16, bf16, fp32"),
    ("too_wide", f"wider than the kernel's {TRITON_MAX_C}"),
])
def test_refused_inputs_take_the_reference_with_a_warning(case, reason):
    dtype = torch.float64 if case == "fp64" else torch.float32
    C = TRITON_MAX_C + 1 if case == "too_wide" else 40
    x, r, w, b = make((2, 5), C, dtype)
    if case == "x_strided":  # every other column of a wider tensor
        x = make((2, 5), 2 * C, dtype)[0][..., ::2]
    elif case == "residual_transposed":  # (10, C) read column-major
        x, r = x.reshape(10, C), make((C,), 10, dtype)[0].t()
    elif case == "weight_strided":
        w = make((), 2 * C, dtype)[0][::2]
    assert reason in dispatch.ops()[OP].reasons(x, r, w, b, 1e-5)["triton"]
    dispatch._warned.clear()  # one warning per reason and process: an earlier test may have had it
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match=f"sdkernels::{OP} runs on the eager reference"):
        add_layer_norm(x, r, w, b)
    assert dispatch.last_backend(OP) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        assert not check(x, r, w, b, 1e-5, what=case)  # still right, now quietly


def _bad(case):
    x, r, w, b = make((2, 3), 8, torch.float32, device="cpu")
    return {
        "x_not_a_tensor": ([1.0, 2.0], r, w, b, 1e-5),
        "residual_not_a_tensor": (x, 1.0, w, b, 1e-5),
        "rank_1": (x[0, 0], r[0, 0], w, b, 1e-5),
        "integer_x": (x.int(), r.int(), None, None, 1e-5),
        "dtype_mix": (x, r.half(), w, b, 1e-5),
        "shape_mismatch": (x, r[:, :2], w, b, 1e-5),
        "weight_shape": (x, r, torch.ones(7), b, 1e-5),
        "bias_dtype": (x, r, w, b.double(), 1e-5),
        "weight_device": (x, r, torch.ones(8, device="meta"), b, 1e-5),
        "residual_device": (x, torch.ones(2, 3, 8, device="meta"), w, b, 1e-5),
        "weight_not_a_tensor": (x, r, [1.0] * 8, b, 1e-5),
        "eps_negative": (x, r, w, b, -1e-5),
        "eps_nan": (x, r, w, b, float("nan")),
    }[case]


@pytest.mark.parametrize("case, message", [
    ("x_not_a_tensor", "x must be a tensor"),
    ("residual_not_a_tensor", "residual must be a tensor"),
    ("rank_1", r"x must be \(..., C\) with at least 2 dims \(rows of C\), not rank 1"),
    ("integer_x", "x must be floating point, not torch.int32"),
    ("dtype_mix", "residual has dtype torch.float16 but x has torch.float32"),
    ("shape_mismatch", r"residual must have x's shape \(2, 3, 8\)"),
    ("weight_shape", r"weight must have shape \(8,\) for rows of 8"),
    ("bias_dtype", "bias has dtype torch.float64 but x has torch.float32"),
    ("weight_device", "weight is on meta but x is on cpu"),
    ("residual_device", "residual is on meta but x is on cpu"),
    ("weight_not_a_tensor", "weight must be a tensor or None"),
    ("eps_negative", "eps=-1e-05 must be a finite non-negative number"),
    ("eps_nan", "eps=nan must be a finite non-negative number"),
])
def test_invalid_inputs_raise_naming_the_op_and_the_reason(case, message):
    with pytest.raises(sdkernels.SdkernelsInputError, match=f"sdkernels::{OP}: {message}") as e:
        add_layer_norm(*_bad(case))
    assert "(got x=" in str(e.value) and "residual=" in str(e.value)


# ---- torch integration ----------------------------------------------------------------------------------------

def test_opcheck():
    op = torch.ops.sdkernels.add_layer_norm.default
    for dtype, affine in ((torch.float32, "both"), (torch.float16, "none"), (torch.bfloat16, "weight")):
        torch.library.opcheck(op, make((2, 5), 40, dtype, affine) + (1e-5,))
    x, r, w, b = make((2, 5), 2 * 12, torch.float32)
    with warnings.catch_warnings():  # the reference path's outputs are laid out as the fake says too
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        torch.library.opcheck(op, (x[..., ::2], r[..., ::2], w[::2].contiguous(), None, 1e-6))


def test_torch_compile_fullgraph():
    x, r, w, b = make((2, 5), 40, torch.float32)

    def block(x, r, w, b):
        total, normed = add_layer_norm(x * 2, r, w, b, 1e-5)
        return total + 1, normed * 3

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(block, backend=capture, fullgraph=True)(x, r, w, b)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("sdkernels.add_layer_norm" in t for t in targets), targets
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    for got, want in zip(compiled(x, r, w, b), block(x, r, w, b)):
        torch.testing.assert_close(got, want)


def test_reference_is_eager_add_then_layer_norm():
    """The definition itself, for fp32 inputs: eager's two ops."""
    x, r, w, b = make((3, 7), 40, torch.float32)
    total, normed = add_layer_norm_reference(x, r, w, b, 1e-5)
    assert torch.equal(total, x + r)
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x + r, (40,), w, b, 1e-5))


# ---- GPU lane at SD sizes -------------------------------------------------------------------------------------

SD_SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 4096, 640), (2, 77, 768)]  # (B, tokens, C)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_shapes(shape, dtype):
    for affine, eps in (("both", 1e-5), ("none", 1e-6)):
        assert check(*make(shape[:-1], shape[-1], dtype, affine), eps, what="SD")


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1, 333, 1024, 2560, 4096, TRITON_MAX_C])
@pytest.mark.parametrize("dtype", DTYPES)
def test_widths(C, dtype):
    assert check(*make((1001,), C, dtype), 1e-5, what="width")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype):
    from sdkernels.benchmarking import as_cuda_graph
    x, r, w, b = make((2, 77), 768, dtype)
    with sdkernels.use_backend("triton", op=OP, strict=True):
        replay = as_cuda_graph(lambda: add_layer_norm(x, r, w, b, 1e-5))  # warms up (compiles) before capturing
    for _ in range(2):
        new_x, new_r, _, _ = make((2, 77), 768, dtype)
        x.copy_(new_x)
        r.copy_(new_r)
        total, normed = replay()
        torch.cuda.synchronize()
        want_total, want_normed = expected(x, r, w, b, 1e-5)
        assert torch.equal(total, want_total)
        assert_close(normed, want_normed, dtype, 768, what="graph replay")
