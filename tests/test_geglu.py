"""sdkernels::geglu and sdkernels::gelu against their float64 references: layouts (contiguous, row slices, permuted
leading dims, channels_last, views the kernel must refuse), dtypes, odd sizes, both GELU forms, errors, fallbacks,
torch integration, and the diffusers GELU patcher."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

import sdkernels
from sdkernels import dispatch
from sdkernels.ops.geglu import geglu, geglu_reference, gelu, gelu_reference
from sdkernels.testing import assert_close
from conftest import DEVICE, GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["none", "tanh"]


def make_input(lead, cols, dtype, layout, device=DEVICE):
    """A random (*lead, cols) tensor in the given layout, with values across GELU's curved range."""
    def rand(*shape):
        return (torch.randn(shape, device=device) * 2.5).to(dtype)

    if layout == "contiguous" or not lead:
        return rand(*lead, cols)
    if layout == "row_slice":      # rows of a wider buffer, as a chunk or a slice of a projection gives
        return rand(*lead, cols + 7)[..., 3:3 + cols]
    if layout == "permuted":       # leading dims in another order in memory (a transposed batch)
        return rand(*reversed(lead), cols).permute(*reversed(range(len(lead))), len(lead))
    if layout == "every_other_row":  # a gap between rows that no single stride covers once merged
        return rand(*lead[:-1], 2 * lead[-1], cols)[..., ::2, :]
    if layout == "last_dim_strided":  # the kernels need unit stride on the last dim: reference with a warning
        return rand(*lead, 2 * cols)[..., ::2]
    raise ValueError(layout)


LAYOUTS = ["contiguous", "row_slice", "permuted", "every_other_row", "last_dim_strided"]


def run(op, *args, backend="triton"):
    """Run with the triton backend forced when it supports the input (and check that it ran), else let the
    fallback run quietly; returns (output, backend that ran)."""
    fn = {"geglu": geglu, "gelu": gelu}[op]
    supported = dispatch.ops()[op].reasons(*args)[backend] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        with sdkernels.use_backend(backend, op=op, strict=supported):
            out = fn(*args)
    ran = dispatch.last_backend(op)
    assert ran == (backend if supported else "reference")
    return out, ran


# ---- properties ----------------------------------------------------------------------------------------------

leading = st.lists(st.sampled_from([1, 2, 3, 5, 7, 16]), min_size=0, max_size=3).map(tuple)
inner_sizes = st.one_of(st.sampled_from([1, 3, 37, 100, 128, 320]), st.integers(1, 300))


@given(lead=leading, inner=inner_sizes, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       approximate=st.sampled_from(APPROXIMATIONS))
def test_geglu_matches_reference(lead, inner, dtype, layout, approximate):
    h = make_input(lead, 2 * inner, dtype, layout)
    note(f"h {tuple(h.shape)} stride={h.stride()} {dtype} {layout} approximate={approximate}")
    out, ran = run("geglu", h, approximate)
    assert out.shape == (*lead, inner) and out.dtype == dtype and out.is_contiguous()
    if layout in ("contiguous", "row_slice", "permuted") or (layout == "every_other_row" and len(lead) < 3):
        assert ran == "triton", "this layout must not need the fallback"
    assert_close(out, geglu_reference(h.double(), approximate), dtype, what=f"geglu {layout}")


@given(lead=leading, cols=inner_sizes, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS + ["channels_last"]), approximate=st.sampled_from(APPROXIMATIONS))
def test_gelu_matches_reference(lead, cols, dtype, layout, approximate):
    if layout == "channels_last":  # (N, C, H, W) with channels fastest, as a conv feature map
        n, h, w = (lead + (2, 3, 5))[:3]
        x = make_input((n, cols, h), w, dtype, "contiguous").contiguous(memory_format=torch.channels_last)
    else:
        x = make_input(lead, cols, dtype, layout)
    note(f"x {tuple(x.shape)} stride={x.stride()} {dtype} {layout} approximate={approximate}")
    out, ran = run("gelu", x, approximate)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.stride() == torch.empty_like(x).stride(), "the output takes x's layout, as F.gelu's"
    if layout != "last_dim_strided" or x.shape[-1] == 1:
        assert ran == "triton"
    assert_close(out, gelu_reference(x.double(), approximate), dtype, what=f"gelu {layout}")


def test_exact_erf_gelu_not_the_tanh_form():
    """At x = -1.5 the two GELU forms differ by 4e-4, far beyond fp32 tolerance: the default must be erf."""
    x = torch.linspace(-6, 6, 1201, device=DEVICE)
    h = torch.cat([torch.ones_like(x), x]).reshape(1, -1)
    for approximate in APPROXIMATIONS:
        expected = F.gelu(x.double(), approximate=approximate)
        assert_close(gelu(x, approximate), expected, torch.float32, what=f"gelu {approximate}")
        assert_close(geglu(h, approximate)[0], expected, torch.float32, what=f"geglu {approximate}")
    assert (gelu(x) - F.gelu(x, approximate="tanh")).abs().max() > 1e-4


def test_large_inputs_saturate_cleanly():
    x = torch.tensor([-1e4, -40.0, -10.0, 10.0, 40.0, 1e4, 0.0, -0.0], device=DEVICE)
    for approximate in APPROXIMATIONS:
        out = gelu(x, approximate)
        assert torch.isfinite(out).all()
        assert_close(out, F.gelu(x.double(), approximate=approximate), torch.float32, what=approximate)


@pytest.mark.parametrize("cols", [4096 * 3 + 5, 1000])
def test_flat_and_multi_tile_rows(cols):
    """A long flat block (many column tiles in one row) and rows split over several column tiles."""
    x = make_input((3,), cols, torch.float16, "contiguous")
    out, _ = run("gelu", x, "none")
    assert_close(out, gelu_reference(x.double()), torch.float16)
    h = make_input((3,), 2 * cols, torch.float16, "row_slice")
    out, _ = run("geglu", h, "none")
    assert_close(out, geglu_reference(h.double()), torch.float16)


def test_no_write_outside_the_output():
    """The output is a fresh tensor: neighbours of a sliced input stay untouched, and the input too."""
    base = make_input((5,), 40, torch.float32, "contiguous")
    before = base.clone()
    out, _ = run("geglu", base[:, 4:36], "none")
    assert torch.equal(base, before)
    assert_close(out, geglu_reference(before[:, 4:36].double()), torch.float32)


# ---- errors and fallbacks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, args, match", [
    (geglu, (torch.randn(4, 7),), "even size"),
    (geglu, (torch.randn(()),), "even size"),
    (geglu, (torch.randint(0, 5, (4, 8)),), "floating point"),
    (geglu, (torch.randn(4, 8), "fast"), "approximate='fast'"),
    (gelu, (torch.randint(0, 5, (4, 8)),), "floating point"),
    (gelu, (torch.randn(4, 8), "erf"), "approximate='erf'"),
    (gelu, ([1.0, 2.0],), "must be a tensor"),
])
def test_invalid_inputs_raise_clear_errors(fn, args, match):
    with pytest.raises(sdkernels.SdkernelsInputError, match=match) as e:
        fn(*args)
    assert f"sdkernels::{fn.__name__}" in str(e.value)


@pytest.mark.parametrize("op, make", [
    ("gelu", lambda: torch.randn(3, 5, dtype=torch.float64, device=DEVICE)),
    ("geglu", lambda: torch.randn(3, 10, dtype=torch.float64, device=DEVICE)),
    ("geglu", lambda: torch.randn(3, 20, device=DEVICE)[:, ::2]),
])
def test_fallback_warns_once(op, make):
    x = make()
    fn = {"geglu": geglu, "gelu": gelu}[op]
    ref = {"geglu": geglu_reference, "gelu": gelu_reference}[op]
    dispatch._warned.clear()
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match=f"sdkernels::{op} runs on the eager reference"):
        out = fn(x)
    assert dispatch.last_backend(op) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        fn(x)  # the second time it is quiet
    assert_close(out, ref(x.double()), x.dtype)


def test_empty_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
        assert geglu(torch.randn(0, 6, device=DEVICE)).shape == (0, 3)
        assert gelu(torch.randn(2, 0, device=DEVICE)).shape == (2, 0)


# ---- torch integration ----------------------------------------------------------------------------------------

def test_opcheck():
    for h in (make_input((3, 5), 2 * 37, torch.float32, "contiguous"),
              make_input((3, 5), 2 * 37, torch.float16, "permuted")):
        torch.library.opcheck(torch.ops.sdkernels.geglu.default, (h, "none"))
    torch.library.opcheck(torch.ops.sdkernels.geglu.default, (make_input((4,), 6, torch.float32, "row_slice"), "tanh"))
    x = make_input((2, 3, 4), 5, torch.float32, "contiguous").contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.sdkernels.gelu.default, (x, "none"))
    torch.library.opcheck(torch.ops.sdkernels.gelu.default, (make_input((3,), 9, torch.bfloat16, "row_slice"),
                                                             "tanh"))


def test_torch_compile_fullgraph():
    h = make_input((2, 3), 2 * 20, torch.float32, "contiguous")

    def f(h):
        return gelu(geglu(h * 2) + 1, "tanh")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    torch.testing.assert_close(compiled(h), f(h))
    assert_close(compiled(h), gelu_reference(geglu_reference(h.double() * 2) + 1, "tanh"), torch.float32)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    h = make_input((2, 77), 2 * 640, torch.float16, "contiguous")
    with sdkernels.use_backend("triton", strict=True):
        geglu(h), gelu(h)  # warm-up: compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_geglu = geglu(h)
            out_gelu = gelu(h, "tanh")
    for _ in range(2):
        h.copy_(torch.randn_like(h))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out_geglu, geglu_reference(h.double()), torch.float16, what="geglu replay")
        assert_close(out_gelu, gelu_reference(h.double(), "tanh"), torch.float16, what="gelu replay")


# ---- GPU lane at SD sizes -------------------------------------------------------------------------------------

SD_GEGLU = [(2, 4096, 1280), (2, 1024, 2560), (2, 256, 5120), (2, 64, 5120), (2, 4096, 2560)]  # (B, tokens, inner)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_GEGLU, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_shapes(shape, dtype):
    B, T, inner = shape
    for layout in ("contiguous", "row_slice"):
        h = make_input((B, T), 2 * inner, dtype, layout)
        out, _ = run("geglu", h, "none")
        assert_close(out, geglu_reference(h.double()), dtype, what=f"geglu {shape} {layout}")
    x = make_input((B, T), 4 * inner, dtype, "contiguous")  # diffusers GELU after a Linear to 4 * dim
    out, _ = run("gelu", x, "none")
    assert_close(out, gelu_reference(x.double()), dtype, what=f"gelu {shape}")


# ---- the diffusers GELU patcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "gelu-approximate"])
def test_patched_feed_forward_gelu_matches(activation):
    pytest.importorskip("diffusers")
    from diffusers.models.attention import FeedForward
    import sdkernels.patchers.geglu  # noqa: F401  (registers the patchers)
    from sdkernels.patch import patch, patched_by, unpatch

    ff = FeedForward(24, mult=2, activation_fn=activation).to(DEVICE).eval()
    x = torch.randn(2, 7, 24, device=DEVICE)
    with torch.no_grad():
        expected = ff(x)
        patch(ff, ops=["gelu"])
        assert patched_by(ff.net[0]) == ("gelu",)
        dispatch._last_backend.pop("gelu", None)
        out = ff(x)
        assert dispatch.last_backend("gelu") == "triton"
        assert_close(out, expected.double(), torch.float32, reduction_size=48, what=activation)
        unpatch(ff)
        assert "forward" not in ff.net[0].__dict__
        torch.testing.assert_close(ff(x), expected, rtol=0, atol=0)
