"""sdkernels::group_norm against its float64 reference: every backend, layouts, dtypes, odd shapes, errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

import sdkernels
from sdkernels import dispatch
from sdkernels.ops.group_norm import group_norm_reference
from sdkernels.testing import assert_close
from conftest import DEVICE, GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "cuda"] if GPU else ["triton"]


def make_case(shape, groups, dtype, layout, affine, residual, device=DEVICE, offset=0.5):
    """Random x (with a non-zero mean, as real activations have), weight, bias and residual in the given layout."""
    x = (torch.randn(shape, device=device) * 2 + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d) \
            if x.dim() in (4, 5) else x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":  # a view whose spatial dims cannot be flattened: the kernels must not take it blindly
        big = torch.randn(*shape[:-1], shape[-1] * 2, device=device).to(dtype)
        x = big[..., ::2]
    C = shape[1]
    w = torch.randn(C, device=device).to(dtype) if affine else None
    b = torch.randn(C, device=device).to(dtype) if affine else None
    r = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.contiguous_format) if residual else None
    if r is not None and layout == "channels_last":
        r = torch.empty_like(x).copy_(r)  # same layout as x, as in a patched channels_last model
    return x, groups, w, b, r


def make_shift(x, dtype=None):
    """An (N, C) per-sample, per-channel shift of x (a conv bias plus time embedding), several x's spread."""
    return (torch.randn(x.shape[:2], device=x.device) * 3).to(dtype or x.dtype)


def reference64(x, groups, w, b, eps, silu, r, shift=None):
    up = lambda t: None if t is None else t.double()  # noqa: E731
    return group_norm_reference(up(x), groups, up(w), up(b), eps, silu, up(r), up(shift))


def check(backend, x, groups, w, b, eps, silu, r, strict=True, shift=None):
    with sdkernels.use_backend(backend, op="group_norm", strict=strict):
        out = sdkernels.group_norm(x, groups, w, b, eps, silu, r, shift)
    if strict:
        assert dispatch.last_backend("group_norm") == backend
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert out.stride() == x.stride(), "output must keep the input's layout"
    group_size = x.numel() // (x.shape[0] * groups)
    assert_close(out, reference64(x, groups, w, b, eps, silu, r, shift), x.dtype, group_size,
                 what=f"{backend} {tuple(x.shape)} G={groups} {x.dtype} stride={x.stride()} shift={shift is not None}")
    return out


def supported(backend, x, r):
    """Whether the backend takes these inputs. Availability is not asked: in the GPU lane every backend must be
    available (test_every_backend_available), so an unavailable one fails the strict check instead of hiding."""
    args = (x, 1, None, None, 1e-5, False, r)
    op = dispatch.ops()["group_norm"]
    b = next(b for b in op.backends if b.name == backend)
    return b.why_not(*args) is None


@pytest.mark.gpu
def test_every_backend_available():
    op = dispatch.ops()["group_norm"]
    assert {b.name: b.available() for b in op.backends} == {b.name: None for b in op.backends}


# ---- properties (CPU lane: interpreter, small sizes; GPU lane: larger) ----------------------------------------

MAX_HW = 70 if not GPU else 130


@given(batch=st.integers(1, 3), groups=st.sampled_from([1, 2, 3, 4, 8, 32]), per_group=st.integers(1, 6),
       h=st.integers(1, MAX_HW), w=st.integers(1, MAX_HW), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), affine=st.booleans(),
       residual=st.booleans(), silu=st.booleans(), eps=st.sampled_from([1e-5, 1e-6, 1e-3, 0.1]),
       backend=st.sampled_from(BACKENDS), shift=st.booleans())
def test_group_norm_matches_reference(batch, groups, per_group, h, w, dtype, layout, affine, residual, silu, eps,
                                      backend, shift):
    if not GPU and batch * groups * per_group * h * w > 6000:
        h, w = min(h, 12), min(w, 12)  # the interpreter is slow; large groups are covered by the split-plan test
    shape = (batch, groups * per_group, h, w)
    note(f"shape={shape} G={groups} {dtype} {layout} affine={affine} residual={residual} silu={silu} eps={eps} "
         f"shift={shift}")
    x, g, wt, b, r = make_case(shape, groups, dtype, layout, affine, residual)
    sh = make_shift(x) if shift else None
    if supported(backend, x, r):
        check(backend, x, g, wt, b, eps, silu, r, shift=sh)
    else:  # e.g. strided views, or NCHW for the CUDA kernel: the op still answers right, through the fallback
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
            check(backend, x, g, wt, b, eps, silu, r, strict=False, shift=sh)


@pytest.mark.parametrize("shape", [(2, 6, 33), (1, 4, 3, 5, 7), (3, 8, 1, 1), (1, 2, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_rank3_rank5_and_tiny(shape, layout):
    x, g, w, b, r = make_case(shape, 2, torch.float32, layout, True, True)
    check("triton", x, g, w, b, 1e-5, True, r)


@pytest.fixture(params=["flat", "flat+finalize", "rows", "one_pass", "tile", "tile+axis-sums", "tile+pivot-sums",
                        "tile+stat-sums"])
def forced_plan(request, monkeypatch):
    """Make the Triton launcher take each plan: the multi-kernel ones (partials, then finalize or, flat with few
    tiles, the merge inside the apply pass, then apply) with many tiles and several finalize chunks, at sizes the
    interpreter handles; and the one-program-per-group ones, which tiny tests would not all reach by themselves."""
    import sdkernels.kernels.group_norm as k
    plan, _, variant = request.param.partition("+")
    monkeypatch.setenv("SDKERNELS_GN_PLAN", plan)
    monkeypatch.setattr(k, "TILE", 64)
    monkeypatch.setattr(k, "ROW_TILE", 64)
    monkeypatch.setattr(k, "MERGE_CHUNK", 16)
    if variant == "finalize":
        monkeypatch.setattr(k, "FUSE_MAX_TILES", 0)
    if variant.endswith("-sums"):  # the probe's variants of the tile kernel's reductions
        sums = {"axis-sums": "axes", "pivot-sums": "pivot", "stat-sums": "stat"}[variant]
        monkeypatch.setenv("SDKERNELS_GN_TILE_SUMS", sums)
    return plan


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_plan(forced_plan, layout, dtype):
    if forced_plan == "rows" and layout != "channels_last":
        pytest.skip("the rows plan reads whole NHWC rows: channels_last only")
    x, g, w, b, r = make_case((2, 12, 13, 11), 3, dtype, layout, True, True)
    check("triton", x, g, w, b, 1e-5, True, r)
    check("triton", x, g, w, b, 1e-5, True, r, shift=make_shift(x))
    check("triton", x, g, w, b, 1e-5, False, None, shift=make_shift(x, torch.float32).t().contiguous().t())
    check("triton", x, g, w, b, 1e-5, True, None, shift=make_shift(x)[:1].expand(x.shape[0], -1))  # stride 0


def test_each_plan_large_mean(forced_plan):
    """A large mean against a small spread: naive sum-of-squares statistics lose it; (mean, M2) merging does not."""
    x = (torch.randn(1, 4, 20, 20, device=DEVICE) + 100.0).to(memory_format=torch.channels_last)
    check("triton", x, 2, None, None, 1e-6, False, None)


def test_each_plan_outlier_first_value(forced_plan):
    """Each group's first value (the pivot of the tile kernel's pivoted sums) a lone outlier: it sits sqrt(group
    size) standard deviations from the mean, where pivoted sums of squares would cancel to a few digits."""
    x = torch.randn(1, 4, 48, 48, device=DEVICE).to(memory_format=torch.channels_last)
    x[:, ::2, 0, 0] = 3.0e4  # the first channel of both groups, first position
    check("triton", x, 2, None, None, 1e-6, False, None)


# ---- errors and fallbacks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (lambda: (torch.randn(4, 8), 2, None, None), "rank 2"),
    (lambda: (torch.randn(2, 6, 4, 4), 4, None, None), "divides the 6 channels"),
    (lambda: (torch.randn(2, 6, 4, 4), 0, None, None), "positive integer"),
    (lambda: (torch.randn(2, 6, 4, 4), 3, torch.randn(5), None), r"shape \(6,\)"),
    (lambda: (torch.randn(2, 6, 4, 4), 3, None, torch.randn(6, device="meta")), "is on meta"),
    (lambda: (torch.randint(0, 5, (2, 6, 4, 4)), 3, None, None), "floating point"),
])
def test_invalid_inputs_raise_clear_errors(bad, match):
    x, g, w, b = bad()
    with pytest.raises(sdkernels.SdkernelsInputError, match=match) as e:
        sdkernels.group_norm(x, g, w, b)
    assert "sdkernels::group_norm" in str(e.value) and "x=Tensor(shape=" in str(e.value)


def test_invalid_residual_and_eps():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(sdkernels.SdkernelsInputError, match="residual must have x's shape"):
        sdkernels.group_norm(x, 3, residual=torch.randn(2, 6, 4, 5))
    with pytest.raises(sdkernels.SdkernelsInputError, match="eps"):
        sdkernels.group_norm(x, 3, eps=-1.0)
    with pytest.raises(sdkernels.SdkernelsInputError, match=r"shift must be an \(N, C\) = \(2, 6\) tensor"):
        sdkernels.group_norm(x, 3, shift=torch.randn(2, 6, 1, 1))
    with pytest.raises(sdkernels.SdkernelsInputError, match="shift must be floating point"):
        sdkernels.group_norm(x, 3, shift=torch.ones(2, 6, dtype=torch.int64))


def test_unsupported_dtype_falls_back_once_with_warning():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, device=DEVICE)
    dispatch._warned.clear()
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="float64"):
        out = sdkernels.group_norm(x, 3, silu=True)
    assert dispatch.last_backend("group_norm") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        sdkernels.group_norm(x, 3, silu=True)  # the second time it is quiet
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 3)))


def test_strict_forcing_reports_every_reason():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="forced backend 'triton'.*float64"):
        with sdkernels.use_backend("triton", strict=True):
            sdkernels.group_norm(x, 3)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with sdkernels.use_backend("nope"):
            sdkernels.group_norm(x, 3)


@pytest.mark.parametrize("Cg, S, channels_last, dense_rows, plan", [
    (10, 4096, False, True, "tile"),       # 2x320x64x64 NCHW: positions contiguous, the group fits
    (60, 1024, False, True, "flat"),       # 2x1920x32x32 NCHW: 61440 elements ran faster split
    (80, 64, True, True, "tile"),          # 2x2560x8x8 channels_last: channels contiguous
    (30, 1024, True, True, "tile"),        # 2x960x32x32 channels_last
    (40, 1024, True, True, "flat"),        # 2x1280x32x32 channels_last: larger than the channels-fast tile
    (20, 1024, True, False, "flat"),       # channels_last, channel stride not 1: one_pass took 3x flat's time
    (80, 64, True, False, "one_pass"),     # the same, a small group
    (4, 1024 * 1024, True, True, "rows"),  # the VAE at 1024 px
    (1280, 1, False, True, "one_pass"),    # a LayerNorm's rows seen as groups: never the tile plan
])
def test_plan_rules(Cg, S, channels_last, dense_rows, plan, monkeypatch):
    from sdkernels.kernels.group_norm import choose_plan
    monkeypatch.delenv("SDKERNELS_GN_PLAN", raising=False)
    assert choose_plan(Cg, S, 32 * Cg, channels_last, dense_rows) == plan


@pytest.mark.parametrize("block, S, channels_fast, warps, sums", [
    (4096, 64, True, 8, "pivot"),      # 2x1280x8x8 channels_last
    (16384, 1024, True, 16, "stat"),   # 2x320x32x32 channels_last
    (32768, 256, True, 32, "stat"),    # 2x2560x16x16 channels_last
    (8192, 256, False, 8, "pivot"),    # 2x640x16x16 NCHW
    (16384, 256, False, 16, "pivot"),  # 2x1920x16x16 NCHW
    (16384, 1024, False, 16, "stat"),  # 2x320x32x32 NCHW
    (32768, 1024, False, 32, "stat"),  # 2x960x32x32 NCHW
    (1024, 64, False, 4, "stat"),      # small NCHW tiles keep block / 256
])
def test_tile_variant_rule(block, S, channels_fast, warps, sums, monkeypatch):
    from sdkernels.kernels.group_norm import TILE_SUMS, _tile_variant
    monkeypatch.delenv("SDKERNELS_GN_TILE_WARPS", raising=False)
    monkeypatch.delenv("SDKERNELS_GN_TILE_SUMS", raising=False)
    assert _tile_variant(block, S, channels_fast) == dict(num_warps=warps, SUMS=TILE_SUMS[sums])


def test_chooser_prefers_triton_for_one_program_per_group_and_yields_to_forcing(monkeypatch):
    """The measured rule: Triton where its launcher takes a one-program-per-group plan; otherwise the priority order
    (CUDA first where it can run)."""
    monkeypatch.delenv("SDKERNELS_GN_PLAN", raising=False)
    op = dispatch.ops()["group_norm"]
    small = torch.randn(2, 64, 16, 16, device=DEVICE).to(memory_format=torch.channels_last)  # tile plan
    large = torch.randn(1, 64, 33, 33, device=DEVICE).to(memory_format=torch.channels_last)  # one group: rows plan
    assert op.chooser(small, 8) == "triton" and op.chooser(large, 1) is None
    assert op.chooser(small, 7) is None  # groups that do not divide the channels: the op's check reports it
    sdkernels.group_norm(small, 8)
    assert dispatch.last_backend("group_norm") == "triton"
    sdkernels.group_norm(large, 1)
    assert dispatch.last_backend("group_norm") == ("cuda" if GPU else "triton")
    with sdkernels.use_backend("reference", op="group_norm"):
        sdkernels.group_norm(small, 8)
    assert dispatch.last_backend("group_norm") == "reference"


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("SDKERNELS_BACKEND", "group_norm=reference")
    x = torch.randn(1, 4, 3, 3, device=DEVICE)
    sdkernels.group_norm(x, 2)
    assert dispatch.last_backend("group_norm") == "reference"


# ---- torch integration ----------------------------------------------------------------------------------------

def small_args(device=DEVICE, dtype=torch.float32):
    x, g, w, b, r = make_case((2, 8, 5, 7), 4, dtype, "channels_last", True, True, device=device)
    return (x, g, w, b, 1e-5, True, r)


def test_opcheck():
    torch.library.opcheck(torch.ops.sdkernels.group_norm.default, small_args())
    torch.library.opcheck(torch.ops.sdkernels.group_norm.default, small_args() + (make_shift(small_args()[0]),))
    x, g, *_ = small_args()
    torch.library.opcheck(torch.ops.sdkernels.group_norm.default, (x, g, None, None, 1e-6, False, None))


def test_torch_compile_fullgraph():
    args = small_args()

    def f(x, g, w, b, eps, silu, r):
        return sdkernels.group_norm(x * 2, g, w, b, eps, silu, r) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    torch.testing.assert_close(compiled(*args), f(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend):
    args = list(small_args(dtype=torch.float16))
    with sdkernels.use_backend(backend, strict=True):
        sdkernels.group_norm(*args)  # warm-up: compiles kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        static_x = args[0]
        with torch.cuda.graph(graph):
            static_out = sdkernels.group_norm(*args)
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference64(*args)
        assert_close(static_out, expected, torch.float16, what=f"{backend} graph replay")


def test_programmatic_launch_rule(monkeypatch):
    """The one-program plans' kernels launch as programmatic dependents on sm_90+ only (never in the interpreter),
    and SDKERNELS_GN_PDL=0 turns it off."""
    from sdkernels.kernels.group_norm import programmatic_launch
    from sdkernels.kernels.utils import interpreting
    x = torch.empty(1, 8, 2, 2, device=DEVICE)
    hopper = GPU and not interpreting() and torch.cuda.get_device_capability()[0] >= 9
    assert programmatic_launch(x) == (dict(PDL=True, launch_pdl=True) if hopper else {})
    monkeypatch.setenv("SDKERNELS_GN_PDL", "0")
    assert programmatic_launch(x) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("backend, shape, layout", [
    (backend, shape, "cl") for backend in ("triton", "cuda") for shape in ((2, 1280, 8, 8), (2, 320, 32, 32))
] + [("triton", (2, 640, 64, 64), "nchw")], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_chained_calls_read_what_the_kernel_before_wrote(backend, shape, layout):
    """Each call reads the output of the kernel just before it, as programmatic dependents (sm_90) must wait to:
    a chain of GroupNorms after a torch kernel that writes their input, eagerly and replayed in a CUDA graph.
    NCHW 2x640x64x64 takes the flat plan (partials, then the apply pass merging them: two dependent launches; the
    CUDA kernel takes channels_last only)."""
    x = torch.randn(shape, device=DEVICE).to(torch.float16)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    else:
        from sdkernels.kernels.group_norm import plan_for
        assert plan_for(x.shape, 32, [(x.stride(0), x.stride(1), 1)] * 3, False) == "flat"
    w, b = (torch.randn(shape[1], device=DEVICE).half() for _ in range(2))
    source = torch.empty_like(x)

    def chain():
        torch.mul(x, 3.0, out=source)  # written right before the first GroupNorm reads it
        outs = [source]
        for _ in range(3):
            outs.append(sdkernels.group_norm(outs[-1], 32, w, b, 1e-5, True, None))
        return outs

    def check_chain(outs):
        for step, (before, after) in enumerate(zip(outs, outs[1:])):
            assert_close(after, reference64(before, 32, w, b, 1e-5, True, None), torch.float16,
                         what=f"{backend} {shape} step {step}")

    with sdkernels.use_backend(backend, op="group_norm", strict=True):
        check_chain(chain())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = chain()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[0], x * 3.0)
        check_chain(outs)


# ---- GPU lane at SD sizes -------------------------------------------------------------------------------------

SD_SHAPES = [  # (B, C, H, W, G) of the SD1.5 / SDXL UNets and the VAE decoder
    (2, 320, 64, 64, 32), (2, 640, 32, 32, 32), (2, 1280, 16, 16, 32), (2, 1280, 8, 8, 32), (2, 960, 64, 64, 32),
    (2, 1920, 32, 32, 32), (2, 2560, 16, 16, 32), (2, 320, 128, 128, 32), (1, 512, 64, 64, 32),
    (1, 256, 256, 256, 32), (1, 128, 512, 512, 32), (1, 128, 1024, 1024, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_shapes(shape, backend, dtype):
    *dims, G = shape
    layout = "channels_last" if backend == "cuda" else ("contiguous" if dims[2] % 2 else "channels_last")
    for lay in {layout, "channels_last"}:
        x, g, w, b, r = make_case(tuple(dims), G, dtype, lay, True, dims[1] == 320)
        check(backend, x, g, w, b, 1e-6, True, r)
        if dims[0] == 2:  # UNet shapes: norm2 of a ResNet block takes conv1's bias + temb as the shift
            check(backend, x, g, w, b, 1e-6, True, None, shift=make_shift(x))
        else:  # VAE shapes: conv1's bias alone, the same row for every sample (batch stride 0)
            check(backend, x, g, w, b, 1e-6, True, None, shift=make_shift(x)[:1].expand(dims[0], -1))


@pytest.mark.gpu
@given(batch=st.integers(1, 2), groups=st.sampled_from([8, 16, 32]),
       channels=st.sampled_from([128, 256, 320, 512, 640, 960, 1280, 1920, 2560]),
       h=st.integers(1, 130), w=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
       residual=st.booleans(), silu=st.booleans(), affine=st.booleans(),
       shift=st.sampled_from(["none", "per sample", "broadcast"]))
def test_cuda_backend_properties(batch, groups, channels, h, w, dtype, residual, silu, affine, shift):
    note(f"B={batch} C={channels} H={h} W={w} G={groups} {dtype} residual={residual} silu={silu} shift={shift}")
    x, g, wt, b, r = make_case((batch, channels, h, w), groups, dtype, "channels_last", affine, residual)
    # "broadcast": one row for all samples (batch stride 0), as a conv bias alone is
    sh = {"none": None, "per sample": make_shift(x), "broadcast": make_shift(x)[:1].expand(batch, -1)}[shift]
    check("cuda", x, g, wt, b, 1e-5, silu, r, shift=sh)


# ---- the CUDA backend's two plans: one kernel (a thread block cluster per channel slice, sm_90+) and two ----------

SD15_CL_SHAPES = [(2, 320, 64, 64), (2, 320, 32, 32), (2, 640, 32, 32), (2, 640, 16, 16), (2, 1280, 16, 16),
                  (2, 1280, 8, 8), (2, 1280, 32, 32), (2, 2560, 8, 8), (2, 1920, 16, 16), (2, 960, 32, 32)]


def hopper():
    return GPU and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD15_CL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sd15_channels_last_cuda_plans(shape):
    """The CUDA backend at the SD1.5 UNet's channels_last GroupNorms, in the plan it takes (one kernel where it fits
    one wave, sm_90+) and with SDKERNELS_GN_CLUSTER=0 (two kernels), both against the reference."""
    from sdkernels.ops.group_norm import cuda_one_kernel
    x, g, w, b, _ = make_case(shape, 32, torch.float16, "channels_last", True, False)
    print(f"one kernel: {cuda_one_kernel(x, g, w, b)}")
    check("cuda", x, g, w, b, 1e-5, True, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDKERNELS_GN_CLUSTER", "0")
        assert not cuda_one_kernel(x, g, w, b)
        check("cuda", x, g, w, b, 1e-5, True, None)


@pytest.mark.gpu
@given(batch=st.integers(1, 3), groups=st.sampled_from([1, 4, 32]),
       channels=st.sampled_from([32, 64, 128, 320, 640, 1280]), h=st.integers(1, 70), w=st.integers(1, 70),
       dtype=st.sampled_from(DTYPES), residual=st.booleans(), silu=st.booleans(), shift=st.booleans(),
       knob=st.sampled_from(["", "0", "3,1,1", "8,1,8", "5,1000,3"]))
def test_cuda_plans_match_reference(batch, groups, channels, h, w, dtype, residual, silu, shift, knob):
    """Both CUDA plans under the cluster knob SDKERNELS_GN_CLUSTER ("P,blocks,rows": cluster size, enough blocks to
    stop narrowing slices at, rows a thread aims to hold; "0" the two-kernel plan): odd positions, ragged last row
    chunks, clusters of 3 and 5 blocks, threads holding up to 8 rows, every dtype, residual, shift, SiLU."""
    from sdkernels.ops.group_norm import cuda_one_kernel
    note(f"B={batch} C={channels} H={h} W={w} G={groups} {dtype} residual={residual} silu={silu} knob={knob!r}")
    if channels % groups:
        return
    x, g, wt, b, r = make_case((batch, channels, h, w), groups, dtype, "channels_last", True, residual)
    with pytest.MonkeyPatch.context() as mp:
        if knob:
            mp.setenv("SDKERNELS_GN_CLUSTER", knob)
        one = cuda_one_kernel(x, g, wt, b)
        note(f"one kernel: {one}")
        if knob == "0" or not hopper():
            assert not one
        check("cuda", x, g, wt, b, 1e-5, silu, r, shift=make_shift(x) if shift else None)


@pytest.mark.gpu
def test_one_kernel_plan_is_taken_where_it_fits():
    """A channel slice too large for one cluster's registers takes the two kernels; smaller ones take one (sm_90+),
    among them SD1.5's 2x320x32x32 and 2x1280x32x32 (measured to fit one wave on H100 and H200, 132 SMs)."""
    from sdkernels.ops.group_norm import cuda_one_kernel

    def cl(*shape):
        return torch.empty(shape, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
    big_hopper = hopper() and torch.cuda.get_device_properties(0).multi_processor_count >= 132
    for shape in ((1, 64, 9, 7), (2, 320, 32, 32), (2, 1280, 32, 32)):
        assert cuda_one_kernel(cl(*shape), 32) == big_hopper, shape
    assert not cuda_one_kernel(cl(1, 128, 512, 512), 32)
