"""sdkernels::flash_attention (backends "flash" and "partial_softmax") against a float32/float64 math reference.

The accuracy criterion is the flash-attention repo's: our max error against the high-precision reference is at most
twice eager PyTorch's (math attention in the input dtype) plus a small slack."""
import contextlib
import os
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import sdkernels
from sdkernels import dispatch
from sdkernels.ops import attention as attn_ops
from sdkernels.ops.attention import as_bhnd, attention_reference, flash_attention, from_bhnd
from sdkernels.testing import tolerance
from conftest import DEVICE, GPU

OP = "flash_attention"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# The CUDA C++ row statistics run only on a GPU (with the extension built): the GPU lane requires them.
BACKENDS = ["flash", "partial_softmax"] + (["partial_softmax_cuda"] if GPU else [])
KERNEL_HEAD_DIMS = [40, 64, 80, 128, 160]
FALLBACK_HEAD_DIMS = [96, 256]
# The smallest head dim the kernels run on this device (all of them unless SDKERNELS_GPU_UNSAFE_HEAD_DIMS lists some),
# for the tests that must see a kernel run.
SMALL_D = min(d for d in KERNEL_HEAD_DIMS if not (GPU and d in attn_ops.GPU_UNSAFE_HEAD_DIMS))
LAYOUTS = ["bnhd", "fused_qkv", "bhnd", "bhnd_transposed", "head_dim_strided"]
MASKS = [None, "keys", "key_bias", "full", "broadcast_heads", "2d"]


# ---- inputs ---------------------------------------------------------------------------------------------------

def make_qkv(B, H, N, Nk, d, dtype, layout, amplitude=1.0, device=DEVICE):
    """q, k, v and the ``heads`` argument in one of the layouts attention meets in diffusers (or odd ones)."""
    def rnd(*shape):
        return (torch.randn(*shape, device=device) * amplitude).to(dtype)
    if layout == "bnhd":  # diffusers' projections: (B, tokens, H*d)
        return rnd(B, N, H * d), rnd(B, Nk, H * d), rnd(B, Nk, H * d), H
    if layout == "fused_qkv":  # slices of fused projections: token stride 3*H*d (q) and 2*H*d (k, v)
        qx, kv = rnd(B, N, 3 * H * d), rnd(B, Nk, 2 * H * d)
        return qx[..., H * d:2 * H * d], kv[..., :H * d], kv[..., H * d:], H
    if layout == "bhnd":
        return rnd(B, H, N, d), rnd(B, H, Nk, d), rnd(B, H, Nk, d), 0
    if layout == "bhnd_transposed":  # what AttnProcessor2_0 hands SDPA: (B, N, H, d) viewed as (B, H, N, d)
        return (rnd(B, N, H, d).transpose(1, 2), rnd(B, Nk, H, d).transpose(1, 2),
                rnd(B, Nk, H, d).transpose(1, 2), 0)
    if layout == "head_dim_strided":  # every other element of a wider tensor: head-dim stride 2
        return rnd(B, H, N, 2 * d)[..., ::2], rnd(B, H, Nk, 2 * d)[..., ::2], rnd(B, H, Nk, 2 * d)[..., 1::2], 0
    raise ValueError(layout)


def make_mask(kind, B, H, N, Nk, dtype, device=DEVICE):
    """An additive mask: diffusers' key padding (-10000 on some keys), a random bias per key and head (one row for
    every query, as diffusers' prepared masks are), or dense random biases with some -inf."""
    if kind is None:
        return None
    if kind == "keys":
        drop = torch.rand(B, 1, 1, Nk, device=device) < 0.3
        drop[..., 0] = False  # every row keeps a key
        return torch.where(drop, -10000.0, 0.0).to(dtype)
    if kind == "key_bias":
        return torch.randn(B, H, 1, Nk, device=device).to(dtype)
    shape = {"full": (B, H, N, Nk), "broadcast_heads": (1, 1, N, Nk), "2d": (N, Nk)}[kind]
    mask = torch.randn(shape, device=device)
    mask = mask.masked_fill(torch.rand(shape, device=device) < 0.2, float("-inf"))
    mask[..., 0] = 0.0
    return mask.to(dtype)


def eager_attention(q, k, v, scale, mask, heads):
    """What eager PyTorch computes in the input dtype (diffusers' AttnProcessor): matmul, softmax, matmul."""
    q4, k4, v4 = (as_bhnd(t, heads) for t in (q, k, v))
    s = (q4 @ k4.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(s.dtype)
    return from_bhnd(torch.softmax(s, dim=-1) @ v4, heads)


def reference(q, k, v, scale, mask, heads):
    high = torch.float64 if q.dtype == torch.float32 else torch.float32
    up = lambda t: None if t is None else t.to(high)  # noqa: E731
    return attention_reference(up(q), up(k), up(v), scale, up(mask), heads)


def check_accuracy(out, q, k, v, scale, mask, heads, what=""):
    """Our max error vs the reference <= 2 x eager's in the same dtype + slack; NaN (unwritten output) fails."""
    ref = reference(q, k, v, scale, mask, heads).double()
    err = (out.double() - ref).abs().max().item()
    eager_err = (eager_attention(q, k, v, scale, mask, heads).double() - ref).abs().max().item()
    slack = tolerance(q.dtype)[0] / 4
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element never written?)"
    assert err <= 2 * eager_err + slack, (
        f"{what}: max error {err:.3g} vs the reference exceeds 2 x eager's {eager_err:.3g} + {slack:.3g}")
    return err, eager_err


def run(backend, q, k, v, scale, mask, heads, strict=True):
    with sdkernels.use_backend(backend, op=OP, strict=strict):
        out = flash_attention(q, k, v, scale, mask, heads)
    return out


def expected_to_run(backend, q, mask, heads) -> bool:
    """Whether ``backend`` should take these inputs, by the op's documented rules."""
    if attn_ops.head_dim(q, heads) not in KERNEL_HEAD_DIMS or q.dtype not in DTYPES:
        return False
    if q.is_cuda and attn_ops.head_dim(q, heads) in attn_ops.GPU_UNSAFE_HEAD_DIMS:
        return False
    if mask is not None and not mask.is_floating_point():
        return False
    return backend != "partial_softmax_cuda" or mask is None or mask.dtype == q.dtype


def check(backend, q, k, v, mask, heads, scale=None, what=""):
    d = attn_ops.head_dim(q, heads)
    scale = d ** -0.5 if scale is None else scale
    chosen = next(b for b in dispatch.ops()[OP].backends if b.name == backend)
    reason = chosen.why_not(q, k, v, scale, mask, heads) or chosen.available()
    supported = expected_to_run(backend, q, mask, heads)
    assert (reason is None) == supported, f"{backend} {what}: expected {'to run' if supported else 'a reason'}, " \
                                          f"got {reason!r}"
    if supported:
        out = run(backend, q, k, v, scale, mask, heads)
        assert dispatch.last_backend(OP) == backend
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
            out = run(backend, q, k, v, scale, mask, heads, strict=False)
        assert dispatch.last_backend(OP) == "reference"
    assert out.shape == q.shape and out.dtype == q.dtype
    if q.is_contiguous() or (q.dim() == 4 and q.transpose(1, 2).is_contiguous()):
        # a size-1 dim's stride is arbitrary (a slice of fused qkv at N = 1 is "contiguous" with q's row stride)
        stepped = [(o, s) for o, s, n in zip(out.stride(), q.stride(), q.shape) if n > 1]
        assert [o for o, _ in stepped] == [s for _, s in stepped], "the output keeps q's layout"
    check_accuracy(out, q, k, v, scale, mask, heads, what=f"{backend} {what}")
    return out


# ---- properties (CPU lane: interpreter, small sizes; GPU lane: up to 300 tokens) ------------------------------

MAX_TOKENS = 300 if GPU else 80
MAX_BATCH_HEADS = 40 if GPU else 6


@hsettings(max_examples=40 if GPU else 20)
@given(batch=st.integers(1, 4 if GPU else 2), heads=st.integers(1, 10),
       n=st.one_of(st.integers(1, MAX_TOKENS), st.just(77)), nk=st.one_of(st.integers(1, MAX_TOKENS), st.just(77)),
       d=st.sampled_from(KERNEL_HEAD_DIMS + FALLBACK_HEAD_DIMS), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), mask=st.sampled_from(MASKS), mask_fp32=st.booleans(),
       amplitude=st.sampled_from([1.0, 3.0]), backend=st.sampled_from(BACKENDS),
       flash_tma=st.sampled_from(["", "1"]), one_launch=st.sampled_from(["", "0"]))
def test_matches_reference(batch, heads, n, nk, d, dtype, layout, mask, mask_fp32, amplitude, backend, flash_tma,
                           one_launch):
    """flash_tma "1": the flash backend's descriptor kernel wherever it can run (else its default rule); one_launch
    "0": the partial-softmax path as two kernels at every key length (else its default rule)."""
    if batch * heads > MAX_BATCH_HEADS:
        heads = max(1, MAX_BATCH_HEADS // batch)
    what = (f"B={batch} H={heads} N={n} Nk={nk} d={d} {dtype} {layout} mask={mask} x{amplitude} {backend} "
            f"tma={flash_tma!r} one_launch={one_launch!r}")
    note(what)
    q, k, v, h = make_qkv(batch, heads, n, nk, d, dtype, layout, amplitude)
    m = make_mask(mask, batch, heads, n, nk, torch.float32 if mask_fp32 else dtype)
    with mock.patch.dict(os.environ, {"SDKERNELS_FLASH_TMA": flash_tma, "SDKERNELS_PARTIAL_ONE_LAUNCH": one_launch}):
        check(backend, q, k, v, m, h, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", KERNEL_HEAD_DIMS)
def test_every_head_dim_and_dtype(d, dtype, backend):
    """Each native head dim (40 and 80 and 160 through two chunks, 40 padded to 48) at an odd query length and the
    cross-attention key length 77 (a full key block and a masked tail)."""
    q, k, v, h = make_qkv(2, 3, 45, 77, d, dtype, "bnhd")
    check(backend, q, k, v, None, h, what=f"d={d} {dtype}")


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "padded"])
@pytest.mark.parametrize("backend", ["flash", "partial_softmax"])
@pytest.mark.parametrize("layout, mask", [("bnhd", None), ("fused_qkv", "keys"), ("head_dim_strided", "full")])
def test_both_layouts_of_the_last_chunk(monkeypatch, layout, mask, backend, overlap):
    """Head dim 40 as columns 0..31 and 24..39 (OVERLAP_LAST_CHUNK, the default) or as 0..31 and a padded 32..47:
    both compute the same."""
    from sdkernels.kernels import flash_attention as fa
    monkeypatch.setattr(fa, "OVERLAP_LAST_CHUNK", overlap)
    assert fa.chunk1_start(40) == (24 if overlap else 32)
    assert fa.chunk1_start(80) == 64 and fa.chunk1_start(160) == 128 and fa.chunk1_start(64) == 64
    for dtype in DTYPES:
        q, k, v, h = make_qkv(2, 3, 45, 77, 40, dtype, layout)
        out = check(backend, q, k, v, make_mask(mask, 2, 3, 45, 77, dtype), h,
                    what=f"overlap={overlap} {layout} {dtype}")
        assert not out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["keys", "key_bias", "full", "broadcast_heads", "2d"])
def test_every_mask_kind(mask, backend):
    q, k, v, h = make_qkv(2, 3, 40, 77, SMALL_D, torch.float16, "bnhd")
    check(backend, q, k, v, make_mask(mask, 2, 3, 40, 77, torch.float16), h, what=f"mask={mask}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_one_key(backend):
    q, k, v, h = make_qkv(1, 2, 5, 1, 64, torch.float32, "bhnd")
    out = check(backend, q, k, v, None, h, scale=0.37)
    torch.testing.assert_close(out, v.expand_as(out))  # one key: softmax is 1, the output is v
    q, k, v, h = make_qkv(1, 2, 33, 70, 80, torch.float16, "bnhd")
    check(backend, q, k, v, None, h, scale=1.0, what="scale=1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_masked_to_minus_inf_in_their_first_blocks(backend):
    """Rows whose first key block is all -inf: a naive online softmax computes exp(-inf - -inf) = NaN there."""
    from sdkernels.kernels.flash_attention import launch_config
    B, H, N, Nk, d = 1, 2, 20, 150, 64
    block_n = launch_config(d, torch.float16, N, B * H, 2, torch.device(DEVICE))[1]
    q, k, v, h = make_qkv(B, H, N, Nk, d, torch.float16, "bnhd")
    mask = torch.zeros(B, H, N, Nk, device=DEVICE)
    mask[:, :, ::2, :min(2 * block_n, Nk - 3)] = float("-inf")
    check(backend, q, k, v, mask.half(), h, what="leading -inf blocks")


@pytest.fixture
def many_splits(monkeypatch):
    """Make the partial-softmax row statistics split every row block's keys across several programs (the
    two-kernel plan at every key length)."""
    import sdkernels.kernels.partial_softmax as ps
    monkeypatch.setattr(ps, "PROGRAMS_PER_SM", 10_000)
    monkeypatch.setenv("SDKERNELS_PARTIAL_ONE_LAUNCH", "0")


@pytest.mark.parametrize("nk", [200, 77, 64])
@pytest.mark.parametrize("mask", [None, "key_bias", "full"])
def test_partial_softmax_with_split_key_ranges(many_splits, nk, mask):
    q, k, v, h = make_qkv(2, 2, 33, nk, SMALL_D, torch.float16, "bnhd")
    check("partial_softmax", q, k, v, make_mask(mask, 2, 2, 33, nk, torch.float16), h, what=f"split Nk={nk}")


@pytest.mark.parametrize("d", [SMALL_D, 40, 80])
@pytest.mark.parametrize("nk", [200, 77, 64, 13, 1])
@pytest.mark.parametrize("mask", [None, "keys", "full"])
def test_partial_softmax_in_one_launch(monkeypatch, nk, mask, d):
    """SDKERNELS_PARTIAL_ONE_LAUNCH=1: the softmax . V kernel computes its rows' statistics itself (no statistics
    kernel runs); tails, full and key masks, one and two head-dim chunks, one key block and several."""
    import sdkernels.kernels.partial_softmax as ps
    monkeypatch.setenv("SDKERNELS_PARTIAL_ONE_LAUNCH", "1")
    assert ps.one_launch(10_000)
    monkeypatch.setattr(ps, "_row_stat_partials", lambda *a, **kw: pytest.fail("the statistics kernel ran"))
    q, k, v, h = make_qkv(2, 3, 45, nk, d, torch.float16, "bnhd")
    check("partial_softmax", q, k, v, make_mask(mask, 2, 3, 45, nk, torch.float16), h, what=f"one launch Nk={nk}")


def test_one_launch_rule(monkeypatch):
    from sdkernels.kernels.partial_softmax import ONE_LAUNCH_MAX_KEYS, one_launch
    assert not one_launch(ONE_LAUNCH_MAX_KEYS + 1)
    assert one_launch(max(ONE_LAUNCH_MAX_KEYS, 1)) == (ONE_LAUNCH_MAX_KEYS > 0)
    monkeypatch.setenv("SDKERNELS_PARTIAL_ONE_LAUNCH", "0")
    assert not one_launch(1)


def test_one_launch_statistics_block_rule(monkeypatch):
    """The one-launch kernel's statistics pass takes wider key blocks past SHORT_KEYS, never narrower ones; the
    knob forces one. (test_partial_softmax_in_one_launch runs the default rule at 200 keys, past SHORT_KEYS.)"""
    from sdkernels.kernels.flash_attention import SHORT_KEYS
    from sdkernels.kernels.partial_softmax import STATS_BLOCK_MIN, one_launch_stats_block
    assert one_launch_stats_block(32, SHORT_KEYS) == 32
    assert one_launch_stats_block(64, SHORT_KEYS + 1) == max(64, STATS_BLOCK_MIN)
    assert one_launch_stats_block(2 * STATS_BLOCK_MIN, 1024) == 2 * STATS_BLOCK_MIN
    monkeypatch.setenv("SDKERNELS_PARTIAL_STATS_BLOCK", "256")
    assert one_launch_stats_block(32, 77) == 256


@pytest.mark.parametrize("stats_block", ["32", "256"])
def test_one_launch_with_forced_statistics_block(monkeypatch, stats_block):
    """Statistics blocks narrower and wider than the softmax . V pass's, with a tail and two head-dim chunks."""
    monkeypatch.setenv("SDKERNELS_PARTIAL_ONE_LAUNCH", "1")
    monkeypatch.setenv("SDKERNELS_PARTIAL_STATS_BLOCK", stats_block)
    q, k, v, h = make_qkv(1, 2, 21, 150, 80, torch.float16, "bnhd")
    check("partial_softmax", q, k, v, make_mask("keys", 1, 2, 21, 150, torch.float16), h,
          what=f"statistics in {stats_block}-key blocks")


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_row_stats_match_max_and_sum(splits):
    """The (B*H, N, 2) statistics themselves: row max of S = scale q k^T + mask and sum of exp(S - max)."""
    from sdkernels.kernels.partial_softmax import attention_row_stats_triton
    B, H, N, Nk, d = 2, 3, 37, 250, 80
    q, k, _, h = make_qkv(B, H, N, Nk, d, torch.float16, "bnhd")
    mask = make_mask("full", B, H, N, Nk, torch.float16)
    q4, k4 = as_bhnd(q, h), as_bhnd(k, h)
    stats = attention_row_stats_triton(q4, k4, d ** -0.5, mask, splits=splits)
    s = (q4.double() @ k4.double().transpose(-1, -2)) * d ** -0.5 + mask.double()
    row_max = s.amax(-1)
    row_sum = (s - row_max[..., None]).exp().sum(-1)
    torch.testing.assert_close(stats[..., 0].double(), row_max.reshape(B * H, N), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats[..., 1].double(), row_sum.reshape(B * H, N), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, mask_kind, splits, d, layout", [
    (torch.float16, None, 1, 40, "bnhd"), (torch.bfloat16, "full", 7, 40, "bnhd"),
    (torch.float32, "keys", 3, 40, "bnhd"),
    (torch.float16, "key_bias", 2, 80, "head_dim_strided"),  # d stride 2: the tensor-core plan's scalar loads
    (torch.bfloat16, None, 3, 160, "bhnd_transposed"), (torch.float16, "full", 1, 64, "fused_qkv")])
def test_cuda_row_stats_are_available_and_match_triton(dtype, mask_kind, splits, d, layout):
    reason = attn_ops._cuda_stats_available()
    assert reason is None, f"partial_softmax_cuda unavailable on this GPU: {reason}"
    from sdkernels.kernels.partial_softmax import attention_row_stats_triton
    B, H, N, Nk = 2, 3, 300, 333
    q, k, _, h = make_qkv(B, H, N, Nk, d, dtype, layout)
    mask = make_mask(mask_kind, B, H, N, Nk, dtype)
    q4, k4 = as_bhnd(q, h), as_bhnd(k, h)
    mask4 = attn_ops.broadcast_mask(mask, q4, k4)
    ours = attn_ops.cuda_row_stats(q4, k4, d ** -0.5, mask4, splits)
    triton_stats = attention_row_stats_triton(q4, k4, d ** -0.5, mask4, splits=splits)
    torch.testing.assert_close(ours, triton_stats, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
def test_programmatic_launch_rule(monkeypatch):
    """softmax . V launches as a programmatic dependent at short key lengths on sm_90+ only, and the knob turns it
    off (its correctness is every partial_softmax test on such a GPU)."""
    from sdkernels.kernels.partial_softmax import PDL_MAX_KEYS, programmatic_launch
    q = torch.empty(1, 1, 8, 64, device=DEVICE, dtype=torch.float16)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert programmatic_launch(q, PDL_MAX_KEYS) == hopper
    assert not programmatic_launch(q, PDL_MAX_KEYS + 1)
    monkeypatch.setenv("SDKERNELS_PARTIAL_PDL", "0")
    assert not programmatic_launch(q, 77)


# ---- the descriptor (TMA) flash kernel ------------------------------------------------------------------------

@contextlib.contextmanager
def counting_tma_launches():
    """The flash backend's descriptor kernel forced wherever it can run (SDKERNELS_FLASH_TMA=1; on the CPU the
    interpreter runs it), its launches counted in the list yielded."""
    from sdkernels.kernels import flash_attention_tma as ft
    launches = []
    launch = ft.flash_attention_tma
    with mock.patch.dict(os.environ, {"SDKERNELS_FLASH_TMA": "1"}), \
            mock.patch.object(ft, "flash_attention_tma", lambda *a, **kw: launches.append(1) or launch(*a, **kw)):
        yield launches


@pytest.fixture
def tma_runs():
    with counting_tma_launches() as launches:
        yield launches


TMA_HEAD_DIMS = [40, 64, 80, 160]
# Key lengths: a partial block only, full blocks and a tail, and on the GPU 4 full blocks of 128 and a tail (the
# pattern that broke the pointer kernel's two-chunk head dims on an H100).
TMA_KEYS = [13, 200] + ([532] if GPU else [])


@pytest.mark.parametrize("layout", ["bnhd", "fused_qkv", "bhnd_transposed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", TMA_HEAD_DIMS)
def test_flash_descriptor_kernel(tma_runs, d, dtype, layout):
    """Padded head-dim chunks (40 reads columns 32..47), query rows past N and keys past Nk come from the copy
    engine's zero fill; the store drops what lies outside the output."""
    for nk in TMA_KEYS:
        q, k, v, h = make_qkv(2, 3, 45, nk, d, dtype, layout)
        runs = len(tma_runs)
        check("flash", q, k, v, None, h, what=f"tma d={d} Nk={nk} {dtype} {layout}")
        assert len(tma_runs) == runs + 1, "the descriptor kernel did not run"


@hsettings(max_examples=30 if GPU else 12)
@given(batch=st.integers(1, 3), heads=st.integers(1, 6), n=st.integers(1, MAX_TOKENS),
       nk=st.one_of(st.integers(1, MAX_TOKENS), st.just(77)), d=st.sampled_from(TMA_HEAD_DIMS),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       layout=st.sampled_from(["bnhd", "fused_qkv", "bhnd", "bhnd_transposed"]))
def test_flash_descriptor_kernel_properties(batch, heads, n, nk, d, dtype, layout):
    """The descriptor kernel (forced) at any token counts: every query/key tail the zero fill and the store clip."""
    what = f"tma B={batch} H={heads} N={n} Nk={nk} d={d} {dtype} {layout}"
    note(what)
    from sdkernels.kernels.flash_attention_tma import use_tma
    q, k, v, h = make_qkv(batch, heads, n, nk, d, dtype, layout)
    with counting_tma_launches() as launches:
        q4, k4, v4 = (as_bhnd(t, h) for t in (q, k, v))
        assert use_tma(q4, k4, v4, torch.empty_like(q4), None), what
        check("flash", q, k, v, None, h, what=what)
    assert launches == [1], f"{what}: the descriptor kernel ran {len(launches)} times, not once"


@pytest.mark.parametrize("one_chunk", ["40,80", ""])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 80])
def test_flash_descriptor_kernel_chunking(tma_runs, monkeypatch, d, dtype, one_chunk):
    """SDKERNELS_FLASH_TMA_ONE_CHUNK: the listed head dims as one chunk zero-filled to a power of two (40 as 64),
    the others in HEAD_DIM_CHUNKS' two (40 as 32 + 16, 80 as 64 + 16)."""
    from sdkernels.kernels.flash_attention_tma import tma_chunks
    monkeypatch.setenv("SDKERNELS_FLASH_TMA_ONE_CHUNK", one_chunk)
    assert tma_chunks(d) == ((64 if d == 40 else 128, 0) if one_chunk else (64 if d == 80 else 32, 16))
    for nk in TMA_KEYS:
        q, k, v, h = make_qkv(2, 3, 45, nk, d, dtype, "bnhd")
        check("flash", q, k, v, None, h, what=f"tma chunks {one_chunk!r} d={d} Nk={nk} {dtype}")
    assert len(tma_runs) == len(TMA_KEYS)


def test_flash_descriptor_rules(monkeypatch):
    """What the descriptor kernel refuses goes to the pointer kernel: masks, head-dim strides, starts or strides off
    16 bytes, fp32, head dims without a config; by default only sm_90+ and more than SHORT_KEYS keys take it."""
    from sdkernels.kernels import flash_attention_tma as ft
    from sdkernels.kernels.flash_attention import SHORT_KEYS

    def views(*args, **kwargs):
        q, k, v, h = make_qkv(*args, **kwargs)
        q4, k4, v4 = (as_bhnd(t, h) for t in (q, k, v))
        return q4, k4, v4, torch.empty_like(q4)

    q, k, v, out = views(1, 2, 16, SHORT_KEYS + 1, 64, torch.float16, "bnhd")
    assert ft.tma_why_not(q, k, v, out, None) is None
    mask = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
    assert "mask" in ft.tma_why_not(q, k, v, out, mask)
    assert "head-dim stride" in ft.tma_why_not(*views(1, 2, 16, 16, 64, torch.float16, "head_dim_strided"), None)
    assert "dtype" in ft.tma_why_not(*views(1, 2, 16, 16, 64, torch.float32, "bnhd"), None)
    assert "head dim 128" in ft.tma_why_not(*views(1, 2, 16, 16, 128, torch.float16, "bnhd"), None)
    wide = torch.randn(1, 16, 2 * 64 + 1, device=DEVICE).half()
    q_off = as_bhnd(wide[..., 1:2 * 64 + 1], 2)  # starts 2 bytes past an aligned address
    assert "16 bytes" in ft.tma_why_not(q_off, k[:, :, :16], v[:, :, :16], out, None)
    monkeypatch.setenv("SDKERNELS_FLASH_TMA", "0")
    assert not ft.use_tma(q, k, v, out, None)
    monkeypatch.setenv("SDKERNELS_FLASH_TMA", "")
    hopper = GPU and torch.cuda.get_device_capability()[0] >= 9
    assert ft.use_tma(q, k, v, out, None) == hopper
    assert not ft.use_tma(q, k[:, :, :SHORT_KEYS], v[:, :, :SHORT_KEYS], out, None)


def test_output_layouts():
    for layout in ("bnhd", "fused_qkv"):
        q, k, v, h = make_qkv(2, 2, 9, 12, SMALL_D, torch.float16, layout)
        out = run("flash", q, k, v, SMALL_D ** -0.5, None, h)
        assert out.shape == (2, 9, 2 * SMALL_D) and out.is_contiguous()
    q, k, v, h = make_qkv(2, 2, 9, 12, SMALL_D, torch.float16, "bhnd_transposed")
    out = run("flash", q, k, v, SMALL_D ** -0.5, None, h)
    assert out.stride() == q.stride()  # (B, N, H, d) in memory: the processor's reshape back is free


def test_sdpa_route_returns_sdpa_output_without_a_copy(monkeypatch):
    """The SDPA route's output for q as diffusers' projections give it (contiguous, or a slice of a fused qkv
    projection): SDPA's own (B, N, H, d) memory reshaped, contiguous as output_like would make it, never a copy into a
    new output; q of another layout gets output_like's layout (check)."""
    for layout in ("bnhd", "fused_qkv"):
        q, k, v, h = make_qkv(2, 3, 9, 12, 40, torch.float16, layout)
        assert attn_ops.output_like(q, v, h).is_contiguous()
        with monkeypatch.context() as m:
            m.setattr(attn_ops, "output_like", lambda *a: pytest.fail(f"{layout}: copied into a new output"))
            out = run("reference", q, k, v, 40 ** -0.5, None, h)
        assert out.shape == q.shape and out.is_contiguous(), layout
        check_accuracy(out, q, k, v, 40 ** -0.5, None, h, what=f"SDPA route {layout}")
    for layout in ("bhnd", "bhnd_transposed", "head_dim_strided"):
        q, k, v, h = make_qkv(2, 3, 9, 12, 40, torch.float16, layout)
        out = run("reference", q, k, v, 40 ** -0.5, None, h)
        assert out.stride() == attn_ops.output_like(q, v, h).stride(), layout
        check_accuracy(out, q, k, v, 40 ** -0.5, None, h, what=f"SDPA route {layout}")


# ---- fallbacks and errors -------------------------------------------------------------------------------------

def test_unsupported_head_dim_falls_back_once_with_warning():
    q, k, v, h = make_qkv(1, 2, 7, 9, 96, torch.float16, "bnhd")
    dispatch._warned.clear()
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="head dim 96"):
        out = flash_attention(q, k, v, heads=h)
    assert dispatch.last_backend(OP) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdkernels.SdkernelsFallbackWarning)
        flash_attention(q, k, v, heads=h)
    check_accuracy(out, q, k, v, 96 ** -0.5, None, h, what="fallback d=96")


def test_bool_mask_and_float64_fall_back():
    q, k, v, h = make_qkv(1, 2, 7, 9, 64, torch.float32, "bhnd")
    keep = torch.rand(1, 1, 7, 9, device=DEVICE) > 0.3
    keep[..., 0] = True
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="boolean"):
        out = flash_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, attention_reference(q, k, v, 64 ** -0.5, keep))
    q, k, v = (t.double() for t in (q, k, v))
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="float64"):
        out = flash_attention(q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v, 64 ** -0.5))


def test_non_positive_scale_falls_back():
    q, k, v, h = make_qkv(1, 2, 7, 9, 64, torch.float16, "bnhd")
    with pytest.warns(sdkernels.SdkernelsFallbackWarning, match="not positive"):
        out = flash_attention(q, k, v, -0.3, heads=h)
    check_accuracy(out, q, k, v, -0.3, None, h, what="negative scale")


def test_strict_forcing_reports_the_reason():
    q, k, v, h = make_qkv(1, 2, 7, 9, 256, torch.float16, "bnhd")
    with pytest.raises(RuntimeError, match="forced backend 'flash'.*head dim 256"):
        with sdkernels.use_backend("flash", op=OP, strict=True):
            flash_attention(q, k, v, heads=h)


@pytest.mark.parametrize("bad, match", [
    (lambda: (torch.randn(2, 5, 80), torch.randn(2, 7, 80), torch.randn(2, 7, 80), None, 3), "multiple of heads"),
    (lambda: (torch.randn(2, 5, 80), torch.randn(2, 7, 80), torch.randn(2, 6, 80), None, 2), "same number of tokens"),
    (lambda: (torch.randn(2, 5, 80), torch.randn(3, 7, 80), torch.randn(3, 7, 80), None, 2), "same batch"),
    (lambda: (torch.randn(2, 2, 5, 40), torch.randn(2, 2, 7, 32), torch.randn(2, 2, 7, 40), None, None),
     "same head dim"),
    (lambda: (torch.randn(2, 5, 80), torch.randn(2, 7, 80), torch.randn(2, 7, 80), None, None), r"\(B, H, tokens"),
    (lambda: (torch.randn(2, 2, 5, 40), torch.randn(2, 2, 7, 40).half(), torch.randn(2, 2, 7, 40), None, None),
     "share dtype"),
    (lambda: (torch.randn(2, 2, 5, 40), torch.randn(2, 2, 7, 40), torch.randn(2, 2, 7, 40), torch.randn(2, 2, 5, 6),
              None), "broadcast to"),
    (lambda: (torch.randn(2, 2, 5, 40), torch.randn(2, 2, 7, 40), torch.randn(2, 2, 7, 40),
              torch.zeros(5, 7, dtype=torch.int32), None), "additive float mask"),
    (lambda: (torch.randint(0, 3, (2, 2, 5, 40)), torch.randn(2, 2, 7, 40), torch.randn(2, 2, 7, 40), None, None),
     "floating point"),
])
def test_invalid_inputs_raise_clear_errors(bad, match):
    q, k, v, mask, heads = bad()
    with pytest.raises(sdkernels.SdkernelsInputError, match=match) as e:
        flash_attention(q, k, v, attn_mask=mask, heads=heads)
    assert "sdkernels::flash_attention" in str(e.value) and "q=Tensor(shape=" in str(e.value)


def test_backend_chooser_is_consulted_unless_a_backend_is_forced():
    q, k, v, h = make_qkv(1, 2, 7, 9, SMALL_D, torch.float16, "bnhd")
    seen = []

    def choose(*args):
        seen.append(args[0].shape)
        return "partial_softmax"

    dispatch.set_chooser(OP, choose)
    try:
        flash_attention(q, k, v, heads=h)
        assert dispatch.last_backend(OP) == "partial_softmax" and seen
        with sdkernels.use_backend("flash", op=OP, strict=True):
            flash_attention(q, k, v, heads=h)
        assert dispatch.last_backend(OP) == "flash"
    finally:
        dispatch.set_chooser(OP, None)


# ---- torch integration ----------------------------------------------------------------------------------------

def small_args(dtype=torch.float32, mask=True):
    q, k, v, h = make_qkv(2, 2, 9, 13, SMALL_D, dtype, "bnhd")
    return (q, k, v, SMALL_D ** -0.5, make_mask("keys", 2, 2, 9, 13, dtype) if mask else None, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with sdkernels.use_backend(backend, op=OP, strict=True):
        torch.library.opcheck(torch.ops.sdkernels.flash_attention.default, small_args())
        q, k, v, h = make_qkv(1, 2, 5, 6, 64, torch.float32, "bhnd_transposed")
        torch.library.opcheck(torch.ops.sdkernels.flash_attention.default, (q, k, v, 0.125, None, 0))


def test_opcheck_of_the_sdpa_route():
    """The SDPA route returns SDPA's output transposed and reshaped (a view of it where SDPA wrote (B, N, H, d)
    memory), as AttnProcessor2_0 does: still a valid custom-op output."""
    q, k, v, _ = make_qkv(2, 2, 9, 13, 64, torch.float32, "bnhd")
    with sdkernels.use_backend("reference", op=OP):
        torch.library.opcheck(torch.ops.sdkernels.flash_attention.default, (q, k, v, 0.125, None, 2))


def test_torch_compile_fullgraph():
    args = small_args()

    def f(q, k, v, scale, mask, heads):
        return flash_attention(q * 2, k, v, scale, mask, heads) + 1

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if GPU else "aot_eager")
    with sdkernels.use_backend("flash", op=OP, strict=True):
        torch.testing.assert_close(compiled(*args), f(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS + ["flash:tma"])
def test_cuda_graph_capture_and_replay(monkeypatch, backend):
    backend, _, tma = backend.partition(":")
    if tma:  # the descriptor kernel: no mask, and SDKERNELS_FLASH_TMA=1
        monkeypatch.setenv("SDKERNELS_FLASH_TMA", "1")
    q, k, v, scale, mask, h = small_args(torch.float16, mask=not tma)
    with sdkernels.use_backend(backend, op=OP, strict=True):
        flash_attention(q, k, v, scale, mask, h)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_attention(q, k, v, scale, mask, h)
        for _ in range(2):
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, flash_attention(q, k, v, scale, mask, h), atol=0, rtol=0)


# ---- SD sizes (GPU lane) --------------------------------------------------------------------------------------

SD_CASES = [  # (B, H, N, Nk, d): SD1.5 self/cross attention at 512px, SD2.1/SDXL d=64
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 10, 4096, 4096, 64), (2, 10, 1024, 77, 64),
    # SD2.1 at 768 px, its third level: 4 full key blocks of 128 and a partial one (a two-chunk head dim went wrong
    # on an H100 with 4 full blocks and a partial one; no other case here has more than 3)
    (2, 20, 576, 576, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SD_CASES, ids=lambda c: "B={},H={},N={},Nk={},d={}".format(*c))
def test_sd_sizes(case, dtype, backend):
    B, H, N, Nk, d = case
    q, k, v, h = make_qkv(B, H, N, Nk, d, dtype, "bnhd")
    out = check(backend, q, k, v, None, h, what=str(case))
    # The same algorithm as SDPA's flash kernel (P rounded to the input dtype): within 2x of its error too.
    scale = d ** -0.5
    ref = reference(q, k, v, scale, None, h).double()
    q4, k4, v4 = (as_bhnd(t, h) for t in (q, k, v))
    sdpa = from_bhnd(torch.nn.functional.scaled_dot_product_attention(q4, k4, v4), h)
    err, sdpa_err = ((t.double() - ref).abs().max().item() for t in (out, sdpa))
    assert err <= 2 * sdpa_err + tolerance(dtype)[0] / 4, f"{case}: error {err:.3g} vs SDPA's {sdpa_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_sd_cross_attention_with_key_padding_mask(backend):
    B, H, N, Nk, d = 2, 8, 4096, 77, 40
    q, k, v, h = make_qkv(B, H, N, Nk, d, torch.float16, "bnhd")
    check(backend, q, k, v, make_mask("keys", B, H, N, Nk, torch.float16), h, what="cross-attn mask")


@pytest.mark.gpu
@pytest.mark.parametrize("case", SD_CASES, ids=lambda c: "B={},H={},N={},Nk={},d={}".format(*c))
def test_sd_sizes_pointer_kernel(monkeypatch, case):
    """The pointer kernel at SD sizes, where an sm_90 GPU runs the descriptor kernel by default."""
    monkeypatch.setenv("SDKERNELS_FLASH_TMA", "0")
    B, H, N, Nk, d = case
    q, k, v, h = make_qkv(B, H, N, Nk, d, torch.float16, "bnhd")
    check("flash", q, k, v, None, h, what=str(case))
