"""Linear groups (sdkernels.linear_groups) and their patchers (qkv_projection, shared_projections): one GEMM for the
linears that read one input, each member's output as its module would give it, weights kept as views of one
buffer that follow in-place changes, and everything put back by unpatch."""
import contextlib
import logging
import types

import pytest
import torch
from torch import nn

import sdkernels
from sdkernels import linear_groups
from sdkernels.linear_groups import LinearGroup, link, project
from sdkernels.patch import patch, summary, unpatch
from sdkernels.testing import assert_close, randomize_weights
from conftest import DEVICE, GPU

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if GPU else [])


def linears(widths, in_features=24, bias=True, dtype=torch.float32):
    return [nn.Linear(in_features, w, bias=bias).to(DEVICE, dtype) for w in widths]


def grouped(members, extras=None):
    group = LinearGroup("test", members, extras)
    link(group)
    return group


class GemmCount:
    """Counts the GEMMs the groups run (F.linear as sdkernels.linear_groups calls it)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        functional = linear_groups.F

        def counting(*args, **kwargs):
            self.calls += 1
            return functional.linear(*args, **kwargs)
        monkeypatch.setattr(linear_groups, "F", types.SimpleNamespace(linear=counting))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_members_give_their_own_outputs_from_one_gemm(dtype, bias, monkeypatch):
    members = linears((16, 7, 33), bias=bias, dtype=dtype)
    x = torch.randn(3, 5, 24, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        expected = [m(x) for m in members]
        group, gemms = grouped(members), GemmCount(monkeypatch)
        outs = [project(m, x) for m in members]
    assert gemms.calls == 1
    for out, exp in zip(outs, expected):
        assert out.shape == exp.shape
        assert_close(out, exp, dtype)
    # no memory added: every weight (and bias) is a view of the group's buffer, in member order
    base = group.weight.data_ptr()
    size = group.weight.element_size() * 24
    assert [m.weight.data_ptr() for m in members] == [base, base + 16 * size, base + 23 * size]


@pytest.mark.parametrize("dtype", DTYPES)
def test_extras_join_their_members_output(dtype):
    members = linears((8, 12, 4), dtype=dtype)
    extras = [nn.Parameter(torch.randn(8, device=DEVICE, dtype=dtype)), None,
              nn.Parameter(torch.randn(4, device=DEVICE, dtype=dtype))]
    x = torch.randn(2, 24, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        expected = [m(x) + e if e is not None else m(x) for m, e in zip(members, extras)]
        grouped(members, extras)
        outs = [project(m, x, plus=e) for m, e in zip(members, extras)]
        assert_close(project(members[0], x), members[0](x), dtype)  # without its extra: the module itself
    for out, exp in zip(outs, expected):
        assert_close(out, exp, dtype)


def test_weights_changed_in_place_or_replaced_are_followed(caplog):
    members = linears((6, 10))
    x = torch.randn(4, 24, device=DEVICE)
    with torch.no_grad():
        group = grouped(members)
        members[1].weight.mul_(3)  # in place: the buffer itself
        members[0].bias.data.copy_(torch.randn(6))
        assert_close(project(members[0], x), members[0](x), torch.float32)
        assert_close(project(members[1], x), members[1](x), torch.float32)
        members[0].weight.data = torch.randn(6, 24, device=DEVICE)  # new memory: laid out again
        with caplog.at_level(logging.INFO, logger="sdkernels"):
            outs = [project(m, x) for m in members]
        assert any("laid out again" in r.getMessage() for r in caplog.records)
        for out, m in zip(outs, members):
            assert_close(out, m(x), torch.float32)
        assert members[0].weight.data_ptr() == group.weight.data_ptr()


def test_each_result_serves_each_member_once(monkeypatch):
    members = linears((5, 9))
    x = torch.randn(3, 24, device=DEVICE)
    with torch.no_grad():
        grouped(members)
        gemms = GemmCount(monkeypatch)
        project(members[0], x)
        members[0].weight.add_(1.0)
        again = project(members[0], x)  # a member asking again (the next forward) gets a fresh GEMM
        assert gemms.calls == 2
        assert_close(again, members[0](x), torch.float32)
        assert_close(project(members[1], x), members[1](x), torch.float32)
        assert gemms.calls == 2
        x.add_(1.0)  # the input changed in place: its result is stale
        assert_close(project(members[1], x), members[1](x), torch.float32)
        assert gemms.calls == 3


def test_members_on_different_inputs_stop_the_group(monkeypatch):
    members = linears((5, 9))
    with torch.no_grad():
        group = grouped(members)
        for _ in range(4):
            xs = [torch.randn(2, 24, device=DEVICE) for _ in members]
            for m, x in zip(members, xs):
                assert_close(project(m, x), m(x), torch.float32)
        assert group.broken == "its members were called on different inputs"
        gemms = GemmCount(monkeypatch)
        x = torch.randn(2, 24, device=DEVICE)
        assert_close(project(members[0], x), members[0](x), torch.float32)
        assert gemms.calls == 0


def test_calls_the_group_cannot_take_run_the_module():
    members = linears((5, 9))
    x = torch.randn(3, 24, device=DEVICE)
    grouped(members)
    seen = []
    members[1].register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        project(members[0], x)
        assert_close(project(members[1], x), members[1](x), torch.float32)
    assert len(seen) == 2  # the hook ran on project's call too
    with torch.enable_grad():  # autograd must record the module
        out = project(members[0], x)
    assert out.requires_grad and out.grad_fn is not None
    with torch.no_grad():
        for wrong in (torch.randn(3, 23, device=DEVICE), x.double()):  # the module's own error for these
            with pytest.raises(RuntimeError):
                project(members[0], wrong)


def test_dissolve_gives_each_weight_its_own_memory():
    members = linears((5, 9))
    state = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in members]
    group = grouped(members)
    group.dissolve()
    for m, (w, b) in zip(members, state):
        assert torch.equal(m.weight, w) and torch.equal(m.bias, b)
        assert m.weight.untyped_storage().nbytes() == w.untyped_storage().nbytes()
        assert "_sdkernels_linear_group" not in vars(m)


# ---- the patchers on a UNet -----------------------------------------------------------------------------------

def attention_unet():
    """A small UNet whose attention head dim (40) our attention patcher takes."""
    return randomize_weights(UNet2DConditionModel(
        sample_size=8, block_out_channels=(40, 80), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(1, 2), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))).to(DEVICE)


def unet_inputs():
    return (torch.randn(2, 4, 8, 8, device=DEVICE), torch.tensor([10, 700], device=DEVICE),
            torch.randn(2, 5, 32, device=DEVICE))


def test_patched_unet_groups_its_projections_and_matches(no_tf32, monkeypatch, tmp_path):
    unet, inputs = attention_unet(), unet_inputs()
    with torch.no_grad():
        expected = unet(*inputs).sample
        patch(unet, channels_last=False)  # safetensors saves contiguous tensors only (NHWC weights: .contiguous())
        gemms = GemmCount(monkeypatch)
        out = unet(*inputs).sample
    s = summary(unet)
    self_attention = sum(isinstance(m, Attention) and not m.is_cross_attention for m in unet.modules())
    assert s.replaced["qkv_projection"] == self_attention == 4 and s.replaced["shared_projections"] == 1
    groups = unet.__dict__["_sdkernels_linear_groups"]
    assert sorted(len(g.members) for g in groups) == [8, sum(isinstance(m, ResnetBlock2D) for m in unet.modules())]
    # one GEMM per self-attention, one for all cross-attention keys and values, one for all time projections
    assert gemms.calls == self_attention + 2
    assert_close(out, expected, torch.float32, reduction_size=320)
    # diffusers' save_pretrained (safetensors) takes the grouped weights: views that do not overlap
    state = unet.state_dict()
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(state, str(tmp_path / "unet.safetensors"))
    loaded = safetensors.load_file(str(tmp_path / "unet.safetensors"))
    assert loaded.keys() == state.keys() and all(torch.equal(state[k].cpu(), v) for k, v in loaded.items())
    unpatch(unet)
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, expected)
    assert all("_sdkernels_linear_group" not in vars(m) for m in unet.modules())


def test_projection_patchers_follow_the_callers_they_need():
    unet = attention_unet()
    patch(unet, ops=["qkv_projection", "shared_projections"])  # no attention processor, no ResNet forward of ours
    s = summary(unet)
    assert s.replaced == {"qkv_projection": 0, "shared_projections": 0} and s.left == []
    unet._hf_hook = object()  # accelerate offload: left alone
    unpatch(unet)
    patch(unet)
    assert summary(unet).replaced["shared_projections"] == summary(unet).replaced["qkv_projection"] == 0


@pytest.mark.gpu
def test_graph_replays_compute_the_projections_again():
    """A CUDA graph captures each group's GEMM: replays with new text states give new keys and values."""
    unet, (x, t, e) = attention_unet().half(), unet_inputs()
    x, e = x.half(), e.half()
    patch(unet)
    static = [x.clone(), t.clone(), e.clone()]
    with torch.no_grad():
        for _ in range(2):
            unet(*static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = unet(*static).sample
        for _ in range(2):
            new = [torch.randn_like(x), t, torch.randn_like(e)]
            for s, n in zip(static, new):
                s.copy_(n)
            graph.replay()
            assert_close(out, unet(*new).sample, torch.float16, reduction_size=320)


@pytest.mark.parametrize("flat", [False, True], ids=["eager_or_graphs", "flat"])
def test_lora_adapters_merged_and_removed_after_patching(no_tf32, flat):
    """peft adapters on to_q / to_k / to_v after patching: wrapped layers run as themselves; merging writes the
    base weights in place (the group's buffer), unmerging and deleting give the base model back. Each state matches
    the unpatched modules (and, on a GPU, through CUDA graphs; with flat=True, through flat graphs, each state's
    second call)."""
    peft = pytest.importorskip("peft")
    from sdkernels.patch import running_originals
    from peft.tuners.tuners_utils import BaseTunerLayer
    torch._dynamo.reset()
    unet, inputs = attention_unet(), unet_inputs()
    patch(unet, cuda_graph=GPU and not flat, flat=flat, tune=not flat)
    calls = 2 if flat else 1  # (flat: the first call of each way runs eagerly)

    def run():
        return [unet(*inputs).sample for _ in range(calls)][-1]

    def tuner_layers():
        return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]

    steps = [("adapter", lambda: unet.set_adapters(["a"])),
             ("merged", lambda: [m.merge() for m in tuner_layers()]),
             ("unmerged", lambda: [m.unmerge() for m in tuner_layers()]),
             ("deleted", lambda: unet.delete_adapters(["a"]))]
    # (on the CPU the ops run their eager references: the Triton interpreter would take minutes here, and what is
    # tested is which weights the projections read)
    with torch.no_grad(), contextlib.nullcontext() if GPU else sdkernels.use_backend("reference"):
        base = run()
        unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v"]), adapter_name="a")
        outs = {}
        for name, step in steps:
            step()
            outs[name] = run()
            with running_originals():
                expected = run()
            assert_close(outs[name], expected, torch.float32, reduction_size=320, what=name)
    assert_close(outs["merged"], outs["adapter"], torch.float32, reduction_size=320)
    assert not torch.allclose(outs["adapter"], base, atol=1e-3)  # the adapter did change the output
    assert_close(outs["deleted"], base, torch.float32, reduction_size=320)
    if flat:  # both ways ran flat graphs
        assert set(sdkernels.flat.installed(unet).flat) == {False, True}
    unpatch(unet)
    torch._dynamo.reset()
