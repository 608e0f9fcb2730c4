"""sdkernels::linear_geglu against its float64 reference (odd sizes, strides, dtypes, bias or not, both GELU
forms), errors, fallbacks, torch integration, autotuning outside CUDA-graph capture, and the diffusers GEGLU
patcher: plain, with peft LoRA (switched, disabled, merged, unloaded), with diffusers' LoRACompatibleLinear, in a
tiny UNet."""
import warnings

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from triton.runtime.errors import OutOfResources

import sdkernels
from sdkernels import dispatch, tuning
from sdkernels.kernels.linear_geglu import CONFIGS, TAIL_CONFIGS, TMA_CONFIGS

EVERY_CONFIG = CONFIGS + TMA_CONFIGS + [c for c in TAIL_CONFIGS if c not in CONFIGS + TMA_CONFIGS]
from sdkernels.ops.geglu import geglu_reference, linear_geglu, linear_geglu_reference
from sdkernels.testing import assert_close, relative_error
from conftest import DEVICE, GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(lead, K, inner, dtype, x_layout="contiguous", w_layout="contiguous", bias=True, device=DEVICE):
    """x (*lead, K) ~ N(0, 1) and a weight (2 * inner, K) scaled so the projection is ~N(0, 1), in the layouts
    asked for; the bias may be a strided view."""
    def rand(*shape, scale=1.0):
        return (torch.randn(shape, device=device) * scale).to(dtype)

    if x_layout == "contiguous":
        x = rand(*lead, K)
    elif x_layout == "row_slice":      # rows of a wider buffer
        x = rand(*lead, K + 5)[..., 2:2 + K]
    elif x_layout == "k_strided":      # a gap between consecutive K elements: the kernel takes any K stride
        x = rand(*lead, 2 * K)[..., ::2]
    elif x_layout == "permuted":       # leading dims that merge into one stride only for some shapes
        x = rand(*reversed(lead), K).permute(*reversed(range(len(lead))), len(lead))
    else:
        raise ValueError(x_layout)
    scale = K ** -0.5
    w = rand(2 * inner, K, scale=scale) if w_layout == "contiguous" else rand(K, 2 * inner, scale=scale).t()
    b = rand(4 * inner, scale=0.5)[::2] if bias else None
    return x, w, b


def reference64(x, w, b, approximate="none"):
    return linear_geglu_reference(x.double(), w.double(), None if b is None else b.double(), approximate)


def check(x, w, b, approximate="none", strict=True, backend="triton"):
    # The cublas backend stands in for the fused kernel only where CUDA graphs replay it (see its why_not)
    objective = "device" if backend == "cublas" else tuning.objective()
    with sdkernels.use_backend(backend, op="linear_geglu", strict=strict), tuning.optimizing_for(objective):
        out = linear_geglu(x, w, b, approximate)
    if strict:
        assert dispatch.last_backend("linear_geglu") == backend
    assert out.shape == (*x.shape[:-1], w.shape[0] // 2) and out.dtype == x.dtype and out.is_contiguous()
    expected = (reference64 if backend != "cublas" else cublas_projection_reference64)(x, w, b, approximate)
    assert_close(out, expected, x.dtype, reduction_size=x.shape[-1],
                 what=f"linear_geglu x{tuple(x.shape)} stride={x.stride()} w{tuple(w.shape)} {x.dtype}")
    return out


def cublas_projection_reference64(x, w, b, approximate="none"):
    """What the cublas backend computes: cuBLAS's projection (fp32 accumulation) in x's dtype, as in eager (in bf16
    that rounding alone moves a * gelu(g) by up to ~1.5% at SD sizes), then the gate in high precision. How
    accurate the projection is, the SD-shape tests compare with eager's."""
    from sdkernels.ops.geglu import fp32_reductions
    with fp32_reductions():
        h = torch.nn.functional.linear(x, w, b)
    a, g = h.double().chunk(2, dim=-1)
    return a * torch.nn.functional.gelu(g, approximate=approximate)


def supported(x, w, b):
    return dispatch.ops()["linear_geglu"].reasons(x, w, b, "none")["triton"] is None


# ---- properties (CPU lane: interpreter, 16x16x16 tiles, so every size below spans several tiles) -------------

sizes = st.one_of(st.sampled_from([1, 3, 16, 37, 100]), st.integers(1, 80))


@settings(max_examples=30 if GPU else 20)
@given(lead=st.lists(st.sampled_from([1, 2, 3, 7, 13]), max_size=2).map(tuple), K=sizes, inner=sizes,
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), approximate=st.sampled_from(["none", "tanh"]),
       x_layout=st.sampled_from(["contiguous", "row_slice", "k_strided", "permuted"]),
       w_layout=st.sampled_from(["contiguous", "transposed"]))
def test_matches_reference(lead, K, inner, dtype, bias, approximate, x_layout, w_layout):
    x, w, b = make_case(lead, K, inner, dtype, x_layout, w_layout, bias)
    note(f"x {tuple(x.shape)} stride={x.stride()} w stride={w.stride()} {dtype} bias={bias} {approximate}")
    if supported(x, w, b):
        check(x, w, b, approximate)
    else:
        assert x_layout == "permuted" and len([n for n in lead if n > 1]) == 2, "only unmergeable views fall back"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
            check(x, w, b, approximate, strict=False)


def test_one_dim_x_and_no_bias():
    x, w, _ = make_case((), 37, 21, torch.float32)
    assert check(x, w, None).shape == (21,)


def test_gate_is_the_second_half():
    """Value rows first, gate rows second, as diffusers' chunk(2, -1): swapping the halves must change the result."""
    x, w, b = make_case((5,), 16, 8, torch.float32)
    out = check(x, w, b)
    swapped = linear_geglu(x, torch.cat([w[8:], w[:8]]), torch.cat([b[8:], b[:8]]))
    assert (out - swapped).abs().max() > 0.1
    assert_close(out, geglu_reference((x.double() @ w.double().t() + b.double())), torch.float32, 16)


# ---- errors and fallbacks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(4, 8), torch.randn(6, 7), None), r"weight must be \(2 \* inner, K\) with K = x.shape"),
    (lambda: (torch.randn(4, 8), torch.randn(5, 8), None), r"weight must be \(2 \* inner, K\)"),
    (lambda: (torch.randn(4, 8), torch.randn(6, 8, 1), None), r"weight must be \(2 \* inner, K\)"),
    (lambda: (torch.randn(4, 8), torch.randn(6, 8), torch.randn(3)), r"bias must have shape \(6,\)"),
    (lambda: (torch.randn(4, 8), torch.randn(6, 8).half(), None), "weight has dtype torch.float16"),
    (lambda: (torch.randn(4, 8), torch.randn(6, 8), torch.randn(6).half()), "bias has dtype"),
    (lambda: (torch.randn(4, 8), torch.randn(6, 8, device="meta"), None), "weight is on meta"),
    (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(6, 8), None), "x must be floating point"),
    (lambda: (torch.randn(()), torch.randn(6, 1), None), "at least one dim"),
])
def test_invalid_inputs_raise_clear_errors(args, match):
    with pytest.raises(sdkernels.SdkernelsInputError, match=match) as e:
        linear_geglu(*args())
    assert "sdkernels::linear_geglu" in str(e.value) and "x=Tensor(shape=" in str(e.value)


def test_invalid_approximate():
    x, w, b = make_case((2,), 8, 3, torch.float32)
    with pytest.raises(sdkernels.SdkernelsInputError, match="approximate='sigmoid'"):
        linear_geglu(x, w, b, "sigmoid")


def test_unmergeable_views_take_the_cublas_backend():
    """Leading dims the fused kernel cannot index as one (M, K) matrix: F.linear takes them, no fallback."""
    x, w, b = make_case((3, 4), 8, 5, torch.float32, x_layout="permuted")
    assert not supported(x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        out = linear_geglu(x, w, b)
    assert dispatch.last_backend("linear_geglu") == "cublas"
    assert_close(out, reference64(x, w, b), x.dtype, reduction_size=8)


@pytest.mark.parametrize("make", [lambda: make_case((3,), 8, 5, torch.float64)])
def test_fallback_warns_once(make):
    x, w, b = make()
    dispatch._warned.clear()
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="sdkernels::linear_geglu runs on the eager"):
        out = linear_geglu(x, w, b)
    assert dispatch.last_backend("linear_geglu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        linear_geglu(x, w, b)
    assert_close(out, reference64(x, w, b), x.dtype, reduction_size=8)


# ---- torch integration ----------------------------------------------------------------------------------------

def test_opcheck():
    x, w, b = make_case((2, 5), 24, 19, torch.float32)
    torch.library.opcheck(torch.ops.sdkernels.linear_geglu.default, (x, w, b, "none"))
    x, w, _ = make_case((7,), 20, 9, torch.float16, x_layout="row_slice", w_layout="transposed")
    torch.library.opcheck(torch.ops.sdkernels.linear_geglu.default, (x, w, None, "tanh"))


def test_torch_compile_fullgraph():
    x, w, b = make_case((2, 3), 20, 12, torch.float32)

    def f(x, w, b):
        return linear_geglu(x + 1, w, b) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))
    assert_close(compiled(x, w, b), reference64(x + 1, w, b) * 2, torch.float32, reduction_size=20)


# ---- GPU lane: SD sizes, every tile config, numerics vs eager, CUDA graphs ------------------------------------

SD_SHAPES = [  # (M, K, inner): SD1.5 at 512 px, batch 2, then SDXL at 1024 px
    (2 * 4096, 320, 1280), (2 * 1024, 640, 2560), (2 * 256, 1280, 5120), (2 * 64, 1280, 5120),
    (2 * 4096, 640, 2560), (2 * 1024, 1280, 5120),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "M={},K={},N={}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_sd_shapes_and_no_worse_than_eager(shape, dtype, backend):
    """At SD sizes the op is at least as accurate as eager (Linear in dtype, then a * gelu(g) in dtype), which
    rounds the projection to fp16/bf16 before the gate (so does the cublas backend, then gates in fp32)."""
    M, K, inner = shape
    x, w, b = make_case((M,), K, inner, dtype)
    out = check(x, w, b, backend=backend)
    expected = reference64(x, w, b)
    a, g = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
    eager = a * torch.nn.functional.gelu(g)
    assert relative_error(out, expected) <= 1.05 * relative_error(eager, expected) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("config", EVERY_CONFIG, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_config(config, dtype):
    """The autotuner may pick any config: each must be right on a shape with tails in M, N and K (the TMA ones
    on the 16-bit, 16-byte aligned rows they take; the autotuner offers them only there)."""
    from sdkernels.kernels.linear_geglu import fits, linear_geglu_triton, tma_ok
    if not fits(config, dtype, torch.device(DEVICE)):
        pytest.skip(f"{config} does not fit this GPU's shared memory in {dtype} (the autotuner drops it too)")
    tma = config.kwargs["USE_TMA"]
    x, w, b = make_case((333,), 200, 301, dtype, x_layout="contiguous" if tma else "row_slice")
    if tma and not tma_ok(x, w):
        assert dtype == torch.float32 or torch.cuda.get_device_capability()[0] < 9
        with pytest.raises(ValueError, match="TMA config"):
            linear_geglu_triton(x, w, b, torch.empty(333, 301, device=DEVICE, dtype=dtype), False, config=config)
        return
    out = torch.full((333, 301), float("nan"), device=DEVICE, dtype=dtype)
    try:
        linear_geglu_triton(x, w, b, out, approximate_tanh=False, config=config)
    except OutOfResources as e:  # our estimate missed what Triton allocates; the autotuner would drop it too
        if dtype != torch.float32:
            raise  # in 16 bits every config must run (test_16_bit_configs_fit_this_gpu)
        pytest.skip(f"{config} in {dtype}: {e}")
    assert_close(out, reference64(x, w, b), dtype, reduction_size=200, what=f"config {config}")


@pytest.mark.gpu
def test_16_bit_configs_fit_this_gpu():
    """The configs the autotuner offers all fit an sm_80/sm_90 GPU's shared memory in fp16 and bf16 (so that
    test_every_tile_config runs them all, not skips them); fp32 (twice the bytes) keeps its default config."""
    from sdkernels.kernels.linear_geglu import DEFAULT_CONFIGS, default_config, fits
    device = torch.device(DEVICE)
    for dtype in (torch.float16, torch.bfloat16):
        assert [str(c) for c in EVERY_CONFIG if not fits(c, dtype, device)] == [], dtype
        assert default_config(dtype, device) is DEFAULT_CONFIGS[0]
    assert fits(default_config(torch.float32, device), torch.float32, device)


@pytest.mark.skipif(GPU, reason="CPU lane: the TMA branch in the interpreter (the GPU lane runs every TMA config)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_tma_branch_in_the_interpreter(monkeypatch, dtype, split_k):
    """The descriptor loads of the TMA configs: zero fill past M and K, value rows past N reading gate rows that
    only masked columns use. The interpreter emulates descriptors; tma_ok refuses it, so the test lifts that."""
    import sdkernels.kernels.linear_geglu as kernel
    monkeypatch.setattr(kernel, "tma_ok", lambda x, w: True)
    x, w, b = make_case((70,), 48, 40, dtype)
    out = torch.full((70, 40), float("nan"), dtype=dtype)
    kernel.linear_geglu_triton(x, w, b, out, approximate_tanh=False,
                               config=kernel._config(32, 16, 16, 1, 1, group_m=2, tma=True, split_k=split_k))
    assert_close(out, reference64(x, w, b), dtype, reduction_size=48, what=f"TMA branch {dtype}")


@settings(max_examples=15 if GPU else 8)
@given(lead=st.lists(st.sampled_from([1, 2, 7]), max_size=2).map(tuple), K=sizes, inner=sizes,
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), approximate=st.sampled_from(["none", "tanh"]),
       x_layout=st.sampled_from(["contiguous", "row_slice", "permuted"]))
def test_cublas_backend_matches_reference(lead, K, inner, dtype, bias, approximate, x_layout):
    """The second backend, F.linear then the geglu kernel, on any layout F.linear takes."""
    x, w, b = make_case(lead, K, inner, dtype, x_layout, bias=bias)
    note(f"x {tuple(x.shape)} stride={x.stride()} {dtype} bias={bias} {approximate}")
    check(x, w, b, approximate, backend="cublas")


def test_split_plans_end_the_last_wave_early():
    """The 160 tiles of 128 x 128 at M = 512, N = 5120 on 132 multiprocessors: the big tiles keep the 33 column
    tiles of one whole wave, the tail configs the remaining 896 columns; whole waves and lone partial waves get no
    split."""
    from sdkernels.kernels.linear_geglu import TAIL_CONFIGS, TMA_CONFIGS, split_plans
    big = TMA_CONFIGS[0]
    plans = split_plans(512, 5120, big, TAIL_CONFIGS, sms=132)
    assert [plan[1][0] for plan in plans] == TAIL_CONFIGS
    assert all(plan == ((big, 0, 33 * 128), (plan[1][0], 33 * 128, 5120)) for plan in plans)
    assert split_plans(512, 33 * 128, big, TAIL_CONFIGS, sms=132) == []   # 132 tiles: one whole wave
    assert split_plans(256, 5120, big, TAIL_CONFIGS, sms=132) == []       # 80 tiles: less than one wave
    assert len(split_plans(1024, 5120, big, TAIL_CONFIGS, sms=132)) == 2 * len(TAIL_CONFIGS)  # 320: 1 or 2 resident


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_a_split_plan_covers_every_column(dtype, split_k):
    """Two launches over columns [0, 32) and [32, 70) with different tiles write every output exactly right; the
    second splits K = 40 (three blocks of 16) into split_k slices, the fourth of which is empty."""
    from sdkernels.kernels.linear_geglu import INTERPRETER_CONFIG, _config, _Launch
    if GPU:
        pytest.skip("CPU lane (the GPU lane runs every tail config and the tuned plans at SD shapes)")
    x, w, b = make_case((50,), 40, 70, dtype)
    out = torch.full((50, 70), float("nan"), dtype=dtype)
    flags = dict(HAS_BIAS=True, APPROXIMATE_TANH=False, INPUT_PRECISION="ieee", DOT_IN_FP32=False)
    tail = _config(32, 32, 16, 1, 1, group_m=2, split_k=split_k)
    _Launch(x, w, b, out, flags).run(((INTERPRETER_CONFIG, 0, 32), (tail, 32, 70)))
    assert_close(out, reference64(x, w, b), dtype, reduction_size=40, what=f"split plan {dtype} split_k={split_k}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [c for c in TAIL_CONFIGS if c.kwargs["SPLIT_K"] > 1], ids=str)
def test_split_k_tails(config):
    """Each split-K tail config after a 128 x 128 main launch, on a shape with tails in M, N and K."""
    from sdkernels.kernels.linear_geglu import TMA_CONFIGS, _Launch, tma_ok
    x, w, b = make_case((333,), 200, 301, torch.float16)
    main = TMA_CONFIGS[0] if tma_ok(x, w) else CONFIGS[0]
    if config.kwargs["USE_TMA"] and not tma_ok(x, w):
        pytest.skip("TMA configs need a Hopper GPU")
    out = torch.full((333, 301), float("nan"), device=DEVICE, dtype=torch.float16)
    flags = dict(HAS_BIAS=True, APPROXIMATE_TANH=False, INPUT_PRECISION="tf32", DOT_IN_FP32=False)
    _Launch(x, w, b, out, flags).run(((main, 0, 128), (config, 128, 301)))
    assert_close(out, reference64(x, w, b), torch.float16, reduction_size=200, what=f"split-K tail {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(512, 1280, 5120), (1000, 320, 1280)], ids=str)
def test_tuned_plans_are_right_and_kept(monkeypatch, tmp_path, shape):
    """Tuning (single launches and split plans, timed) at SD shapes: the tuning call's output and the tuned
    plan's are both right; a later process (a fresh store on the same file, nothing in memory) runs the stored
    plan without autotuning or timing anything."""
    monkeypatch.setenv("SDKERNELS_AUTOTUNE", "1")
    from sdkernels import tuning
    from sdkernels.kernels import linear_geglu as kernel
    store = tmp_path / "tuning.json"
    monkeypatch.setattr(kernel, "_plan_choices", tuning.MeasuredChoice("linear_geglu_plans", path=store,
                                                                       can_measure=lambda *key: True))
    M, K, inner = shape
    x, w, b = make_case((M,), K, inner, torch.float16)
    for call in ("tuning", "tuned"):
        check(x, w, b)
        print(f"{call}: {kernel.tuned_plan(M, inner, K, torch.float16)}")
    plan = kernel.tuned_plan(M, inner, K, torch.float16)
    assert plan is not None and store.exists()

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a stored plan was measured again")
    monkeypatch.setattr(kernel, "_plan_choices", tuning.MeasuredChoice("linear_geglu_plans", path=store,
                                                                       timer=must_not_measure,
                                                                       can_measure=lambda *key: True))
    for autotuned in (kernel._autotuned_tma, kernel._autotuned):
        monkeypatch.setattr(autotuned, "cache", {})
        monkeypatch.setattr(autotuned, "run", must_not_measure)
    check(x, w, b)
    assert kernel.tuned_plan(M, inner, K, torch.float16) == plan


def test_plans_round_trip_through_their_stored_names():
    from sdkernels.kernels.linear_geglu import TAIL_CONFIGS, TMA_CONFIGS, _plan_from_name, _plan_name
    plan = ((TMA_CONFIGS[1], 0, 4224), (TAIL_CONFIGS[1], 4224, 5120))
    again = _plan_from_name(_plan_name(plan))
    assert [(str(c), c.pre_hook is None, b, e) for c, b, e in again] == \
        [(str(c), c.pre_hook is None, b, e) for c, b, e in plan]


@pytest.mark.gpu
def test_fp32_follows_torch_tf32_setting():
    """TF32 off: IEEE fp32 dots within fp32's tolerance. TF32 on: the kernel's dots take TF32 as torch's matmul
    may, with TF32's error: above fp32's, within 2**-9 relative (operands cut to TF32's 10 mantissa bits). On an
    H200 it was 1.3e-3 against 3.8e-4 for torch's TF32 linear, most likely Triton's dots truncating the operands
    where cuBLAS rounds them."""
    from sdkernels.kernels.linear_geglu import input_precision
    x, w, b = make_case((300,), 512, 256, torch.float32)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert input_precision(torch.float32) == "ieee"
        check(x, w, b)  # fp32 tolerance: must be IEEE fp32, not tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        assert input_precision(torch.float32) == "tf32"
        with sdkernels.use_backend("triton", op="linear_geglu", strict=True):
            out = linear_geglu(x, w, b)
        a, g = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
        eager_tf32 = a * torch.nn.functional.gelu(g)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    expected = reference64(x, w, b)
    ours, torchs = relative_error(out, expected), relative_error(eager_tf32, expected)
    assert 1e-5 < ours <= 2**-9, f"TF32 error {ours:.2e} (torch's TF32 linear: {torchs:.2e})"


def _capture(fn):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_cuda_graph_never_autotunes(monkeypatch):
    """An untuned shape met first inside a capture runs the default config (with one warning) instead of
    autotuning, which would break the capture; once tuned outside, a capture uses the tuned config quietly."""
    monkeypatch.setenv("SDKERNELS_AUTOTUNE", "1")
    from sdkernels.kernels.linear_geglu import default_config, linear_geglu_triton
    x, w, b = make_case((2, 1001), 320, 640, torch.float16)  # M = 2002: a shape no other test tunes
    geglu_op = lambda: linear_geglu(x, w, b)  # noqa: E731
    # Compile the default config's kernel for this shape first: the test is about autotuning, not compiling.
    linear_geglu_triton(x.view(2002, 320), w, b, torch.empty(2002, 640, device=DEVICE, dtype=torch.float16),
                        approximate_tanh=False, config=default_config(x.dtype, x.device))
    with sdkernels.use_backend("triton", strict=True):
        with pytest.warns(UserWarning, match="first seen during CUDA-graph capture"):
            graph, out = _capture(geglu_op)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert_close(out, reference64(x, w, b), torch.float16, reduction_size=320, what="default-config replay")
        geglu_op()  # tunes, outside capture
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdkernels")
            graph, out = _capture(geglu_op)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference64(x, w, b), torch.float16, reduction_size=320, what="tuned replay")


# ---- the diffusers GEGLU patcher --------------------------------------------------------------------------------

def _patching():
    pytest.importorskip("diffusers")
    import importlib
    return importlib.import_module("sdkernels.patch")  # the module (sdkernels.patch is the function)


def feed_forward(dim=24, mult=2, activation="geglu", bias=True, dtype=torch.float32):
    from diffusers.models.attention import FeedForward
    torch.manual_seed(1)
    return FeedForward(dim, mult=mult, activation_fn=activation, bias=bias).to(DEVICE, dtype).eval()


def unpatched_output(model, x):
    """What the model computes with every sdkernels patch taken off (then put back)."""
    p = _patching()
    p.unpatch(model)
    try:
        return model(x)
    finally:
        p.patch(model, ops=["geglu", "gelu"])


def assert_patched_matches(model, x, expect_backend, op, reduction_size=24, dtype=torch.float32):
    dispatch._last_backend.pop(op, None)
    out = model(x)
    assert dispatch.last_backend(op) == expect_backend, f"expected {op} on {expect_backend}"
    assert_close(out, unpatched_output(model, x).double(), dtype, reduction_size, what=f"{op} patched")
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_patched_feed_forward_matches_and_unpatches(bias):
    p = _patching()
    ff = feed_forward(bias=bias)
    x = torch.randn(2, 7, 24, device=DEVICE)
    with torch.no_grad():
        expected = ff(x)
        p.patch(ff, ops=["geglu", "gelu"])
        assert p.summary(ff).replaced == {"geglu": 1, "gelu": 0}
        assert p.patched_by(ff.net[0]) == ("geglu",)
        p.patch(ff, ops=["geglu"])  # idempotent
        assert_patched_matches(ff, x, "triton", "linear_geglu")
        p.unpatch(ff)
        assert "forward" not in ff.net[0].__dict__ and not p.patched_by(ff.net[0])
        torch.testing.assert_close(ff(x), expected, rtol=0, atol=0)


def test_patched_forward_with_grad_runs_the_original():
    p = _patching()
    ff = feed_forward()
    p.patch(ff, ops=["geglu"])
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    dispatch._last_backend.pop("linear_geglu", None)
    ff(x).sum().backward()  # autograd needs the eager path: our ops have no backward
    assert dispatch.last_backend("linear_geglu") is None and x.grad is not None
    p.unpatch(ff)


@pytest.mark.usefixtures("no_tf32")
def test_patched_tiny_unet_matches():
    from diffusers import UNet2DConditionModel
    p = _patching()
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).to(DEVICE).eval()
    sample = torch.randn(2, 4, 8, 8, device=DEVICE)
    text = torch.randn(2, 5, 16, device=DEVICE)
    with torch.no_grad():
        expected = unet(sample, 10, text).sample
        p.patch(unet, ops=["geglu", "gelu"])
        from diffusers.models.activations import GEGLU
        blocks = sum(isinstance(m, GEGLU) for m in unet.modules())
        assert blocks >= 3 and p.summary(unet).replaced["geglu"] == blocks
        dispatch._last_backend.pop("linear_geglu", None)
        out = unet(sample, 10, text).sample
        assert dispatch.last_backend("linear_geglu") == "triton"
        p.unpatch(unet)
    assert_close(out, expected.double(), torch.float32, reduction_size=32 * 9, what="tiny UNet")


# ---- LoRA keeps applying --------------------------------------------------------------------------------------

def _inject_lora(model, name, seed):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`")  # a second adapter, on purpose
        return peft.inject_adapter_in_model(config, model, adapter_name=name)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("inject_first", [True, False])
def test_peft_lora_applies_switches_disables_merges_and_unloads(inject_first):
    p = _patching()
    ff = feed_forward()
    x = torch.randn(2, 5, 24, device=DEVICE)
    with torch.no_grad():
        base = ff(x)
        if inject_first:
            _inject_lora(ff, "a", seed=3)
            p.patch(ff, ops=["geglu"])
        else:
            p.patch(ff, ops=["geglu"])
            _inject_lora(ff, "a", seed=3)
        assert p.patched_by(ff.net[0]) == ("geglu",)
        with_a = assert_patched_matches(ff, x, "triton", "geglu")  # wrapped proj, then the elementwise kernel
        assert (with_a - base).abs().max() > 1e-2, "the LoRA adapter must change the output"

        _inject_lora(ff, "b", seed=4)
        for layer in _lora_layers(ff):
            layer.set_adapter("b")
        with_b = assert_patched_matches(ff, x, "triton", "geglu")
        assert (with_b - with_a).abs().max() > 1e-2

        for layer in _lora_layers(ff):
            layer.enable_adapters(False)
        assert_close(assert_patched_matches(ff, x, "triton", "geglu"), base.double(), torch.float32, 24)
        for layer in _lora_layers(ff):
            layer.enable_adapters(True)
            layer.merge()
        assert_close(assert_patched_matches(ff, x, "triton", "geglu"), with_b.double(), torch.float32, 24)
        for layer in _lora_layers(ff):
            layer.unmerge()

        ff.net[0].proj = ff.net[0].proj.get_base_layer()  # unload: the plain Linear is back, so is the fused matmul
        assert_close(assert_patched_matches(ff, x, "triton", "linear_geglu"), base.double(), torch.float32, 24)
    p.unpatch(ff)


def test_diffusers_lora_compatible_linear_keeps_lora():
    p = _patching()
    try:
        from diffusers.models.lora import LoRACompatibleLinear, LoRALinearLayer
    except ImportError:
        pytest.skip("this diffusers has no LoRACompatibleLinear (removed after its deprecation)")
    ff = feed_forward()
    x = torch.randn(2, 5, 24, device=DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LoRACompatibleLinear is deprecated in diffusers
        base = ff(x)
        plain = ff.net[0].proj
        wrapped = LoRACompatibleLinear(24, plain.out_features).to(DEVICE)
        wrapped.load_state_dict(plain.state_dict())
        ff.net[0].proj = wrapped
        p.patch(ff, ops=["geglu"])
        assert_patched_matches(ff, x, "triton", "linear_geglu")  # no lora_layer: still the fused matmul
        lora = LoRALinearLayer(24, plain.out_features, rank=4).to(DEVICE)
        torch.nn.init.normal_(lora.up.weight, std=0.3)
        wrapped.set_lora_layer(lora)
        out = assert_patched_matches(ff, x, "triton", "geglu")
        assert (out - base).abs().max() > 1e-2
    p.unpatch(ff)


@pytest.mark.gpu
def test_patched_feed_forward_in_cuda_graph():
    p = _patching()
    ff = feed_forward(dim=320, mult=4, dtype=torch.float16)
    x = torch.randn(2, 4096, 320, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        expected = ff(x)
        p.patch(ff, ops=["geglu"])
        ff(x)  # warm-up: compiles and tunes outside the capture
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdkernels")
            graph, out = _capture(lambda: ff(x))
        graph.replay()
        torch.cuda.synchronize()
        p.unpatch(ff)
    assert_close(out, expected.double(), torch.float16, reduction_size=1280, what="graph replay")


def test_cublas_backend_is_left_to_graphs_while_torch_allows_reduced_precision_reductions():
    """Switching torch's reduced-precision reduction flags off around each projection costs every later cuBLAS call
    host time: the cublas backend runs outside CUDA graphs only where the fused kernel cannot, or the flags are off."""
    x, w, b = make_case((6,), 8, 5, torch.float16)
    op = dispatch.ops()["linear_geglu"]
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_fp16_reduced_precision_reduction
    try:
        matmul.allow_fp16_reduced_precision_reduction = True
        assert "reduced precision" in op.reasons(x, w, b, "none")["cublas"]
        with tuning.optimizing_for("device"):
            assert op.reasons(x, w, b, "none")["cublas"] is None
        unmergeable, w2, b2 = make_case((3, 4), 8, 5, torch.float16, x_layout="permuted")
        assert op.reasons(unmergeable, w2, b2, "none")["cublas"] is None
        matmul.allow_fp16_reduced_precision_reduction = False
        assert op.reasons(x, w, b, "none")["cublas"] is None
    finally:
        matmul.allow_fp16_reduced_precision_reduction = previous
