"""sdkernels.patch(..., cuda_graph=True): graph keys, the model fingerprint that drops stale graphs, the eager
fallback and its one-time warning, unpatch and patching twice (CPU); graph replays equal to eager calls across
resolutions, batches, in-place weight changes, replaced parameters and peft LoRA adapters (GPU)."""
import warnings

import pytest
import torch
from torch import nn

from sdkernels import SdkernelsFallbackWarning, graphs
from sdkernels.patch import patch, unpatch
from sdkernels.testing import randomize_weights, relative_error
from conftest import DEVICE

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402


def tiny_unet():
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return randomize_weights(unet).to(DEVICE).eval().requires_grad_(False)


def unet_inputs(batch=1, size=8):
    return (torch.randn(batch, 4, size, size, device=DEVICE), torch.tensor(700.0, device=DEVICE),
            torch.randn(batch, 5, 32, device=DEVICE))


def eager(model, *args):
    """The model's output without its graphs: the reference a replay must equal."""
    g = graphs.graphed(model)
    g.open = False
    try:
        return model(*args).sample
    finally:
        g.open = True


# ---- CPU --------------------------------------------------------------------------------------------------------

def test_signature_key():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(1.0)
    key = graphs.signature_key(x, t, return_dict=False)
    assert key == graphs.signature_key(torch.randn(2, 4, 8, 8), torch.tensor(5.0), return_dict=False)
    assert len({key, graphs.signature_key(torch.randn(2, 4, 16, 16), t, return_dict=False),  # resolution
                graphs.signature_key(torch.randn(1, 4, 8, 8), t, return_dict=False),  # batch
                graphs.signature_key(x.half(), t, return_dict=False),
                graphs.signature_key(x.to(memory_format=torch.channels_last), t, return_dict=False),
                graphs.signature_key(x, t, return_dict=True),
                graphs.signature_key(x, t, return_dict=1),  # 1 == True, but a different argument
                graphs.signature_key(x, t),
                graphs.signature_key(x, t, return_dict=False, added_cond_kwargs={"text_embeds": x}),
                graphs.signature_key(x, t, return_dict=False, added_cond_kwargs={"time_ids": x})}) == 10
    assert graphs.signature_key(x, generator=torch.Generator()) is None  # would be frozen into the graph


def test_fingerprint_follows_what_graphs_depend_on():
    model = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 2))
    before = graphs.fingerprint(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)          # LoRA fuse by an in-place add
        model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})
    assert graphs.fingerprint(model) == before
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())  # replaced parameter
    assert graphs.fingerprint(model) != before
    before = graphs.fingerprint(model)
    model[2].weight.data = torch.zeros(2, 4)  # same Parameter, new memory (peft's safe merge does this)
    assert graphs.fingerprint(model) != before
    before = graphs.fingerprint(model)
    model.append(nn.Identity())
    assert graphs.fingerprint(model) != before
    before = graphs.fingerprint(model)
    model[1] = nn.GELU()  # a parameterless module swapped
    assert graphs.fingerprint(model) != before
    # peft's adapter state: set_adapters, merge and scale change Python attributes only
    lora = model[0].__dict__
    lora.update(_active_adapter=["a"], merged_adapters=[], _disable_adapters=False, scaling={"a": 1.0})
    before = graphs.fingerprint(model)
    for change in (lambda: lora["merged_adapters"].append("a"), lambda: lora["scaling"].update(a=0.5),
                   lambda: lora.update(_active_adapter=["b"]), lambda: lora.update(_disable_adapters=True)):
        change()
        assert graphs.fingerprint(model) != before
        before = graphs.fingerprint(model)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU fallback")
def test_eager_on_cpu_warns_once():
    unet, inputs = tiny_unet(), unet_inputs()
    with torch.no_grad():
        expected = unet(*inputs).sample
        patch(unet, ops=[], cuda_graph=True, channels_last=False)
        assert "forward" in unet.__dict__ and graphs.graphed(unet) is not None
        with pytest.warns(SdkernelsFallbackWarning, match="not on a CUDA GPU"):
            first = unet(*inputs).sample
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = unet(*inputs).sample
        with pytest.warns(SdkernelsFallbackWarning, match="timestep is a float"):
            unet(inputs[0], 700.0, inputs[2])
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert not graphs.graphed(unet).graphs


def test_unpatch_removes_the_wrapper():
    unet = tiny_unet()
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    pipe = {"unet": unet, "vae": vae}
    patch(pipe, ops=[], cuda_graph=True)
    assert graphs.graphed(vae).target is graphs.VAE_DECODE and "decode" in vae.__dict__
    assert graphs.graphed(unet).target is graphs.UNET
    unpatch(pipe)
    assert graphs.graphed(unet) is None and graphs.graphed(vae) is None
    assert "forward" not in unet.__dict__ and "decode" not in vae.__dict__


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphs", "step choice"])
def test_a_deep_copy_runs_its_own_weights(cuda_graph):
    """The wrapper on a patched UNet's forward (GraphedCall with graphs, StepChoice without) is copied with the
    model: the copy runs its own modules and weights, the original stays as it was, and the copy's forward keeps the
    UNet's signature (diffusers' pipelines inspect it)."""
    import copy
    import inspect
    from sdkernels import step_choice
    from sdkernels.shadow import ShadowMethod
    unet, inputs = tiny_unet(), unet_inputs()
    patch(unet, ops=[] if cuda_graph else None, cuda_graph=cuda_graph)  # (a step choice needs patched modules)
    twin = copy.deepcopy(unet)
    wrapper = graphs.graphed(twin) if cuda_graph else step_choice.installed(twin)
    assert wrapper.model is twin and twin.forward.owner is wrapper
    inner = wrapper.original  # through the Precompiler's shadow to the bound method
    while isinstance(inner, ShadowMethod):
        assert inner.owner.model is twin
        inner = inner.owner.original
    assert inner.__self__ is twin
    assert "encoder_hidden_states" in inspect.signature(twin.forward).parameters
    with torch.no_grad():
        expected = unet(*inputs).sample
        assert torch.equal(twin(*inputs).sample, expected)
        twin.conv_in.weight.mul_(2.0)
        assert relative_error(twin(*inputs).sample, expected) > 1e-3
        assert torch.equal(unet(*inputs).sample, expected)
    unpatch(twin)
    assert "forward" not in twin.__dict__ and "forward" in unet.__dict__
    unpatch(unet)


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphs", "no graphs"])
def test_a_patched_model_survives_torch_save_and_load(cuda_graph):
    """torch.save of a whole patched UNet (default ops) loads as a patched UNet computing the same output; its
    graphs are not saved (the loaded model captures its own), and unpatch restores the loaded model too."""
    import io
    from sdkernels.patch import patched_by
    unet, inputs = tiny_unet(), unet_inputs()
    with torch.no_grad():
        original = unet(*inputs).sample
        patch(unet, cuda_graph=cuda_graph)
        expected = unet(*inputs).sample
        unet(*inputs)  # a graph replayed by now, where there is a GPU
        buffer = io.BytesIO()
        torch.save(unet, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
        patched = {name: patched_by(m) for name, m in unet.named_modules() if patched_by(m)}
        assert {name: patched_by(m) for name, m in twin.named_modules() if patched_by(m)} == patched
        assert len(patched) > 20
        wrapper = graphs.graphed(twin)
        assert (wrapper is not None) == cuda_graph and (wrapper is None or wrapper.graphs == {})
        assert torch.equal(twin(*inputs).sample, expected)
        unpatch(twin)
        assert "forward" not in twin.__dict__ and relative_error(twin(*inputs).sample, original) < 1e-6
    unpatch(unet)


def test_patch_twice_and_graphs_added_later():
    unet, inputs = tiny_unet(), unet_inputs()
    with torch.no_grad():
        expected = unet(*inputs).sample
    patch(unet, ops=[], channels_last=False)
    assert graphs.graphed(unet) is None
    patch(unet, ops=[], cuda_graph=True, channels_last=False)
    wrapper = graphs.graphed(unet)
    patch(unet, ops=[], cuda_graph=True, channels_last=False)
    assert graphs.graphed(unet) is wrapper
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SdkernelsFallbackWarning)  # on the CPU: eager
        assert torch.equal(unet(*inputs).sample, expected)
    unpatch(unet)
    assert "forward" not in unet.__dict__


# ---- GPU --------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_replay_equals_unpatched_across_resolutions_and_batches():
    unet = tiny_unet()
    reference = tiny_unet()
    reference.load_state_dict(unet.state_dict())
    patch(unet, cuda_graph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SdkernelsFallbackWarning)  # every call here must get a graph
        for batch, size in [(1, 8), (2, 8), (1, 16), (2, 16), (1, 8)]:
            inputs = unet_inputs(batch, size)
            out = unet(*inputs).sample
            assert relative_error(out, reference(*inputs).sample) < 1e-3
            assert relative_error(out, eager(unet, *inputs)) < 1e-5  # the replay computes what its kernels do
    assert len(graphs.graphed(unet).graphs) == 4
    unpatch(unet)


@pytest.mark.gpu
def test_in_place_weight_change_is_followed_and_replacement_drops_graphs():
    unet, inputs = tiny_unet(), unet_inputs(2)
    patch(unet, cuda_graph=True)
    g = graphs.graphed(unet)
    with torch.no_grad():
        unet(*inputs)
        captured = dict(g.graphs)
        unet.conv_in.weight.mul_(1.5)  # in place: the graph reads it
        assert relative_error(unet(*inputs).sample, eager(unet, *inputs)) < 1e-5
        assert all(g.graphs[k] is v for k, v in captured.items())
        unet.conv_in.weight = nn.Parameter(unet.conv_in.weight * 0.5, requires_grad=False)
        assert relative_error(unet(*inputs).sample, eager(unet, *inputs)) < 1e-5
        assert not any(g.graphs.get(k) is v for k, v in captured.items())  # dropped and recaptured
    unpatch(unet)


@pytest.mark.gpu
def test_replay_is_launched_before_the_fingerprint_and_discarded_when_it_changed(monkeypatch):
    """A replay goes out before the model's fingerprint is compared (so the comparison overlaps the GPU's work); when
    the comparison finds a change that leaves every weight in place (a forward hook here), that replay's output is
    discarded and the call runs the changed model."""
    unet, inputs = tiny_unet(), unet_inputs(2)
    patch(unet, cuda_graph=True)
    events = []
    real_fingerprint, real_replay = graphs.fingerprint, graphs.GraphedCall._replay
    monkeypatch.setattr(graphs, "fingerprint", lambda m: events.append("fingerprint") or real_fingerprint(m))
    monkeypatch.setattr(graphs.GraphedCall, "_replay",
                        staticmethod(lambda *a: events.append("replay") or real_replay(*a)))
    with torch.no_grad():
        unet(*inputs)  # captures
        events.clear()
        out = unet(*inputs).sample
        assert events == ["replay", "fingerprint"]
        assert relative_error(out, eager(unet, *inputs)) < 1e-5
        unet.conv_in.register_forward_hook(lambda module, args, output: output * 2)
        events.clear()
        out = unet(*inputs).sample
        assert events[:3] == ["replay", "fingerprint", "fingerprint"]  # replayed, found changed, checked again
        assert relative_error(out, eager(unet, *inputs)) < 1e-5
        unet.conv_in.weight = nn.Parameter(unet.conv_in.weight * 0.5, requires_grad=False)  # freed: no replay first
        events.clear()
        out = unet(*inputs).sample
        assert events[0] == "fingerprint"
        assert relative_error(out, eager(unet, *inputs)) < 1e-5
    unpatch(unet)


@pytest.mark.gpu
def test_peft_lora_after_patching():
    peft = pytest.importorskip("peft")
    unet, inputs = tiny_unet(), unet_inputs(2)
    patch(unet, cuda_graph=True)
    with torch.no_grad():
        base = unet(*inputs).sample
        for name in ("a", "b"):
            unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
        steps = [lambda: unet.set_adapters(["a"]), lambda: unet.set_adapters(["b"], [0.5]),
                 lambda: unet.set_adapters(["a", "b"], [1.0, 0.3]), unet.disable_adapters, unet.enable_adapters,
                 lambda: unet.delete_adapters(["a", "b"])]
        outs = []
        for step in steps:
            step()
            out = unet(*inputs).sample
            assert relative_error(out, eager(unet, *inputs)) < 1e-5, step
            outs.append(out)
    assert relative_error(outs[0], base) > 1e-3  # the adapters did change the output
    assert relative_error(outs[-1], base) < 1e-5
    unpatch(unet)
