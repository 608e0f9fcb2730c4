"""The band forwards of large activations (sdkernels.banded): sdkernels::group_norm_apply against its float64
reference, ResnetBlock2D and Upsample2D in bands against their unbanded forwards (bands forced small here, with
several bands, one-row bands and a last partial band), a whole tiny VAE decode, and the thresholds that decide."""
import copy
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdkernels
from sdkernels import banded, graphs
from sdkernels.ops._common import SdkernelsInputError
from sdkernels.ops.group_norm import (group_norm_apply, group_norm_apply_reference, group_norm_reference,
                                      group_norm_stats, group_norm_stats_reference)
from sdkernels.patch import patch, summary
from sdkernels.testing import assert_close, relative_error
from conftest import DEVICE, GPU

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D  # noqa: E402
from test_patch import randomize, tiny_vae  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float32, channels_last=True, scale=1.0, offset=0.0):
    t = (torch.randn(shape, device=DEVICE) * scale + offset).to(dtype)
    return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


@pytest.fixture
def small_bands(monkeypatch):
    """Every activation takes the band forwards, in bands of ``rows`` rows (set through the returned function)."""
    monkeypatch.setattr(banded, "MIN_BYTES", 1)
    monkeypatch.setattr(banded, "IN_PLACE_MIN_BYTES", 1)
    monkeypatch.delenv("SDKERNELS_BAND_MIN_MIB", raising=False)

    def rows(n):
        monkeypatch.setattr(banded, "band_rows", lambda x, channels, band_bytes=0: n)
    return rows


# ---- sdkernels::group_norm_apply ------------------------------------------------------------------------------

@settings(max_examples=10 if not GPU else 40)
@given(n=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), cg=st.integers(1, 5), h=st.integers(1, 9),
       w=st.integers(1, 9), dtype=st.sampled_from(DTYPES), channels_last=st.booleans(), affine=st.booleans(),
       silu=st.booleans(), band=st.booleans())
def test_group_norm_apply_matches_float64_reference(n, groups, cg, h, w, dtype, channels_last, affine, silu, band):
    C = groups * cg
    x = rand(n, C, h + 2, w, dtype=dtype, channels_last=channels_last, scale=2.0, offset=1.0)
    stats = group_norm_stats(x, groups, 1e-5)  # the whole image's, applied to all of it or to a band of rows
    part = x[:, :, 1:h + 1] if band else x
    weight, bias = (rand(C, dtype=dtype), rand(C, dtype=dtype)) if affine else (None, None)
    with sdkernels.use_backend("triton", op="group_norm_apply", strict=True):
        out = group_norm_apply(part, stats, weight, bias, silu)
    expected = group_norm_apply_reference(part.double(), stats.double(), None if weight is None else weight.double(),
                                          None if bias is None else bias.double(), silu)
    assert out.dtype == dtype and out.shape == part.shape
    assert_close(out, expected, dtype)


def test_group_norm_apply_rejects_bad_stats():
    x = rand(2, 8, 4, 4)
    with pytest.raises(SdkernelsInputError, match="group_norm_apply.*stats must be an .N, G, 2. tensor"):
        group_norm_apply(x, torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(SdkernelsInputError, match="group_norm_apply.*divides the 8 channels"):
        group_norm_apply(x, torch.zeros(2, 3, 2, device=DEVICE))
    with pytest.raises(SdkernelsInputError, match="group_norm_apply.*torch.float32"):
        group_norm_apply(x, torch.zeros(2, 4, 2, device=DEVICE, dtype=torch.float64))
    with pytest.raises(SdkernelsInputError, match="group_norm_apply.*per sample"):
        group_norm_apply(x, torch.zeros(1, 4, 2, device=DEVICE))


def test_group_norm_apply_passes_opcheck():
    x = rand(2, 8, 5, 3)
    stats = group_norm_stats_reference(x, 4).float().contiguous()
    torch.library.opcheck(torch.ops.sdkernels.group_norm_apply.default, (x, stats, rand(8), rand(8), True))


def test_statistics_then_apply_compile_whole_and_replay_in_a_cuda_graph():
    """group_norm_stats then group_norm_apply (the banded path's two passes) under torch.compile(fullgraph=True),
    and, on a GPU, captured in a CUDA graph and replayed on new inputs."""
    x, w = rand(2, 8, 5, 3), rand(8)

    def f(x, w):
        return group_norm_apply(x * 2, group_norm_stats(x * 2, 4, 1e-5), w, w, True) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    torch.testing.assert_close(compiled(x, w), f(x, w))
    if not GPU:
        return
    f(x, w)  # warm-up: kernels compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(x, w)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, f(x, w))


# ---- the band forwards against the unbanded ones ------------------------------------------------------------------

def _block(cin, cout, temb_channels=None, scale=1.0, groups=4):
    block = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb_channels, groups=groups,
                          output_scale_factor=scale, eps=1e-6)
    return randomize(block).to(DEVICE).eval()


@pytest.mark.parametrize("rows", [1, 2, 3, 16])
@pytest.mark.parametrize("cin,cout,temb,scale", [(8, 8, None, 1.0), (8, 16, None, 1.0), (16, 8, 12, 2.0)])
def test_resnet_block_in_bands_matches_unbanded(small_bands, rows, cin, cout, temb, scale, no_tf32):
    small_bands(rows)
    block = _block(cin, cout, temb, scale)
    x = rand(2, cin, 7, 5, offset=0.5)
    t = torch.randn(2, temb, device=DEVICE) if temb else None
    with torch.no_grad():
        expected = block(x, t)
        patch(block, ops=["resnet_gn_silu"], low_memory=True)
        calls = []
        real = banded.resnet_forward
        with pytest.MonkeyPatch.context() as m:
            m.setattr(banded, "resnet_forward", lambda *a: calls.append(1) or real(*a))
            out = block(x, t)
    assert calls, "the band forward did not run"
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resnet_block_in_bands_half(small_bands, dtype, monkeypatch):
    """In fp16/bf16 the bands' error against float64 is the unbanded patched block's (same ops, same roundings)."""
    small_bands(3)
    block = _block(8, 16)
    x = rand(1, 8, 9, 6, offset=0.5)
    with torch.no_grad():
        expected = block.double()(x.double(), None)
        block.to(dtype)
        patch(block, ops=["resnet_gn_silu"], low_memory=True)
        banded_out = block(x.to(dtype), None)
        monkeypatch.setattr(banded, "MIN_BYTES", 1 << 40)
        unbanded_out = block(x.to(dtype), None)
    assert relative_error(banded_out, expected) <= 1.25 * relative_error(unbanded_out, expected) + 1e-4
    assert_close(banded_out, unbanded_out, dtype)


def _count_in_place(monkeypatch) -> list:
    calls, real = [], banded._resnet_forward_in_place
    monkeypatch.setattr(banded, "_resnet_forward_in_place", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("rows", [2, 3, 16])
@pytest.mark.parametrize("n,cin,cout,temb,scale", [(2, 8, 8, None, 1.0), (2, 16, 8, 12, 2.0), (1, 12, 4, None, 1.0),
                                                   (3, 8, 8, 6, 1.0)])
def test_resnet_block_in_place_matches_unbanded(small_bands, monkeypatch, rows, n, cin, cout, temb, scale, no_tf32):
    """A donated input: the block's output is written over the input's memory, band by band, and equals the
    unbanded forward (every band still reads input rows no earlier band has overwritten)."""
    small_bands(rows)
    block = _block(cin, cout, temb, scale)
    x = rand(n, cin, 9, 5, offset=0.5)
    t = torch.randn(n, temb, device=DEVICE) if temb else None
    calls = _count_in_place(monkeypatch)
    with torch.no_grad():
        expected = block(x.clone(), t)
        patch(block, ops=["resnet_gn_silu"], low_memory=True)
        with banded.donated(x):
            out = block(x, t)
    assert calls, "the in-place band forward did not run"
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("rows", [2, 5])
def test_resnet_blocks_in_place_chain_through_free_room(small_bands, monkeypatch, rows, no_tf32):
    """A 16 -> 8 block writes over its donated input, which leaves half the storage free: the next two 8 -> 8 blocks
    put h (and so their output) there, alternating halves, without computing conv1 twice."""
    small_bands(rows)
    blocks = [_block(16, 8), _block(8, 8), _block(8, 8)]
    x = rand(2, 16, 7, 5, offset=0.5)
    storage = x.untyped_storage().data_ptr()
    calls = _count_in_place(monkeypatch)
    with torch.no_grad():
        expected = x.clone()
        for block in blocks:
            expected = block(expected, None)
            patch(block, ops=["resnet_gn_silu"], low_memory=True)
        out, starts = x, []
        for block in blocks:
            with banded.donated(out):
                out = block(out, None)
            assert out.untyped_storage().data_ptr() == storage
            starts.append(out.storage_offset())
    assert len(calls) == 1 and starts == [0, out.numel(), 0]
    assert_close(out, expected, torch.float32)


def test_in_place_output_of_a_slice_leaves_the_rest_of_its_storage_alone(small_bands, monkeypatch, no_tf32):
    """A donated input that is one sample of a larger tensor: the block writes over that sample only, and the block
    after it does not take the other sample's memory for free room."""
    small_bands(2)
    blocks = [_block(16, 12), _block(12, 12)]
    both = rand(2, 16, 6, 5, offset=0.5)
    other = both[:1].clone()
    with torch.no_grad():
        expected = blocks[1](blocks[0](both[1:].clone(), None), None)
        for block in blocks:
            patch(block, ops=["resnet_gn_silu"], low_memory=True)
        out = both[1:]  # the second sample: the room before it is the first sample's
        for block in blocks:
            with banded.donated(out):
                out = block(out, None)
    assert torch.equal(both[:1], other)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("case", ["not donated", "changed since", "wider output", "NCHW", "another tensor"])
def test_resnet_block_in_place_only_where_safe(small_bands, monkeypatch, case, no_tf32):
    """Without a donation of exactly this, unchanged, NHWC tensor with room for the output, the input is left
    as it was (the other band forward runs)."""
    small_bands(3)
    block = _block(8, 16 if case == "wider output" else 8)
    x = rand(1, 8, 7, 5, offset=0.5, channels_last=case != "NCHW")
    before = x.clone()
    calls = _count_in_place(monkeypatch)
    with torch.no_grad():
        expected = block(x, None)
        patch(block, ops=["resnet_gn_silu"], low_memory=True)
        if case == "not donated":
            out = block(x, None)
        else:
            with banded.donated(x.clone() if case == "another tensor" else x):
                if case == "changed since":
                    x.mul_(1.0)  # bumps the version counter
                out = block(x, None)
    assert not calls
    assert torch.equal(x, before)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("rows", [[3, 4], [1, 1, 5], [7]])
def test_merged_band_stats_equal_the_whole_tensors(rows):
    x = rand(2, 8, sum(rows), 5, scale=3.0, offset=2.0).double()
    parts, r0 = [], 0
    for r in rows:
        parts.append((r, group_norm_stats(x[:, :, r0:r0 + r], 4, 1e-6)))
        r0 += r
    torch.testing.assert_close(banded._merged_stats(parts, 1e-6), group_norm_stats(x, 4, 1e-6), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_in_place(small_bands, dtype):
    small_bands(2)
    norm = randomize(torch.nn.GroupNorm(4, 8)).to(DEVICE)
    x = rand(2, 8, 5, 3, dtype=dtype, offset=1.0)
    expected = group_norm_reference(x.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps, silu=True)
    ptr = x.data_ptr()
    with torch.no_grad():
        out = banded.group_norm_silu_in_place(x, norm.to(dtype))
    assert out.data_ptr() == ptr
    assert_close(out, expected.to(dtype), dtype)


@pytest.mark.parametrize("rows", [2, 3, 5, 64])
@pytest.mark.parametrize("h,w", [(1, 3), (4, 4), (7, 5)])
def test_upsampler_in_bands_matches_unbanded(small_bands, rows, h, w, no_tf32):
    small_bands(rows)
    up = randomize(Upsample2D(8, use_conv=True, out_channels=12)).to(DEVICE).eval()
    x = rand(2, 8, h, w)
    with torch.no_grad():
        expected = up(x)
        patch(up, ops=["upsample_bands"], low_memory=True)
        assert summary(up).replaced == {"upsample_bands": 1}
        out = up(x)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected, torch.float32)


def test_vae_decode_in_bands_matches_unpatched(small_bands, monkeypatch, no_tf32):
    """The whole decode in bands, its ResNet blocks in place (the handoff donates their inputs), conv_norm_out +
    SiLU in place."""
    small_bands(3)
    vae = tiny_vae().to(DEVICE).eval()
    latents = torch.randn(1, 4, 5, 6, device=DEVICE)
    in_place = _count_in_place(monkeypatch)
    norm_calls, real_norm = [], banded.group_norm_silu_in_place
    monkeypatch.setattr(banded, "group_norm_silu_in_place", lambda *a: norm_calls.append(1) or real_norm(*a))
    with torch.no_grad():
        expected = vae.decode(latents).sample
        patched = patch(copy.deepcopy(vae), low_memory=True)
        out = patched.decode(latents).sample
    assert summary(patched).replaced["upsample_bands"] == 1 and summary(patched).replaced["decoder_handoff"] == 1
    assert in_place and norm_calls
    assert_close(out, expected, torch.float32)


def test_decoder_hands_each_up_block_its_input(small_bands, no_tf32):
    """With low_memory, an up block's input is freed once its first ResNet block returns (diffusers' Decoder keeps
    it until the whole up block returns)."""
    small_bands(2)
    vae = tiny_vae().to(DEVICE).eval()
    latents = torch.randn(1, 4, 5, 6, device=DEVICE)

    def input_alive_in_second_resnet(low_memory):
        model = patch(copy.deepcopy(vae), low_memory=low_memory)
        resnets = model.decoder.up_blocks[0].resnets
        seen = {}

        def first(module, args):
            seen.setdefault("input", weakref.ref(args[0]))

        def second(module, args):
            seen.setdefault("alive", seen["input"]() is not None)

        resnets[0].register_forward_pre_hook(first)
        resnets[1].register_forward_pre_hook(second)
        with torch.no_grad():
            out = model.decode(latents).sample
        return seen["alive"], out

    kept, expected = input_alive_in_second_resnet(False)
    freed, out = input_alive_in_second_resnet(True)
    assert kept and not freed
    assert_close(out, expected, torch.float32)


def test_bands_are_opt_in_and_only_for_large_activations(monkeypatch):
    monkeypatch.delenv("SDKERNELS_BAND_MIN_MIB", raising=False)
    up = Upsample2D(8, use_conv=True)
    large = torch.empty(1, 256, 512, 512, dtype=torch.float16)   # the VAE decoder at 1024 px: 128 MiB
    patch(up, ops=["upsample_bands"])
    assert not banded.wants_bands(up, large)                      # off unless asked for
    patch(up, ops=["upsample_bands"], low_memory=True)
    assert banded.wants_bands(up, large) and banded.wants_bands(up, large[:, :, :256, :256], growth=4)
    assert not banded.wants_bands(up, torch.empty(2, 320, 64, 64, dtype=torch.float16))  # SD1.5's largest: 5 MiB
    monkeypatch.setenv("SDKERNELS_BAND_MIN_MIB", "0")
    assert not banded.wants_bands(up, large)
    monkeypatch.delenv("SDKERNELS_BAND_MIN_MIB")
    sdkernels.unpatch(up)
    assert banded.LOW_MEMORY not in up.__dict__ and not banded.wants_bands(up, large)
    assert banded.band_rows(torch.empty(1, 256, 8, 1024, dtype=torch.float16), 256) == 128
    assert banded.band_rows(torch.empty(1, 256, 8, 1024, dtype=torch.float16), 256, 16 << 20) == 32


def test_blocks_the_band_forward_does_not_mirror_run_unbanded(small_bands):
    small_bands(2)
    block = _block(8, 8)
    block.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect").to(DEVICE)
    x = rand(1, 8, 6, 4)
    with torch.no_grad():
        expected = block(x, None)
        patch(block, ops=["resnet_gn_silu"], low_memory=True, channels_last=False)  # expected ran on NCHW weights
        calls = []
        with pytest.MonkeyPatch.context() as m:
            m.setattr(banded, "resnet_forward", lambda *a: calls.append(1))
            out = block(x, None)
    assert not calls
    assert_close(out, expected, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sd_vae_decoder_fp16_in_bands_gpu(layout, no_tf32, monkeypatch):
    """The SD VAE decoder at 512 px in fp16 in bands (its 64 MiB activations):
    error against fp32 eager within twice eager fp16's own."""
    from diffusers import AutoencoderKL
    from test_patch import fp16_errors
    monkeypatch.setenv("SDKERNELS_BAND_MIN_MIB", "64")  # as patch(..., low_memory=True) does: its 64 MiB blocks
    vae = randomize(AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2))
    decoder = torch.nn.Sequential(vae.post_quant_conv, vae.decoder).cuda()
    calls = []
    real = banded.resnet_forward
    monkeypatch.setattr(banded, "resnet_forward", lambda *a: calls.append(1) or real(*a))
    eager, patched = fp16_errors(decoder, lambda m, i: m(*i), [torch.randn(1, 4, 64, 64, device="cuda")], layout,
                                 None)
    print(f"VAE decoder fp16 512 px in bands ({len(calls)} blocks), {layout}: error vs fp32 eager {eager:.3e}, "
          f"patched {patched:.3e}")
    assert calls and summary(decoder).replaced["upsample_bands"] == 3
    assert patched <= 2 * eager + 1e-4


@pytest.mark.gpu
def test_low_memory_vae_decode_replays_in_cuda_graphs(monkeypatch):
    """patch(vae, low_memory=True, cuda_graph=True): the band forwards (their many launches and slices) captured
    and replayed equal the same forwards run eagerly."""
    monkeypatch.setattr(banded, "MIN_BYTES", 1 << 20)
    monkeypatch.setattr(banded, "BAND_BYTES", 1 << 20)
    monkeypatch.setattr(banded, "IN_PLACE_MIN_BYTES", 1 << 20)  # the in-place blocks and their free room too
    monkeypatch.delenv("SDKERNELS_BAND_MIN_MIB", raising=False)
    vae = tiny_vae().cuda().half().eval()
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
    eager = patch(copy.deepcopy(vae), low_memory=True)
    graphed = patch(copy.deepcopy(vae), low_memory=True, cuda_graph=True)
    with torch.no_grad(), warnings.catch_warnings():
        # A capture that fails falls back to eager with this warning; here it must not happen.
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        expected = eager.decode(latents).sample
        for _ in range(3):  # warm-up and capture, then replays
            out = graphed.decode(latents).sample
    assert summary(graphed).replaced["decoder_handoff"] == 1
    assert graphs.graphed(graphed).graphs and all(graphs.graphed(graphed).graphs.values())
    assert_close(out, expected, torch.float16)
    with torch.no_grad(), warnings.catch_warnings():  # other latents: the replay reads its input anew
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        latents = torch.randn_like(latents)
        assert_close(graphed.decode(latents).sample, eager.decode(latents).sample, torch.float16)
