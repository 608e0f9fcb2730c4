"""The transformer_add_norm patcher: a BasicTransformerBlock whose residual adds and the LayerNorms after them run as
sdkernels::add_layer_norm, against the unpatched block (fp32 on the CPU, fp16/bf16 at SD shapes on the GPU); the
blocks and calls it must leave to the original forward; patch, unpatch, compile and CUDA graphs."""
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import sdkernels
from sdkernels.patch import patch, patched_by, summary, unpatch
from sdkernels.patchers import transformer_block as patcher
from sdkernels.testing import assert_close
from conftest import DEVICE

OPS = ["transformer_add_norm"]


def make_block(dim=32, heads=2, cross=24, dtype=torch.float32, **kw):
    block = BasicTransformerBlock(dim, heads, dim // heads, cross_attention_dim=cross, **kw)
    with torch.no_grad():  # non-trivial norms: diffusers initializes them to the identity
        for name, p in block.named_parameters():
            if "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn_like(p))
    return block.to(DEVICE, dtype).eval()


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    op = patcher.add_layer_norm
    monkeypatch.setattr(patcher, "add_layer_norm", lambda *a: calls.append(a) or op(*a))
    return calls


@pytest.mark.parametrize("kind", ["self and cross attention", "self attention only", "double self attention"])
def test_matches_the_unpatched_block(kind, fused_calls):
    kw = {"self attention only": dict(cross=None), "double self attention": dict(cross=None,
                                                                                   double_self_attention=True)}
    block = make_block(**kw.get(kind, {}))
    x = torch.randn(2, 13, 32, device=DEVICE)
    states = torch.randn(2, 7, 24, device=DEVICE) if kind == "self and cross attention" else None
    with torch.no_grad():
        expected = block(x, encoder_hidden_states=states)
        patch(block, ops=OPS)
        with sdkernels.use_backend("triton", op="add_layer_norm", strict=True):
            out = block(x, encoder_hidden_states=states)
    assert patched_by(block) == ("transformer_add_norm",)
    # one fused add + norm before each of norm2 (when attn2 runs) and norm3
    assert len(fused_calls) == (1 if kind == "self attention only" else 2)
    assert_close(out, expected, torch.float32, reduction_size=32, what=kind)


@pytest.mark.parametrize("why", ["autograd", "gligen", "chunked feed-forward", "4-D input", "strided residual"])
def test_other_calls_run_the_original_forward(why, fused_calls):
    block = make_block()
    x = torch.randn(2, 13, 32, device=DEVICE)
    states = torch.randn(2, 7, 24, device=DEVICE)
    kwargs = {}
    if why == "chunked feed-forward":
        block.set_chunk_feed_forward(13, dim=1)
    if why == "4-D input":
        x = x[:, None]
    if why == "strided residual":
        x = torch.randn(13, 2, 32, device=DEVICE).transpose(0, 1)
    if why == "gligen":  # diffusers pops "gligen" and runs its fuser; this block has none, so both raise alike
        kwargs["cross_attention_kwargs"] = {"gligen": {"objs": None}}
    grad = why == "autograd"

    def outcome():
        try:
            return block(x, encoder_hidden_states=states, **kwargs)
        except Exception as e:  # noqa: BLE001  (the original's own error: the same one, from the same place)
            return type(e), str(e)

    with torch.set_grad_enabled(grad):
        expected = outcome()
        patch(block, ops=OPS)
        out = outcome()
    if why == "strided residual":  # the fused path runs: its first add and norm2 as module calls, then the op
        assert len(fused_calls) == 1 and torch.allclose(out, expected, atol=1e-5)
        return
    assert fused_calls == []
    if isinstance(expected, tuple):
        assert out == expected
    else:
        assert torch.equal(out, expected) and out.requires_grad == grad


def test_blocks_left_alone_say_why():
    ada = make_block(num_embeds_ada_norm=10, norm_type="ada_norm")
    hooked = make_block()
    hooked.norm3.register_forward_hook(lambda *a: None)
    for block, reason in ((ada, "norm_type 'ada_norm'"), (hooked, "norm3 has forward hooks")):
        patch(block, ops=OPS)
        assert summary(block).replaced == {"transformer_add_norm": 0}
        assert reason in summary(block).left[0][2]


def test_patch_twice_unpatch_and_layer_norm_still_patches_the_norms():
    block = make_block()
    x, states = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    with torch.no_grad():
        expected = block(x, encoder_hidden_states=states)
        patch(block, ops=OPS + ["layer_norm"])
        patch(block, ops=OPS + ["layer_norm"])
        assert summary(block).replaced["transformer_add_norm"] == 1
        assert summary(block).replaced["layer_norm"] == 3  # norm1 for the fused path; norm2/norm3 for its fallback
        unpatch(block)
        assert "forward" not in block.__dict__ and "forward" not in block.norm2.__dict__
        assert torch.equal(block(x, encoder_hidden_states=states), expected)


def test_torch_compile_fullgraph():
    block = make_block()
    x, states = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    with torch.no_grad():
        expected = block(x, encoder_hidden_states=states)
        patch(block, ops=OPS)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        assert_close(compiled(x, encoder_hidden_states=states), expected, torch.float32, reduction_size=32,
                     what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dim,heads,tokens", [(320, 8, 4096), (640, 10, 1024), (1280, 20, 256)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_shapes_and_cuda_graphs(dim, heads, tokens, dtype, fused_calls):
    from sdkernels.benchmarking import as_cuda_graph
    block = make_block(dim, heads, cross=768, dtype=torch.float32)
    x = torch.randn(2, tokens, dim, device=DEVICE)
    states = torch.randn(2, 77, 768, device=DEVICE)
    with torch.no_grad():
        exact = block.double()(x.double(), encoder_hidden_states=states.double())
        block.to(dtype)
        x, states = x.to(dtype), states.to(dtype)
        eager = block(x, encoder_hidden_states=states)
        patch(block, ops=OPS)
        out = block(x, encoder_hidden_states=states)
        replay = as_cuda_graph(lambda: block(x, encoder_hidden_states=states))
        graphed = replay()
    assert len(fused_calls) >= 2
    eager_error = (eager.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert error <= 2 * eager_error + 1e-3, f"ours {error:.3g}, eager's {eager_error:.3g}"
    assert torch.equal(graphed, out)


def chain(patched=True):
    torch.manual_seed(0)
    blocks = [make_block(), make_block()]
    if patched:
        for b in blocks:
            patch(b, ops=OPS)
    return blocks


def test_a_chain_learns_its_link_and_fuses_the_last_add_with_the_next_norm1(fused_calls):
    x, states = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    first, second = chain(patched=False)
    with torch.no_grad():
        expected = second(first(x, encoder_hidden_states=states), encoder_hidden_states=states)
        first, second = chain()
        norm1_calls = []
        second.norm1.forward = lambda h, f=second.norm1.forward: norm1_calls.append(1) or f(h)
        for call in range(3):
            fused_calls.clear(), norm1_calls.clear()
            out = second(first(x, encoder_hidden_states=states), encoder_hidden_states=states)
            assert_close(out, expected, torch.float32, reduction_size=32, what=f"call {call}")
            # the first call learns that first's output feeds second; later calls fuse the add with second.norm1
            assert (len(fused_calls), len(norm1_calls)) == ((4, 1) if call == 0 else (5, 0))
        unpatch(first)
        assert patcher._NEXT_NORM not in first.__dict__


@pytest.mark.parametrize("between", ["in-place change", "another tensor", "hook on norm1", "inference mode"])
def test_a_linked_chain_still_computes_what_its_input_is(between):
    x, states = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    first, second = chain(patched=False)

    def run(first, second):
        h = first(x, encoder_hidden_states=states)
        if between == "in-place change":
            h.mul_(1.5)
        if between == "another tensor":
            h = h.clone()
        return second(h, encoder_hidden_states=states)

    hooked = []
    with torch.no_grad():
        expected = run(first, second)
        first, second = chain()
        run(first, second)  # learns the link
        if between == "hook on norm1":
            second.norm1.register_forward_hook(lambda *a: hooked.append(1))
        if between == "inference mode":
            with torch.inference_mode():
                out = run(first, second)
        else:
            out = run(first, second)
    assert_close(out, expected, torch.float32, reduction_size=32, what=between)
    assert hooked == ([1] if between == "hook on norm1" else [])


def test_a_deep_copy_of_a_linked_chain_links_its_own_blocks(fused_calls):
    import copy
    x, states = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    with torch.no_grad():
        first, second = chain()
        second(first(x, encoder_hidden_states=states), encoder_hidden_states=states)  # learns the link
        first_copy, second_copy = copy.deepcopy([first, second])
        assert first_copy.__dict__[patcher._NEXT_NORM] is second_copy.norm1
        second_copy.norm1.weight.mul_(2)  # the copy's own norm, not the original's
        fused_calls.clear()
        out = second_copy(first_copy(x, encoder_hidden_states=states), encoder_hidden_states=states)
        assert len(fused_calls) == 5
        reference = second_copy(first_copy(x, encoder_hidden_states=states).clone(), encoder_hidden_states=states)
    assert_close(out, reference, torch.float32, reduction_size=32, what="deep copy")
