"""patch(unet, flat=True): the UNet's forward runs as a dynamo-traced graph from its second call, with the same
result as the patched model unflattened, every sdkernels op node calling the op's implementation directly;
unpatch, deep copies, autograd and the wrong combination with cuda_graph behave."""
import copy
import operator

import pytest
import torch

import sdkernels
from sdkernels import dispatch, flat
from sdkernels.patch import patch, unpatch
from sdkernels.testing import assert_close

pytest.importorskip("diffusers")
from test_patch import on_device, run_unet, tiny_unet, unet_inputs  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def traced_graphs(monkeypatch) -> list:
    """The graphs flat_backend receives, with how many op nodes it pointed at implementations."""
    seen, real = [], flat.direct_calls

    def counting(gm):
        n = real(gm)
        seen.append((gm, n))
        return n

    monkeypatch.setattr(flat, "direct_calls", counting)
    return seen


def test_flat_unet_matches_the_unflattened_patched_one(monkeypatch, no_tf32):
    graphs = traced_graphs(monkeypatch)
    unet, inputs = on_device(tiny_unet(), *unet_inputs(batch=2))
    expected = run_unet(unet, inputs)
    patch(unet, flat=True)
    first = run_unet(unet, inputs)  # eager: precompile and the op choices
    assert graphs == []
    dispatch._last_backend.clear()
    out = run_unet(unet, inputs)    # traced, then run flat
    assert len(graphs) >= 1 and sum(n for _, n in graphs) > 0  # sdkernels ops in the graph, called directly
    gm = graphs[0][0]
    assert not any(str(flat._op_name(node.target)).startswith("sdkernels::") for node in gm.graph.nodes)
    assert dispatch.last_backend("group_norm") is not None  # the op ran, called from the graph
    assert set(flat.installed(unet).flat) == {False}
    assert_close(first, expected, torch.float32, reduction_size=64 * 9, what="patched")
    assert_close(out, expected, torch.float32, reduction_size=64 * 9, what="flat")
    again = run_unet(unet, [torch.randn_like(inputs[0]), inputs[1], inputs[2]])  # no new trace for new values
    assert len(graphs) == 1 and again.shape == out.shape
    unpatch(unet)
    assert flat.installed(unet) is None and "forward" not in unet.__dict__
    assert torch.equal(run_unet(unet, inputs), expected)


def test_flat_and_graphs_are_exclusive():
    with pytest.raises(ValueError, match="flat=True and cuda_graph=True"):
        patch(tiny_unet(), flat=True, cuda_graph=True)


def test_flat_skips_what_is_not_a_unet_and_sits_under_the_step_choice():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    patch(vae, flat=True)
    assert flat.installed(vae) is None
    unet = patch(tiny_unet(), flat=True)
    assert sdkernels.step_choice.installed(unet).original.owner is flat.installed(unet)
    assert patch(unet, flat=True, tune=False) is unet and sdkernels.step_choice.installed(unet) is None
    patch(unet, cuda_graph=True)
    assert flat.installed(unet) is None


def test_the_original_modules_get_a_graph_of_their_own(monkeypatch, no_tf32):
    """Inside running_originals (the step choice's other way) the flat call traces and runs the original modules."""
    from sdkernels.patch import running_originals
    graphs = traced_graphs(monkeypatch)
    unet, inputs = on_device(tiny_unet(), *unet_inputs())
    expected = run_unet(unet, inputs)
    patch(unet, flat=True, tune=False, channels_last=False)  # NHWC weights would change the convs' rounding
    with running_originals():
        for _ in range(2):
            out = run_unet(unet, inputs)
    assert len(graphs) == 1 and graphs[0][1] == 0  # no sdkernels op in the originals' graph
    assert_close(out, expected, torch.float32, reduction_size=64 * 9, what="originals, flat")
    for _ in range(2):
        run_unet(unet, inputs)
    assert len(graphs) == 2 and graphs[1][1] > 0


def test_deep_copy_traces_its_own_model(monkeypatch):
    graphs = traced_graphs(monkeypatch)
    unet, inputs = on_device(tiny_unet(), *unet_inputs())
    patch(unet, flat=True)
    for _ in range(2):
        run_unet(unet, inputs)
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert flat.installed(twin).flat == {} and flat.installed(twin).model is twin
    expected = run_unet(twin, inputs)  # the copy's first call: eager
    out = run_unet(twin, inputs)
    assert len(graphs) == 2
    assert_close(out, expected, torch.float32, reduction_size=64 * 9, what="copy, flat")
    assert not torch.allclose(out, run_unet(unet, inputs))


def test_autograd_runs_unflattened():
    unet, inputs = on_device(tiny_unet(), *unet_inputs())
    patch(unet, flat=True)
    for _ in range(2):
        out = unet(*inputs).sample  # grad mode: the forward as it is, never traced
    out.float().sum().backward()
    assert flat.installed(unet).flat == {}


def test_fused_projections_stay_fused_in_the_flat_graph(monkeypatch, no_tf32):
    """The linear groups' projections (self-attention q/k/v, the time-embedding projections over the blocks' one
    merged SiLU) are one sdkernels::linear_group_all call a group in the flat graph, with the unflattened result."""
    from sdkernels import linear_groups
    graphs = traced_graphs(monkeypatch)
    unet, inputs = on_device(tiny_unet(), *unet_inputs(batch=2))
    patch(unet, flat=True, tune=False)
    expected = run_unet(unet, inputs)  # eager: the groups run
    grouped = [g for g in linear_groups._GROUPS if any(m in set(unet.modules()) for m in g.members)]
    assert grouped and any(len(g.members) > 3 for g in grouped), "the tiny UNet has linear groups, time embeddings'"
    out = run_unet(unet, inputs)
    calls = [n for n in graphs[0][0].graph.nodes if getattr(n.target, "op_name", None) == "sdkernels::linear_group_all"]
    assert len(calls) == len(grouped)
    assert_close(out, expected, torch.float32, reduction_size=64 * 9, what="flat, grouped")


def test_a_replaced_member_weight_reaches_the_flat_graph(no_tf32):
    """A flat graph reads a group's buffers: a member weight replaced after the trace is laid out again before the
    next flat call (linear_groups.keep_intact), as eagerly."""
    from sdkernels import linear_groups
    unet, inputs = on_device(tiny_unet(), *unet_inputs(batch=2))
    patch(unet, flat=True, tune=False)
    for _ in range(2):
        run_unet(unet, inputs)
    member = next(g for g in linear_groups._GROUPS if unet.time_embedding.linear_1 not in g.members
                  and any(m in set(unet.modules()) for m in g.members)).members[0]
    with torch.no_grad():
        member.weight = torch.nn.Parameter(member.weight * 3)
    out = run_unet(unet, inputs)
    unpatch(unet)
    assert_close(out, run_unet(unet, inputs), torch.float32, reduction_size=64 * 9, what="replaced weight, flat")


def test_repeated_calls_merge_unless_their_input_was_written_between():
    def body(x, w):
        a = torch.ops.sdkernels.linear_group_all(x, w, None, None)
        s1 = torch.nn.functional.silu(x)
        b = torch.ops.sdkernels.linear_group_all(x, w, None, None)  # merged into a
        s2 = torch.nn.functional.silu(x)                            # merged into s1
        x.view(-1).add_(1)                                          # written through a view
        c = torch.ops.sdkernels.linear_group_all(x, w, None, None)  # not merged
        s3 = torch.nn.functional.silu(x)                            # not merged
        s4 = torch.nn.functional.silu(x, True)                      # in place: not merged, and it writes x
        s5 = torch.nn.functional.silu(x)                            # not merged
        return a + b + c, s1 + s2 + s3 + s4 + s5

    gm = torch.fx.symbolic_trace(body)
    assert flat.merge_repeats(gm) == 2
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "linear_group_all" in str(n.target)]
    assert len(ops) == 2
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    expected = body(x.clone(), w)
    got = gm(x.clone(), w)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e)


def test_a_write_through_a_view_of_a_later_argument_blocks_merging():
    """broadcast_tensors(w, x)[1] is a view of x, its second argument: an unknown call of several tensors may alias
    any of them, so a write into its result counts as a write into any memory."""
    def body(x, w):
        x, w = torch.cos(x), torch.sin(w)  # fresh tensors: memory of their own
        s1 = torch.nn.functional.silu(x)
        torch.broadcast_tensors(w[:1], x)[1].add_(1)
        s2 = torch.nn.functional.silu(x)
        return s1 + s2

    gm = torch.fx.symbolic_trace(body)
    assert flat.merge_repeats(gm) == 0
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.allclose(gm(x.clone(), w), body(x.clone(), w))


def test_the_flat_graphs_op_passes_opcheck_and_computes_its_members():
    from torch import nn
    from sdkernels import linear_groups
    members = [nn.Linear(8, 4), nn.Linear(8, 6)]
    extras = [torch.randn(4), None]
    group = linear_groups.LinearGroup("two", members, extras)
    x = torch.randn(3, 8)
    args = (x, group.weight, group.bias, group.extra)
    torch.library.opcheck(torch.ops.sdkernels.linear_group_all.default, args)
    full = torch.ops.sdkernels.linear_group_all(*args)
    for index, m in enumerate(members):
        expected = m(x) + (extras[index] if extras[index] is not None else 0)
        assert_close(full[..., group.columns[index]], expected, torch.float32, reduction_size=8,
                     what=f"member {index}")
    twin = copy.deepcopy(group)
    assert twin in linear_groups._GROUPS and group in linear_groups._GROUPS


def _with_values(gm, *args):
    """gm with each node's traced value in its meta, as dynamo leaves them (the passes read shapes and dtypes)."""
    class Recording(torch.fx.Interpreter):
        def run_node(self, node):
            node.meta["example_value"] = result = super().run_node(node)
            return result
    Recording(gm).run(*args)
    return gm


def test_unit_scalings_go_only_where_no_write_can_reach_other_memory():
    def body(x, w):
        y = torch.nn.functional.linear(x, w)
        dropped = y / 1.0                              # fresh, read by nothing else
        kept_input = x / 1.0                           # a graph input: the result must not alias it
        z = torch.nn.functional.linear(x, w)
        kept_shared = z * 1.0                          # z is read again below
        kept_scaled = torch.nn.functional.linear(x, w) / 2.0
        v = torch.nn.functional.linear(x, w).t()
        kept_view = v / 1.0                            # a view (memory root: the linear, read through the view)
        dropped.add_(1)                                # a write through the result reaches only y's memory
        return dropped, kept_input, kept_shared + z, kept_scaled, kept_view

    x, w = torch.randn(3, 4), torch.randn(5, 4)
    gm = _with_values(torch.fx.symbolic_trace(body), x, w)
    assert flat.drop_unit_scaling(gm) == 1
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.truediv, operator.mul)]
    assert len(left) == 4
    for got, expected in zip(gm(x.clone(), w), body(x.clone(), w)):
        assert torch.equal(got, expected)


def test_chained_blocks_add_and_norm_in_one_op_in_the_flat_graph(monkeypatch, no_tf32):
    """A transformer block's last add and the next block's norm1 (eagerly linked across the blocks' calls) are one
    sdkernels::add_layer_norm in the flat graph too, and the attention outputs' ``/ 1.0`` is gone: the unflattened
    patched result, bit for bit where both run the same ops."""
    from diffusers import UNet2DConditionModel
    from test_patch import randomize
    graphs = traced_graphs(monkeypatch)
    fused = []
    real = flat.fuse_add_layer_norms
    monkeypatch.setattr(flat, "fuse_add_layer_norms", lambda gm: fused.append(real(gm)) or fused[-1])
    unet = randomize(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        transformer_layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    unet, inputs = on_device(unet, *unet_inputs(batch=2))
    patch(unet, flat=True, tune=False)
    expected = run_unet(unet, inputs)  # eager: the chain links (8 blocks in 4 transformers: 4 links)
    out = run_unet(unet, inputs)
    assert fused == [4]
    nodes = list(graphs[0][0].graph.nodes)
    assert not any(n.target is operator.truediv and n.args[1] == 1.0 for n in nodes if n.op == "call_function")
    assert_close(out, expected, torch.float32, reduction_size=64 * 9, what="flat, chained blocks")


def test_only_idle_dropouts_go():
    def body(x):
        F = torch.nn.functional
        return F.dropout(x, 0.1, False) + F.dropout(x, p=0.0) + F.dropout(x, 0.5, True), F.dropout(x)

    gm = torch.fx.symbolic_trace(body)
    assert flat.drop_idle_dropouts(gm) == 2
    kept = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.dropout]
    assert len(kept) == 2 and all(n.args[1:] in ((0.5, True), ()) for n in kept)


def test_peft_lora_adapters_after_the_trace(monkeypatch, no_tf32):
    """LoRA adapters added, weighted, disabled and deleted after the flat graph was traced: every call equals an
    unpatched twin given the same adapters (dynamo traces again where its guards see a change, and past its
    recompile limit runs the forward as it is)."""
    peft = pytest.importorskip("peft")
    graphs = traced_graphs(monkeypatch)
    unet, inputs = on_device(tiny_unet(), *unet_inputs(batch=2))
    twin = copy.deepcopy(unet)
    patch(unet, flat=True, tune=False)
    for _ in range(2):
        base = run_unet(unet, inputs)  # the second call traced
    for name, seed in (("a", 1), ("b", 2)):
        for model in (unet, twin):
            torch.manual_seed(seed)
            model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
    traced = len(graphs)
    steps = [lambda m: m.set_adapters(["a", "b"], [1.0, 0.3]), lambda m: m.disable_adapters(),
             lambda m: m.enable_adapters(), lambda m: m.delete_adapters(["a", "b"])]
    outs = []
    for i, step in enumerate(steps):
        step(unet)
        step(twin)
        out = run_unet(unet, inputs)
        assert_close(out, run_unet(twin, inputs), torch.float32, reduction_size=64 * 9, what=f"LoRA step {i}")
        outs.append(out)
    assert len(graphs) > traced  # the adapted model ran flat graphs of its own
    assert not torch.allclose(outs[0], base, rtol=1e-3, atol=1e-3)  # the adapters did change the output
    assert_close(outs[-1], base, torch.float32, reduction_size=64 * 9, what="adapters deleted")
    unpatch(unet)


def test_a_new_resolution_and_batch_trace_graphs_of_their_own(monkeypatch, no_tf32):
    """After the first signature's trace, a call at another resolution and batch size traces its own graph (or runs
    as it is) and equals the unpatched model; the first signature's graph still serves its shape."""
    graphs = traced_graphs(monkeypatch)
    unet, inputs = on_device(tiny_unet(), *unet_inputs(batch=2))
    twin = copy.deepcopy(unet)
    patch(unet, flat=True, tune=False)
    for _ in range(2):
        run_unet(unet, inputs)
    traced = len(graphs)
    _, (x, t, context) = on_device(twin, torch.randn(1, 4, 16, 12), torch.tensor([300]), torch.randn(1, 7, 32))
    for _ in range(2):
        out = run_unet(unet, (x, t, context))
    assert len(graphs) > traced
    assert_close(out, run_unet(twin, (x, t, context)), torch.float32, reduction_size=64 * 9, what="new signature")
    assert_close(run_unet(unet, inputs), run_unet(twin, inputs), torch.float32, reduction_size=64 * 9,
                 what="first signature again")
    unpatch(unet)
