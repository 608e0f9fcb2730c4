"""The fused ResNet block: sdkernels::conv3x3_fused (prologue GroupNorm + SiLU; epilogue bias, per-(sample, channel)
add, shortcut, scale, output statistics) and sdkernels::group_norm_stats against float64 references, the fused
forward against diffusers' ResnetBlock2D, errors, fallbacks, torch integration, and the opt-in resnet_block patcher
(what it takes, what it leaves to resnet_gn_silu, where it runs the original, patch/unpatch on a tiny UNet)."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import sdkernels
from sdkernels import dispatch
from sdkernels.ops.conv3x3 import conv3x3_dispatch, conv3x3_fused, conv3x3_reference
from sdkernels.ops.group_norm import group_norm_stats, group_norm_stats_reference
from sdkernels.ops.resnet_block import Norm, resnet_block
from sdkernels.patch import patch, patched_by, summary, unpatch
from sdkernels.patch import patchers as registered_patchers
from sdkernels.testing import assert_close, relative_error
from conftest import DEVICE, GPU, left_but_head_dims

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from test_patch import randomize, snapshot, tiny_unet, unet_inputs  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ("conv3x3_fused", "group_norm_stats")
# Small tiles under the interpreter (several pixel and channel tiles, and tails, at the sizes it can afford); None
# keeps the launcher's own choice.
SMALL_TILES = (16, 16, 16, 1, 1)
# Each example costs seconds: in the interpreter, and on a GPU in compiling a new specialization of the kernel.
FEW = settings(max_examples=12 if not GPU else 30)
# SiLU's exp(-y) overflows to inf for very negative y, which the interpreter's numpy reports; sigmoid is then 0, as
# on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(autouse=True)
def _exact_fp32(no_tf32):
    """fp32 convolutions without TF32 on GPUs, in our kernel (it follows cudnn.allow_tf32) and in the references."""
    yield


@contextlib.contextmanager
def forced(conv_backend="triton"):
    """Both kernels of the fused block forced to Triton (the conv to ``conv_backend``: "triton", the prologue kernel,
    or "triton_bordered"): a fallback to the reference raises instead."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdkernels.use_backend(conv_backend, op="conv3x3_fused", strict=True))
        stack.enter_context(sdkernels.use_backend("triton", op="group_norm_stats", strict=True))
        yield


def tiles(monkeypatch, config):
    if config is not None:
        import sdkernels.kernels.conv3x3 as k
        monkeypatch.setattr(k, "INTERPRETER_CONFIG", config)


def rand(*shape, dtype=torch.float32, scale=1.0, offset=0.0, layout="channels_last"):
    t = (torch.randn(shape, device=DEVICE) * scale + offset).to(dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" and t.dim() == 4 else t


def up(t):
    return None if t is None else t.double()


def conv_args(x, g_in, cout, g_out, norm, add, epilogue, residual_layout="channels_last"):
    """conv3x3_fused's keyword arguments for x: norm "none" | "plain" | "affine" (the prologue's GroupNorm over g_in
    groups, with or without its affine), a per-(sample, channel) add or not, epilogue "stats" (g_out groups) |
    "residual" (and a scale) | "both" | "none"."""
    batch, cin, h, w = x.shape
    dtype = x.dtype
    residual = epilogue in ("residual", "both")
    return dict(
        norm_stats=group_norm_stats(x, g_in, 1e-5) if norm != "none" else None,
        norm_weight=rand(cin, dtype=dtype) if norm == "affine" else None,
        norm_bias=rand(cin, dtype=dtype) if norm == "affine" else None,
        add=rand(batch, cout, dtype=dtype) if add else None,
        residual=rand(batch, cout, h, w, dtype=dtype, layout=residual_layout) if residual else None,
        output_scale_factor=2.0 if residual else 1.0,
        stats_groups=g_out if epilogue in ("stats", "both") else 0, stats_eps=1e-6)


# ---- the conv alone -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_plain_conv_matches_float64_conv2d(dtype, layout, monkeypatch):
    tiles(monkeypatch, SMALL_TILES)
    x = rand(2, 19, 7, 5, dtype=dtype, layout=layout)
    w, b = rand(21, 19, 3, 3, dtype=dtype, scale=(9 * 19) ** -0.5), rand(21, dtype=dtype)
    with forced():
        out, stats = conv3x3_fused(x, w, b)
    assert out.dtype == dtype and stats.shape == (2, 0, 2)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, F.conv2d(x.double(), w.double(), b.double(), padding=1), dtype, 9 * 19, what="plain conv")


def test_reference_is_eager_conv_of_silu_group_norm():
    """The op's reference against the composition it stands for, in float64: the padded border is zero after the
    normalization, as F.conv2d pads its (normalized) input."""
    f64 = dict(dtype=torch.float64)
    x, w, b = rand(2, 6, 5, 4, offset=3.0, **f64), rand(4, 6, 3, 3, **f64), None
    nw, nb, add, r = rand(6, **f64), rand(6, offset=2.0, **f64), rand(2, 4, **f64), rand(2, 4, 5, 4, **f64)
    eager = (F.conv2d(F.silu(F.group_norm(x, 3, nw, nb, 1e-5)), w, b, padding=1) + add[:, :, None, None] + r) / 1.5
    out, stats = conv3x3_reference(x, w, b, group_norm_stats_reference(x, 3, 1e-5), nw, nb, add, r, 1.5, 2, 1e-6)
    torch.testing.assert_close(out, eager)
    mean, var = eager.reshape(2, 2, -1).mean(-1), eager.reshape(2, 2, -1).var(-1, unbiased=False)
    torch.testing.assert_close(stats, torch.stack([mean, (var + 1e-6).rsqrt()], -1))


@FEW
@given(batch=st.integers(1, 2), g_in=st.sampled_from([1, 2, 3]), per_in=st.integers(1, 7), cout=st.integers(1, 24),
       h=st.integers(1, 9), w=st.integers(1, 9), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["channels_last", "contiguous"]), norm=st.sampled_from(["none", "affine", "plain"]),
       bias=st.booleans(), add=st.booleans(), epilogue=st.sampled_from(["stats", "residual", "both", "none"]),
       small_tiles=st.booleans())
def test_conv_matches_reference(batch, g_in, per_in, cout, h, w, dtype, layout, norm, bias, add, epilogue,
                                small_tiles):
    cin = g_in * per_in
    g_out = next(g for g in (3, 2, 1) if cout % g == 0)
    torch.manual_seed(0)  # the example alone decides the data, so that a failure reproduces
    note(f"N={batch} Cin={cin} (G={g_in}) Cout={cout} (G={g_out}) H={h} W={w} {dtype} {layout} norm={norm} "
         f"bias={bias} add={add} epilogue={epilogue} small_tiles={small_tiles}")
    with pytest.MonkeyPatch.context() as mp:
        tiles(mp, SMALL_TILES if small_tiles else None)
        x = rand(batch, cin, h, w, dtype=dtype, offset=0.5, layout=layout)
        args = conv_args(x, g_in, cout, g_out, norm, add, epilogue)
        weight = rand(cout, cin, 3, 3, dtype=dtype, scale=(9 * cin) ** -0.5)
        b = rand(cout, dtype=dtype) if bias else None
        with forced():
            out, stats = conv3x3_fused(x, weight, b, **args)
    ref, _ = conv3x3_reference(up(x), up(weight), up(b), *[up(v) if isinstance(v, torch.Tensor) else v
                                                          for v in args.values()])
    assert_close(out, ref, dtype, 9 * cin, what="conv3x3_fused")
    channels_last = layout == "channels_last" and cin > 1  # one channel: NCHW and NHWC are the same strides
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if args["stats_groups"]:
        # Statistics of the output as stored: fp32 sums of the values the next GroupNorm will read.
        expected = group_norm_stats_reference(out.double(), g_out, 1e-6)
        assert stats.dtype == torch.float32
        assert_close(stats, expected, torch.float32, h * w * cout // g_out, what="output statistics")


@FEW
@given(batch=st.integers(1, 2), g_in=st.sampled_from([1, 2, 4]), cin8=st.integers(1, 3), cout=st.integers(1, 24),
       h=st.integers(1, 9), w=st.integers(1, 9), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       layout=st.sampled_from(["channels_last", "contiguous"]), norm=st.sampled_from(["none", "affine", "plain"]),
       bias=st.booleans(), add=st.booleans(), epilogue=st.sampled_from(["stats", "residual", "both", "none"]),
       split=st.sampled_from([None, 1, 2, 3]))
def test_bordered_conv_matches_reference(batch, g_in, cin8, cout, h, w, dtype, layout, norm, bias, add, epilogue,
                                         split):
    """The triton_bordered backend (kernels/conv3x3_padded.py: the normalized input written once into a zero-
    bordered buffer, then nine shifted 2-D GEMMs), K split or not (its partials added by the reduce kernel), against
    the float64 reference."""
    cin = 8 * cin8
    g_out = next(g for g in (3, 2, 1) if cout % g == 0)
    torch.manual_seed(0)
    note(f"N={batch} Cin={cin} (G={g_in}) Cout={cout} (G={g_out}) H={h} W={w} {dtype} {layout} norm={norm} "
         f"bias={bias} add={add} epilogue={epilogue} split={split}")
    x = rand(batch, cin, h, w, dtype=dtype, offset=0.5, layout=layout)
    args = conv_args(x, g_in, cout, g_out, norm, add, epilogue, residual_layout=layout)
    weight = rand(cout, cin, 3, 3, dtype=dtype, scale=(9 * cin) ** -0.5)  # channels_last, as the backend needs
    b = rand(cout, dtype=dtype) if bias else None
    with pytest.MonkeyPatch.context() as mp:
        import sdkernels.kernels.conv3x3_padded as k
        if split is not None:
            mp.setattr(k, "split_count", lambda *a, **kw: split)
        with forced("triton_bordered"):
            out, stats = conv3x3_fused(x, weight, b, **args)
    ref, _ = conv3x3_reference(up(x), up(weight), up(b), *[up(v) if isinstance(v, torch.Tensor) else v
                                                          for v in args.values()])
    assert_close(out, ref, dtype, 9 * cin, what="conv3x3_fused (triton_bordered)")
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    if args["stats_groups"]:
        expected = group_norm_stats_reference(out.double(), g_out, 1e-6)
        assert stats.dtype == torch.float32
        assert_close(stats, expected, torch.float32, h * w * cout // g_out, what="output statistics")


@pytest.mark.parametrize("why, change", [
    ("fp16 or bf16", lambda x, w: (x.float(), w.float())),
    ("multiple of 8", lambda x, w: (x[:, :12], w[:, :12])),
    ("weight not channels_last", lambda x, w: (x, w.contiguous())),
])
def test_bordered_backend_says_what_it_cannot_run(why, change):
    """What the bordered kernels cannot take, triton_bordered declines with its reason (dispatch then runs the
    prologue kernel or the reference), and forcing it there fails loudly instead of computing something else."""
    x, w = change(rand(1, 16, 4, 4, dtype=torch.float16), rand(8, 16, 3, 3, dtype=torch.float16))
    reasons = conv3x3_dispatch.reasons(x, w, None, None, None, None, None, None, 1.0, 0, 1e-6)
    assert why in reasons["triton_bordered"]
    with pytest.raises(RuntimeError, match="triton_bordered"), forced("triton_bordered"):
        conv3x3_fused(x, w)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("plan", [None, "tile", "flat", "rows"])
def test_group_norm_stats_match_reference(layout, plan, monkeypatch):
    """Each way group_norm_stats computes: its own choice, the tile kernel's statistics-only mode, the flat plan's
    partials and the rows plan's (taken only above FLAT_STATS_MAX elements a group, lowered here)."""
    import sdkernels.kernels.group_norm as k
    if plan is not None:
        monkeypatch.setenv("SDKERNELS_GN_PLAN", plan)
        monkeypatch.setattr(k, "FLAT_STATS_MAX", 0)
    for shape, G in (((2, 6, 5, 7), 3), ((1, 8, 33, 35), 2), ((3, 4, 1, 1), 4)):
        x = rand(*shape, offset=100.0, layout=layout)  # a large mean: the statistics merge (mean, M2), not sums
        with sdkernels.use_backend("triton", op="group_norm_stats", strict=True):
            stats = group_norm_stats(x, G, 1e-6)
        assert_close(stats, group_norm_stats_reference(x.double(), G, 1e-6), torch.float32, x[0].numel() // G,
                     what=f"group_norm_stats {shape}")


# ---- the fused block against diffusers' ResnetBlock2D ---------------------------------------------------------

# One ulp at 1: over a block's few outputs in the interpreter, two roundings apart (fused vs eager) can differ by
# that much in relative error, whatever eager's own error is.
HALF_ERROR_FLOOR = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def make_block(cin, cout, groups, temb_channels, output_scale_factor=1.0, **kwargs):
    block = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb_channels, groups=groups,
                          output_scale_factor=output_scale_factor, **kwargs)
    return randomize(block).to(DEVICE)


@FEW
@given(batch=st.integers(1, 2), groups=st.sampled_from([1, 2, 3, 4]), per_in=st.integers(1, 5),
       per_out=st.integers(1, 5), h=st.integers(1, 10), w=st.integers(1, 10), temb=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["channels_last", "contiguous"]),
       output_scale_factor=st.sampled_from([1.0, 2.0]))
def test_block_matches_diffusers(batch, groups, per_in, per_out, h, w, temb, dtype, layout, output_scale_factor):
    cin, cout = groups * per_in, groups * per_out
    assume(batch * min(per_in, per_out) * h * w > 1)  # F.group_norm (so diffusers) refuses one value per group
    torch.manual_seed(0)  # the example alone decides the data, so that a failure reproduces
    note(f"N={batch} Cin={cin} Cout={cout} G={groups} H={h} W={w} temb={temb} {dtype} {layout} "
         f"scale={output_scale_factor}")
    block = make_block(cin, cout, groups, 7 if temb else None, output_scale_factor)
    x = rand(batch, cin, h, w, dtype=dtype, layout=layout)
    t = rand(batch, 7, dtype=dtype) if temb else None
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(up(x), up(t))
        eager = copy.deepcopy(block).to(dtype)(x, t)
        patch(block.to(dtype), ops=["resnet_block"])
        assert patched_by(block) == ("resnet_block",)
        with forced():
            out = block(x, t)
    assert out.dtype == dtype and out.shape == (batch, cout, h, w)
    fused, base = relative_error(out, expected), relative_error(eager, expected)
    note(f"relative error vs float64: fused {fused:.2e}, diffusers in {dtype} {base:.2e}")
    if dtype != torch.float32:  # (in fp32 both are a few ulps, and a ratio of them means nothing)
        assert fused <= 2 * base + HALF_ERROR_FLOOR[dtype], "less accurate than diffusers' block in the same dtype"
    # Normalizing a group of few values amplifies one rounding of the conv output (a bf16 one by up to 1e-1, an fp16
    # one of a 2-value group by 5 ulps): the elementwise bound holds in fp32, and in fp16 for groups of 16 values on.
    if dtype == torch.float32 or (dtype == torch.float16 and batch * per_out * h * w >= 16):
        assert_close(out, expected, dtype, 9 * max(cin, cout), what="fused block vs float64 diffusers")


def test_block_function_without_diffusers_modules():
    """sdkernels.ops.resnet_block on plain tensors, identity shortcut and a given one, against a float64 block."""
    block = make_block(6, 6, 3, 5, output_scale_factor=1.5)
    x, t = rand(2, 6, 4, 3), rand(2, 5)
    with torch.no_grad():
        proj = block.time_emb_proj(F.silu(t))
        n1, n2 = (Norm(n.num_groups, n.weight, n.bias, n.eps) for n in (block.norm1, block.norm2))
        with forced():
            out = resnet_block(x, n1, block.conv1.weight, block.conv1.bias, n2, block.conv2.weight,
                               block.conv2.bias, temb=proj, output_scale_factor=1.5)
            shifted = resnet_block(x, n1, block.conv1.weight, block.conv1.bias, n2, block.conv2.weight,
                                   block.conv2.bias, temb=proj, shortcut=x + 1, output_scale_factor=1.5)
        expected = block.double()(up(x), up(t))
    assert_close(out, expected, torch.float32, 9 * 6, what="resnet_block")
    assert_close(shifted, expected + 1 / 1.5, torch.float32, 9 * 6, what="resnet_block, shortcut")


# ---- errors and fallbacks -------------------------------------------------------------------------------------

def _conv_args(**change):
    args = dict(x=torch.randn(2, 6, 4, 4), weight=torch.randn(8, 6, 3, 3), bias=None, norm_stats=None,
                norm_weight=None, norm_bias=None, add=None, residual=None, output_scale_factor=1.0, stats_groups=0,
                stats_eps=1e-6)
    args.update(change)
    return args


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(2, 6, 4)), "rank 3"),
    (dict(weight=torch.randn(8, 6, 1, 1)), r"weight must be \(Cout, 6, 3, 3\)"),
    (dict(weight=torch.randn(8, 6, 3, 3).double()), "weight has dtype torch.float64"),
    (dict(x=torch.randint(0, 3, (2, 6, 4, 4)), weight=torch.randint(0, 3, (8, 6, 3, 3))), "floating point"),
    (dict(bias=torch.randn(6)), r"bias must have shape \(8,\)"),
    (dict(norm_stats=torch.randn(2, 4, 2)), "4 groups, which must divide x's 6 channels"),
    (dict(norm_stats=torch.randn(2, 3)), r"norm_stats must be \(2, G, 2\)"),
    (dict(norm_weight=torch.randn(6)), "need norm_stats"),
    (dict(add=torch.randn(2, 6)), r"add must have shape \(2, 8\)"),
    (dict(residual=torch.randn(2, 8, 4, 5)), r"residual must have shape \(2, 8, 4, 4\)"),
    (dict(residual=torch.randn(2, 8, 4, 4, device="meta")), "residual is on meta"),
    (dict(output_scale_factor=0.0), "output_scale_factor"),
    (dict(stats_groups=3), "positive divisor of the 8 output channels"),
    (dict(stats_groups=2, stats_eps=-1.0), "stats_eps"),
])
def test_conv_invalid_inputs_raise_clear_errors(change, match):
    with pytest.raises(sdkernels.SdkernelsInputError, match=match) as e:
        conv3x3_fused(**_conv_args(**change))
    assert "sdkernels::conv3x3_fused" in str(e.value) and "x=Tensor(shape=" in str(e.value)


def test_group_norm_stats_errors_name_their_op():
    with pytest.raises(sdkernels.SdkernelsInputError, match="sdkernels::group_norm_stats: num_groups=4"):
        group_norm_stats(torch.randn(2, 6, 3, 3), 4)


def test_unsupported_inputs_fall_back_once_with_warning():
    args = _conv_args(x=torch.randn(2, 6, 4, 4, dtype=torch.float64, device=DEVICE),
                      weight=torch.randn(8, 6, 3, 3, dtype=torch.float64, device=DEVICE), stats_groups=2)
    dispatch._warned.clear()
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="conv3x3_fused.*float64"):
        out, stats = conv3x3_fused(**args)
    assert dispatch.last_backend("conv3x3_fused") == "reference" and stats.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        conv3x3_fused(**args)  # the second time it is quiet
    torch.testing.assert_close(out, F.conv2d(args["x"], args["weight"], padding=1))
    # fp64 statistics for an fp32 input: the kernel reads fp32 only, so the reference runs.
    x = torch.randn(2, 6, 4, 4, device=DEVICE)
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="norm_stats is torch.float64"):
        conv3x3_fused(x, torch.randn(8, 6, 3, 3, device=DEVICE), norm_stats=group_norm_stats_reference(x.double(), 2))


# ---- torch integration ----------------------------------------------------------------------------------------

def small_conv_args(dtype=torch.float32):
    x = rand(2, 6, 5, 3, dtype=dtype)
    return (x, rand(4, 6, 3, 3, dtype=dtype, scale=0.2), rand(4, dtype=dtype), group_norm_stats(x, 3),
            rand(6, dtype=dtype), rand(6, dtype=dtype), rand(2, 4, dtype=dtype), rand(2, 4, 5, 3, dtype=dtype), 2.0,
            2, 1e-6)


def test_opcheck():
    args = small_conv_args()
    torch.library.opcheck(torch.ops.sdkernels.conv3x3_fused.default, args)
    torch.library.opcheck(torch.ops.sdkernels.conv3x3_fused.default,
                          args[:3] + (None, None, None, None, None, 1.0, 0, 1e-6))
    torch.library.opcheck(torch.ops.sdkernels.group_norm_stats.default, (args[0], 3, 1e-5))


def test_torch_compile_fullgraph():
    block = make_block(6, 8, 2, 5)
    n1, n2 = (Norm(n.num_groups, n.weight, n.bias, n.eps) for n in (block.norm1, block.norm2))
    x, proj = rand(2, 6, 4, 3), rand(2, 8)

    def f(x, proj):
        return resnet_block(x * 2, n1, block.conv1.weight, block.conv1.bias, n2, block.conv2.weight,
                            block.conv2.bias, temb=proj, shortcut=block.conv_shortcut(x * 2)) + 1

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
        torch.testing.assert_close(compiled(x, proj), f(x, proj))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    block = make_block(64, 128, 32, 32).half().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(block).double()
    x, t = rand(2, 64, 16, 16, dtype=torch.float16), rand(2, 32, dtype=torch.float16)
    with torch.no_grad():
        patch(block, ops=["resnet_block"])
        with forced():
            block(x, t)  # warm-up: compiles the kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = block(x, t)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert_close(static_out, reference(up(x), up(t)), torch.float16, 9 * 128, what="graph replay")


# ---- the patcher ----------------------------------------------------------------------------------------------

def test_registered_opt_in_ahead_of_resnet_gn_silu():
    names = [p.name for p in registered_patchers()]
    assert names.index("resnet_block") < names.index("resnet_gn_silu")
    assert "resnet_block" not in sdkernels.default_ops()
    block = make_block(4, 4, 2, 3)
    patch(block)
    assert patched_by(block) == ("resnet_gn_silu",)  # the default leaves it alone


@pytest.mark.parametrize("kwargs, reason", [
    (dict(down=True), "up/down-sampling"),
    (dict(up=True), "up/down-sampling"),
    (dict(time_embedding_norm="scale_shift"), "scale_shift"),
    (dict(non_linearity="mish"), "nonlinearity is Mish"),
])
def test_blocks_it_leaves_go_to_resnet_gn_silu(kwargs, reason):
    block = make_block(4, 4, 2, 3, **kwargs)
    x, t = rand(2, 4, 6, 6), rand(2, 3)
    with torch.no_grad():
        expected = block(x, t)
        patch(block, ops=sdkernels.default_ops() + ["resnet_block"])
        with sdkernels.use_backend("reference"):
            out = block(x, t)
    s = summary(block)
    assert s.replaced["resnet_block"] == 0 and reason in dict((p, r) for _, p, r in s.left)["resnet_block"]
    assert patched_by(block) == (() if "non_linearity" in kwargs else ("resnet_gn_silu",))
    assert_close(out, expected, torch.float32, 9 * 4, what=str(kwargs))


def test_conv_variants_are_left():
    block = make_block(4, 4, 2, 3)
    block.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    patch(block, ops=["resnet_block"])
    assert "conv2 is not a 3x3 stride-1 zero-padded conv ({'padding_mode': 'reflect'})" in summary(block).left[0][2]


@pytest.fixture
def conv_calls(monkeypatch):
    calls = []
    op = dispatch.ops()["conv3x3_fused"]
    real = op.__class__.__call__

    def counting(self, *args):
        out = real(self, *args)
        if self is op:
            calls.append(dispatch.last_backend("conv3x3_fused"))
        return out

    monkeypatch.setattr(op.__class__, "__call__", counting)
    return calls


def test_where_the_original_runs(conv_calls):
    """Autograd, training-mode dropout and the deprecated scale argument run diffusers' own forward."""
    block = make_block(4, 6, 2, 3, dropout=0.5)
    x, t = rand(2, 4, 5, 5), rand(2, 3)
    twin = copy.deepcopy(block)
    patch(block, ops=["resnet_block"], channels_last=False)  # the twin is NCHW: equal bit for bit
    out = block(x, t)  # grad enabled, parameters require grad
    assert out.grad_fn is not None and conv_calls == []
    torch.testing.assert_close(out, twin(x, t))
    with torch.no_grad():
        block.train(), twin.train()
        torch.manual_seed(1)
        out = block(x, t)
        torch.manual_seed(1)
        assert torch.equal(out, twin(x, t)) and conv_calls == []
        block.eval(), twin.eval()
        with pytest.warns(FutureWarning), forced():
            block(x, t, 1.0)  # diffusers warns about the deprecated scale, and ignores it
        assert conv_calls == []
        with forced():
            out = block(x, t)
    assert conv_calls == ["triton", "triton"]
    assert_close(out, twin.double()(up(x), up(t)), torch.float32, 9 * 6, what="eval after train")


def test_each_block_shape_runs_the_faster_of_fused_and_unfused(conv_calls, monkeypatch, tmp_path):
    """Where it may measure, the patched block times both paths once per shape and runs the faster; a shape it has
    not measured, where it may not, runs the fused block."""
    from sdkernels import tuning
    from sdkernels.patchers import resnet_block as patcher
    timed = []

    def timer(way):
        timed.append(way.__name__)
        way()
        return {"fused": 2.0, "unfused": 1.0}[way.__name__]

    measuring = [True]
    monkeypatch.setattr(patcher, "_fused_or_not", tuning.MeasuredChoice(
        "resnet_block", timer=timer, can_measure=lambda *a: measuring[0], path=tmp_path / "t.json"))
    block = make_block(4, 6, 2, 3)
    x, t = rand(2, 4, 5, 5), rand(2, 3)
    with torch.no_grad():
        expected = copy.deepcopy(block)(x, t)
        patch(block, ops=["resnet_block"])
        with forced():
            out = block(x, t)  # measures: one fused call (two convs), then the unfused path wins
            assert sorted(timed) == ["fused", "unfused"] and conv_calls == ["triton", "triton"]
            torch.testing.assert_close(block(x, t), expected)  # remembered: unfused, no fused conv call
            assert len(timed) == 2 and len(conv_calls) == 2
            measuring[0] = False
            block(rand(1, 4, 3, 3), t[:1])  # a new shape, no measuring: fused
            assert len(conv_calls) == 4
    torch.testing.assert_close(out, expected)


def test_vae_block_without_time_embedding():
    """The VAE's blocks: time_embedding_norm "group", no temb projection."""
    block = make_block(8, 4, 2, None, time_embedding_norm="group")
    x = rand(1, 8, 6, 7)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(up(x), None)
        patch(block, ops=["resnet_block"])
        with forced():
            out = block(x, None)
    assert patched_by(block) == ("resnet_block",)
    assert_close(out, expected, torch.float32, 9 * 8, what="VAE block")


def test_tiny_unet_patched_matches_unpatched_and_unpatches_exactly(conv_calls):
    unet = tiny_unet().to(DEVICE)
    inputs = [t.to(DEVICE) for t in unet_inputs()]
    before = snapshot(unet)
    with torch.no_grad():
        expected = unet(*inputs).sample
        patch(unet, ops=sdkernels.default_ops() + ["resnet_block"])
        blocks = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
        s = summary(unet)
        assert s.replaced["resnet_block"] == blocks and s.replaced["resnet_gn_silu"] == 0
        assert left_but_head_dims(s) == []
        with forced():
            out = unet(*inputs).sample
    assert conv_calls == ["triton"] * (2 * blocks)
    print(f"tiny UNet, fused ResNet blocks: relative error {relative_error(out, expected):.2e}")
    assert_close(out, expected, torch.float32, 4 * 9 * 64, what="patched tiny UNet")
    unpatch(unet)
    assert snapshot(unet) == before
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, expected)


# ---- GPU lane at SD sizes -------------------------------------------------------------------------------------

SD_BLOCKS = [  # (B, Cin, Cout, H, W) of SD1.5 UNet and VAE decoder ResNet blocks
    (2, 320, 320, 64, 64), (2, 320, 640, 32, 32), (2, 640, 640, 32, 32), (2, 640, 1280, 16, 16), (2, 1280, 1280, 8, 8),
    (2, 2560, 1280, 8, 8), (2, 960, 320, 64, 64), (1, 512, 512, 64, 64), (1, 256, 128, 256, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_BLOCKS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("conv_backend", ["triton", "triton_bordered"])
def test_sd_blocks(shape, dtype, conv_backend):
    B, cin, cout, H, W = shape
    block = make_block(cin, cout, 32, 1280 if B == 2 else None).to(memory_format=torch.channels_last)
    x = rand(B, cin, H, W, dtype=dtype)
    t = rand(B, 1280, dtype=dtype) if B == 2 else None
    with torch.no_grad():
        expected = copy.deepcopy(block)(x.float(), None if t is None else t.float())
        eager = copy.deepcopy(block).to(dtype)(x, t)
        patch(block.to(dtype), ops=["resnet_block"])
        with forced(conv_backend):
            out = block(x, t)
    fused, base = relative_error(out, expected), relative_error(eager, expected)
    worst, eager_worst = ((y.float() - expected).abs().max().item() for y in (out, eager))
    print(f"{shape} {dtype} {conv_backend}: relative error vs fp32: fused {fused:.2e}, eager {base:.2e}; "
          f"max abs error fused {worst:.2e}, eager {eager_worst:.2e}")
    assert fused <= 2 * base + HALF_ERROR_FLOOR[dtype]
    # Element by element too: a wrong border row or tile barely moves the norm of the error, but its worst element
    # lies far beyond the worst of eager's roundings (NaN fails both comparisons).
    assert worst <= 2 * eager_worst + HALF_ERROR_FLOOR[dtype] * expected.abs().max().item()


def test_launcher_prologue_variants_match_the_op(monkeypatch):
    """kernels/conv3x3.py's probe options (scripts/probe_conv_prologue.py): a per-channel (scale, shift) table in
    place of (mean, rstd) + affine gives the same conv; norm_silu=False leaves the SiLU out; a config overrides the
    tiles. (fast_silu, tanh.approx, is GPU-only: the interpreter runs the exact SiLU.)"""
    from sdkernels.kernels.conv3x3 import conv3x3_triton
    from sdkernels.ops.group_norm import normalize_reference
    x = rand(2, 8, 5, 6, offset=0.5)
    w, b = rand(6, 8, 3, 3, scale=0.2), rand(6)
    nw, nb = rand(8, offset=1.0), rand(8)
    stats = group_norm_stats_reference(x, 4, 1e-5).float().contiguous()
    mean, rstd = (stats[..., i].repeat_interleave(2, 1) for i in (0, 1))
    scale = rstd * nw
    table = torch.stack([scale, nb - mean * scale], -1).contiguous()
    normalized = normalize_reference(x.double(), stats.double(), nw.double(), nb.double())
    for norm, silu in (((stats, nw, nb), True), ((table,), True), ((table,), False)):
        out = torch.full((2, 6, 5, 6), float("nan"), device=DEVICE).to(memory_format=torch.channels_last)
        conv3x3_triton(x, w, b, norm, None, None, 1.0, 0, 0.0, out, config=SMALL_TILES, norm_silu=silu)
        a = F.silu(normalized) if silu else normalized
        assert_close(out, F.conv2d(a, w.double(), b.double(), padding=1), torch.float32, reduction_size=72)
