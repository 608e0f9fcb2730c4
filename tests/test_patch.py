"""sdkernels.patch / unpatch on diffusers models: outputs match the unpatched model with our kernels really running,
unpatch restores every module exactly, patching twice changes nothing, the summary counts what it should, and
every path our kernels cannot take (autograd, autocast, odd inputs, hooks, unverified code) runs the original."""
import contextlib
import copy
import logging
import types
import warnings

import pytest
import torch
from torch import nn

import sdkernels
from sdkernels import dispatch, precompile, step_choice
from sdkernels.testing import randomize_weights as randomize
from sdkernels.patch import original_forward, patch, patched_by, summary, unpatch
from sdkernels.patch import patchers as registered_patchers
from sdkernels.patchers import group_norm as gn_patchers
from sdkernels.testing import assert_close, relative_error
from conftest import DEVICE, left_but_head_dims

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

ALL_PATCHERS = ("resnet_gn_silu", "norm_out_gn_silu", "group_norm")


# ---- models and inputs ----------------------------------------------------------------------------------------


GN_PATCHERS = ("resnet_gn_silu", "norm_out_gn_silu", "group_norm")


def gn_replaced(s):
    """The GroupNorm patchers' counts (other ops' patchers, registered too, are tested in their own files)."""
    return {k: v for k, v in s.replaced.items() if k in GN_PATCHERS}


def tiny_unet(groups=8):
    return randomize(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=groups,
        cross_attention_dim=32, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))


def unet_inputs(batch=1):
    return torch.randn(batch, 4, 8, 8), torch.tensor([10, 700][:batch]), torch.randn(batch, 5, 32)


def tiny_vae(groups=16):
    return randomize(AutoencoderKL(
        block_out_channels=(32, 64), norm_num_groups=groups, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def run_vae(vae, image):
    with torch.no_grad():
        return vae(image).sample  # encode (posterior mode), decode


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


class OpCalls(list):
    """The `silu` flag of every sdkernels.group_norm call the patchers make; ``backends``: which backend ran it."""

    def __init__(self):
        super().__init__()
        self.backends = []
        self.shifted = []


@pytest.fixture
def op_calls(monkeypatch):
    calls = OpCalls()
    real = gn_patchers.group_norm

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(kwargs["silu"])
        calls.backends.append(dispatch.last_backend("group_norm"))
        calls.shifted.append(kwargs.get("shift") is not None)
        return out

    monkeypatch.setattr(gn_patchers, "group_norm", counting)
    return calls


@pytest.fixture(autouse=True)
def _classes_untouched():
    """Patching must never touch a class."""
    before = (ResnetBlock2D.forward, nn.GroupNorm.forward, nn.SiLU.forward)
    yield
    assert (ResnetBlock2D.forward, nn.GroupNorm.forward, nn.SiLU.forward) == before


@pytest.fixture
def exact_fp32(no_tf32):
    """fp32 references without TF32 (cuDNN convolutions use it by default)."""
    yield


def on_device(model, *tensors):
    """The Triton tests run on DEVICE: CPU tensors under the interpreter here, CUDA tensors in the GPU lane."""
    return model.to(DEVICE), [None if t is None else t.to(DEVICE) for t in tensors]


def snapshot(model):
    """Every module's attributes, by identity, and its children (the summary patch() leaves aside)."""
    return {name: ({k: id(v) for k, v in vars(m).items() if k != "_sdkernels_summary"},
                   {k: id(v) for k, v in m._modules.items()})
            for name, m in model.named_modules()}


# ---- patched equals unpatched, on the Triton kernels ----------------------------------------------------------

def test_unet_matches_unpatched_on_triton_kernels(op_calls, exact_fp32):
    unet, inputs = on_device(tiny_unet(), *unet_inputs())
    expected = run_unet(unet, inputs)
    patch(unet)
    with sdkernels.use_backend("triton", op="group_norm", strict=True):  # a fallback would raise
        out = run_unet(unet, inputs)
    assert set(op_calls.backends) == {"triton"}
    # Every GroupNorm of this UNet runs once per forward, each through our op: fused with its SiLU or plain.
    assert len(op_calls) == count(unet, nn.GroupNorm) == 21
    assert sum(op_calls) == 2 * count(unet, ResnetBlock2D) + 1  # resnets' norm1 and norm2, and conv_norm_out
    print(f"unet: patched vs unpatched relative error {relative_error(out, expected):.2e}")
    assert_close(out, expected, torch.float32, reduction_size=4 * 64, what="patched tiny UNet")


def test_vae_matches_unpatched_on_triton_kernels(op_calls, exact_fp32):
    vae, (image,) = on_device(tiny_vae(), torch.randn(1, 3, 8, 8))
    expected = run_vae(vae, image)
    patch(vae)
    with sdkernels.use_backend("triton", op="group_norm", strict=True):
        out = run_vae(vae, image)
    assert len(op_calls) == count(vae, nn.GroupNorm) and set(op_calls.backends) == {"triton"}
    print(f"vae: patched vs unpatched relative error {relative_error(out, expected):.2e}")
    assert_close(out, expected, torch.float32, reduction_size=4 * 64, what="patched tiny VAE")


BLOCKS = {
    "default, down, shortcut": dict(in_channels=32, out_channels=64, temb_channels=16, down=True),
    "default, up, output_scale_factor": dict(in_channels=32, temb_channels=16, up=True, output_scale_factor=2.0),
    "skip_time_act": dict(in_channels=32, temb_channels=16, skip_time_act=True),
    "no temb (VAE: group)": dict(in_channels=32, temb_channels=None, time_embedding_norm="group"),
    "scale_shift": dict(in_channels=32, out_channels=64, temb_channels=16, time_embedding_norm="scale_shift"),
    "training, dropout, shortcut": dict(in_channels=32, out_channels=48, temb_channels=16, dropout=0.5),
}


@pytest.mark.parametrize("config", BLOCKS.values(), ids=BLOCKS.keys())
def test_resnet_block_branches(config, op_calls, exact_fp32, monkeypatch):
    epilogues = []
    epilogue = gn_patchers.add_bias_residual_
    monkeypatch.setattr(gn_patchers, "add_bias_residual_", lambda *a: epilogues.append(a) or epilogue(*a))
    block = randomize(ResnetBlock2D(groups=8, **config)).train(config.get("dropout", 0) > 0)
    block, (x, temb) = on_device(block, torch.randn(2, 32, 8, 8),
                                 torch.randn(2, 16) if config["temb_channels"] else None)
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout mask in both runs
        expected = block(x, temb)
        patch(block, channels_last=False)  # x stays NCHW: the block as diffusers runs it
        conv1_calls = []
        block.conv1.forward = lambda h, f=block.conv1.forward: conv1_calls.append(1) or f(h)
        torch.manual_seed(1)
        with sdkernels.use_backend("triton", op="group_norm", strict=True):
            out = block(x, temb)
    scale_shift = config.get("time_embedding_norm") == "scale_shift"
    # Unless the time embedding is scale_shift, conv1 runs without its bias, which joins the time embedding's add
    # (or, with no time embedding, stands alone) ...
    assert len(conv1_calls) == (1 if scale_shift else 0)
    # ... and norm2 adds it as it reads conv1's output
    assert op_calls.shifted == [False, not scale_shift]
    # conv2 runs without its bias: bias, shortcut and 1 / output_scale_factor are one pass over its output.
    assert len(epilogues) == 1 and epilogues[0][1] is block.conv2.bias
    assert epilogues[0][3] == 1 / config.get("output_scale_factor", 1.0)
    assert patched_by(block) == ("resnet_gn_silu",)
    # Under scale_shift only norm1 fuses with the SiLU; norm2 is then an ordinary patched GroupNorm.
    assert patched_by(block.norm2) == (("group_norm",) if scale_shift else ())
    assert op_calls == ([True, False] if scale_shift else [True, True])
    assert gn_replaced(summary(block)) == {"resnet_gn_silu": 1, "norm_out_gn_silu": 0, "group_norm": int(scale_shift)}
    assert_close(out, expected, torch.float32, reduction_size=8 * 64, what=str(config))


# ---- unpatch, idempotence, summary ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_unet, tiny_vae])
def test_unpatch_restores_exactly(make):
    model = make()
    run = (lambda m: run_unet(m, inputs)) if make is tiny_unet else (lambda m: run_vae(m, image))
    inputs, image = unet_inputs(batch=2), torch.randn(1, 3, 16, 16)
    before, state, expected = snapshot(model), model.state_dict(), run(model)
    # the weights patch() lays out channels_last get new storage, and back in unpatch() their old strides
    relaid = {k for k, p in state.items() if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)}
    assert relaid
    patch(model, channels_last=True)
    assert snapshot(model) != before
    # the projection patchers' groups (sdkernels.linear_groups) hold these weights as views of one buffer
    grouped = {k for k, p in model.state_dict().items() if p.untyped_storage().nbytes() > p.nbytes}
    assert grouped  # the UNet's time_emb_proj layers and conv1 biases, the VAE attention's to_q, to_k, to_v
    with sdkernels.use_backend("reference", op="group_norm"):
        run(model)
    assert unpatch(model) is model
    assert snapshot(model) == before  # same attributes and children, by identity: no instance forward left behind
    assert all("forward" not in vars(m) for m in model.modules())
    assert summary(model) is None
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert all(after[k].stride() == state[k].stride() for k in state)
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state if k not in grouped | relaid)
    assert all(after[k].untyped_storage().nbytes() == after[k].nbytes for k in grouped)  # memory of their own
    assert torch.equal(run(model), expected)  # bit for bit


@pytest.mark.parametrize("make", [tiny_unet, tiny_vae])
def test_channels_last_weights_and_their_layout_put_back(make):
    """patch() lays each 4-D weight out channels_last by default and keeps every Parameter object; patching again
    changes nothing more; with channels_last=False the layout stays; unpatch() gives back the original strides."""
    model = make()
    weights = {k: (p, p.stride()) for k, p in model.named_parameters() if p.dim() == 4}
    three_by_three = [p for p, _ in weights.values() if p.shape[-1] == 3]
    assert three_by_three and not any(p.is_contiguous(memory_format=torch.channels_last) for p in three_by_three)
    patch(model, channels_last=False)
    assert all(p.stride() == stride for p, stride in weights.values())
    unpatch(model)
    patch(model)  # channels_last is the default
    patch(model)
    params = dict(model.named_parameters())
    assert all(params[k] is p for k, (p, _) in weights.items())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p, _ in weights.values())
    unpatch(model)
    assert all(p.stride() == stride for p, stride in weights.values())


def test_patch_twice_changes_nothing():
    unet, inputs = tiny_unet(), unet_inputs()
    patch(unet)
    first, snap = summary(unet), snapshot(unet)
    with sdkernels.use_backend("reference", op="group_norm"):
        out1 = run_unet(unet, inputs)
        patch(unet)
        out2 = run_unet(unet, inputs)
    assert summary(unet).replaced == first.replaced and summary(unet).left == first.left
    assert snapshot(unet) == snap  # nothing re-bound
    # one StepChoice, not two, over one Precompiler, over diffusers' forward
    assert step_choice.installed(unet).original.owner is precompile.installed(unet)
    assert precompile.installed(unet).original.__func__ is type(unet).forward
    for m in unet.modules():  # no double wrapping: what a patched forward falls back to is diffusers' own
        if "forward" in vars(m) and m is not unet:
            assert original_forward(m).__func__ is type(m).forward
    assert torch.equal(out1, out2)
    unpatch(unet)
    assert all("forward" not in vars(m) for m in unet.modules())


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    stack, *inputs = stack_and_inputs()
    patch(stack)
    twin = copy.deepcopy(stack)
    assert patched_by(twin) == ("norm_out_gn_silu",) and original_forward(twin.res1).__self__ is twin.res1
    with torch.no_grad(), sdkernels.use_backend("reference", op="group_norm"):
        assert torch.equal(twin(*inputs), stack(*inputs))
    unpatch(twin)
    assert all("forward" not in vars(m) for m in twin.modules()) and isinstance(twin.conv_act, nn.SiLU)
    assert patched_by(stack) == ("norm_out_gn_silu",) and "forward" in vars(stack.res1)


@pytest.mark.parametrize("make", [tiny_unet, tiny_vae])
def test_summary_counts(make, caplog):
    model = make()
    with caplog.at_level(logging.INFO, logger="sdkernels"):
        patch(model)
    resnets, norms = count(model, ResnetBlock2D), count(model, nn.GroupNorm)
    pairs = sum(isinstance(m._modules.get("conv_norm_out"), nn.GroupNorm) for m in model.modules())
    assert pairs == (1 if make is tiny_unet else 2)  # UNet; VAE encoder and decoder
    s = summary(model)
    assert gn_replaced(s) == {"resnet_gn_silu": resnets, "norm_out_gn_silu": pairs,
                          "group_norm": norms - 2 * resnets - pairs}
    assert left_but_head_dims(s) == []  # the tiny models' head dims (4, 8) are not the kernels'
    assert "attention" in sdkernels.default_ops()
    assert s.replaced["attention"] + len(s.left) == count(model, Attention)
    assert [r.getMessage() for r in caplog.records if r.name == "sdkernels"] == [str(s)]
    assert str(s).startswith(f"sdkernels.patch {type(model).__name__}: replaced resnet_gn_silu {resnets}")


def test_pipeline_like_objects():
    unet, vae, text_encoder = tiny_unet(), tiny_vae(), nn.Sequential(nn.GroupNorm(2, 4))
    pipe = types.SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=object())
    assert patch(pipe) is pipe
    assert set(summary(pipe)) == {"unet (UNet2DConditionModel)", "vae (AutoencoderKL)"}
    assert patched_by(unet.conv_norm_out) == () and patched_by(unet) == ("norm_out_gn_silu", "shared_projections")
    assert patched_by(vae.decoder) == ("norm_out_gn_silu", "decoder_handoff")
    assert "forward" not in vars(text_encoder[0])  # only the diffusion models are patched
    unpatch(pipe)
    assert summary(pipe) == {"unet (UNet2DConditionModel)": None, "vae (AutoencoderKL)": None}

    with_components = types.SimpleNamespace(components={"unet": unet, "text_encoder": text_encoder})
    patch(with_components, ops=["group_norm"])
    assert summary(unet).replaced == {"group_norm": count(unet, nn.GroupNorm)}
    unpatch(with_components)
    assert all("forward" not in vars(m) for m in unet.modules())

    with pytest.raises(TypeError, match="expected an nn.Module or a diffusers pipeline"):
        patch(types.SimpleNamespace(text_encoder=text_encoder))


def test_ops_selects_patchers():
    unet = tiny_unet()
    before = snapshot(unet)
    patch(unet, ops=[], channels_last=False)
    assert summary(unet).replaced == {} and snapshot(unet) == before
    unpatch(unet)
    patch(unet, ops=["group_norm"])  # the plain op on every GroupNorm, nothing fused
    assert summary(unet).replaced == {"group_norm": count(unet, nn.GroupNorm)}
    assert all(patched_by(m) == () for m in unet.modules() if isinstance(m, ResnetBlock2D))
    unpatch(unet)
    with pytest.raises(ValueError, match="unknown ops.*known"):
        patch(unet, ops=["groupnorm"])
    names = [p.name for p in registered_patchers()]  # the opt-in resnet_block sits ahead of resnet_gn_silu
    assert [n for n in names if n in ALL_PATCHERS] == list(ALL_PATCHERS)


# ---- small models with every patcher's target ----------------------------------------------------------------

class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_norm_out = nn.GroupNorm(4, 8)
        self.conv_act = nn.SiLU()


class FusableHead(_Head):
    def forward(self, sample):
        if self.conv_norm_out:
            sample = self.conv_norm_out(sample)
            sample = self.conv_act(sample)
        return sample


class ActTwiceHead(_Head):
    def forward(self, sample):
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        sample = sample * 2
        sample = self.conv_act(sample)
        return sample


class ActElsewhereHead(_Head):
    def forward(self, sample):
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        return self.conv_act(sample * 2)


class NormAloneHead(_Head):
    def forward(self, sample):
        skip = self.conv_norm_out(sample)
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        return sample + skip


class Stack(_Head):
    """One target of each patcher, small enough to run everywhere: a default and a scale_shift ResnetBlock2D, a
    plain GroupNorm, and a conv_norm_out -> conv_act pair. Six GroupNorms, each run once."""

    def __init__(self):
        super().__init__()
        self.res1 = ResnetBlock2D(in_channels=8, temb_channels=16, groups=4)
        self.res2 = ResnetBlock2D(in_channels=8, temb_channels=16, groups=2, time_embedding_norm="scale_shift")
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, sample, temb):
        sample = self.res1(sample, temb)
        sample = self.res2(sample, temb)
        sample = self.norm(sample)
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        return sample


def stack_and_inputs():
    return randomize(Stack()), torch.randn(2, 8, 6, 5), torch.randn(2, 16)


def test_stack_is_patched_whole(op_calls, exact_fp32):
    stack, inputs = on_device(*stack_and_inputs())
    with torch.no_grad():
        expected = stack(*inputs)
        patch(stack)
        with sdkernels.use_backend("triton", op="group_norm", strict=True):
            out = stack(*inputs)
    assert gn_replaced(summary(stack)) == {"resnet_gn_silu": 2, "norm_out_gn_silu": 1, "group_norm": 2}
    assert op_calls == [True, True, True, False, False, True] and count(stack, nn.GroupNorm) == 6
    assert set(op_calls.backends) == {"triton"}
    assert_close(out, expected, torch.float32, reduction_size=4 * 30, what="stack")


# ---- where the original must run ------------------------------------------------------------------------------

def test_autograd_runs_the_original(op_calls):
    """Our ops have no backward: with grad enabled and anything requiring grad, the original path records it."""
    (reference, *inputs), (patched, *_) = stack_and_inputs(), stack_and_inputs()
    patch(patched, channels_last=False)  # the original path, bit for bit
    x = inputs[0].clone().requires_grad_()
    out_ref, out = reference(*inputs), patched(x, inputs[1])  # grad enabled, parameters require grad
    assert op_calls == [] and out.grad_fn is not None
    assert torch.equal(out, out_ref)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in patched.named_parameters():
        assert torch.equal(p.grad, ref_grads[name].grad), name
    # Only the input requires grad: still the original, or its gradient would be lost.
    patched.requires_grad_(False)
    assert patched(x, inputs[1]).grad_fn is not None and op_calls == []
    # Grad enabled but nothing requires grad: the fused path runs.
    assert patched(*inputs).grad_fn is None and len(op_calls) == 6


def test_autocast_runs_the_original(op_calls):
    stack, inputs = on_device(*stack_and_inputs())
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = stack(*inputs)
        patch(stack)
        out = stack(*inputs)
    assert op_calls == [] and torch.equal(out, expected)


def test_inputs_the_op_does_not_take_run_the_original(op_calls):
    norm = randomize(nn.GroupNorm(4, 8))
    x2d = torch.randn(3, 8)  # nn.GroupNorm takes (N, C); our op needs spatial dims
    with torch.no_grad():
        expected = norm(x2d)
        patch(norm)
        assert patched_by(norm) == ("group_norm",)
        assert torch.equal(norm(x2d), expected) and op_calls == []
        x = torch.randn(2, 8, 5, dtype=torch.float64)  # the op takes fp64 but no kernel does: its reference runs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sdkernels.SdkernelsFallbackWarning)
            out = norm.double()(x)
    assert op_calls == [False] and op_calls.backends == ["reference"]
    assert_close(out, torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps), what="fp64")


def test_hooks_keep_running(op_calls):
    stack, *inputs = stack_and_inputs()
    seen = []
    stack.res1.norm1.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        expected = stack(*inputs)
        patch(stack)
        seen.clear()
        with sdkernels.use_backend("reference", op="group_norm"):
            out = stack(*inputs)
    assert summary(stack).left == [("res1", "resnet_gn_silu", "norm1 has forward hooks, which the fused path "
                                    "would not call")]
    assert patched_by(stack.res1.norm1) == ("group_norm",)  # it gets the plain op, and its hook still runs
    assert len(seen) == 1 and op_calls == [False, False, True, False, False, True]  # res1 unfused
    assert_close(out, expected, torch.float32, reduction_size=4 * 30, what="hooked")


def test_forwards_replaced_by_others_are_left_alone():
    stack = randomize(Stack())
    theirs = types.MethodType(lambda self, x: nn.GroupNorm.forward(self, x), stack.norm)
    stack.norm.forward = theirs  # e.g. an accelerate offload hook
    patch(stack)
    assert summary(stack).left == [("norm", "group_norm", "the norm's forward is replaced on the instance (by "
                                    "another library, e.g. an accelerate offload hook)")]
    unpatch(stack)
    assert stack.norm.forward is theirs


def test_shared_activation_instance():
    """diffusers before 0.28 gave every model one shared nn.SiLU: fusing conv_act must not change the others."""
    stack, *inputs = stack_and_inputs()
    shared = stack.conv_act
    stack.res1.nonlinearity = stack.res2.nonlinearity = shared
    with torch.no_grad():
        expected = stack(*inputs)
        patch(stack)
        assert patched_by(stack) == ("norm_out_gn_silu",) and "forward" not in vars(shared)
        assert isinstance(stack.conv_act, nn.Identity) and stack.res1.nonlinearity is shared
        with sdkernels.use_backend("reference", op="group_norm"):
            out = stack(*inputs)
    assert_close(out, expected, torch.float32, reduction_size=4 * 30, what="shared SiLU")
    unpatch(stack)
    assert stack.conv_act is shared


@pytest.mark.parametrize("cls,reason", [
    (FusableHead, None),
    (ActTwiceHead, "ActTwiceHead.forward calls conv_act other than right after conv_norm_out"),
    (ActElsewhereHead, "uses self.conv_act (line 5 of the class) outside a conv_norm_out -> conv_act pair"),
    (NormAloneHead, "uses self.conv_norm_out (line 3 of the class) outside a conv_norm_out -> conv_act pair"),
])
def test_norm_out_pair_only_where_the_source_allows(cls, reason):
    head, x = randomize(cls()), torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        expected = head(x)
        patch(head)
        with sdkernels.use_backend("reference", op="group_norm"):
            out = head(x)
    s = summary(head)
    if reason is None:
        assert gn_replaced(s) == {"resnet_gn_silu": 0, "norm_out_gn_silu": 1, "group_norm": 0}
        assert left_but_head_dims(s) == []
    else:  # conv_norm_out gets the plain op instead
        assert gn_replaced(s) == {"resnet_gn_silu": 0, "norm_out_gn_silu": 0, "group_norm": 1}
        assert len(s.left) == 1 and reason in s.left[0][2]
    assert_close(out, expected, torch.float32, reduction_size=2 * 15, what=cls.__name__)
    unpatch(head)
    assert isinstance(head.conv_act, nn.SiLU)


def test_diffusers_heads_pass_the_source_check():
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.unets.unet_2d import UNet2DModel
    for cls in (UNet2DConditionModel, UNet2DModel, Encoder, Decoder):
        assert gn_patchers._why_not_pair_in_source(cls) is None, cls


def test_traces_whole_under_torch_compile(op_calls):
    """Dynamo traces the patched forwards and the op without a graph break (aot_eager: no C++ compiler needed)."""
    stack, *inputs = stack_and_inputs()
    with torch.no_grad():
        expected = stack(*inputs)
        patch(stack)
        torch._dynamo.reset()
        with sdkernels.use_backend("reference", op="group_norm"):
            out = torch.compile(stack, backend="aot_eager", fullgraph=True)(*inputs)
    assert len(op_calls) == 6
    assert_close(out, expected, torch.float32, reduction_size=4 * 30, what="compiled")


def test_package_entry_points():
    """sdkernels.patch / sdkernels.unpatch stay callable after the sdkernels.patch module has been imported."""
    norm = nn.GroupNorm(2, 4)
    for _ in range(2):
        assert sdkernels.patch(norm) is norm and patched_by(norm) == ("group_norm",)
        assert sdkernels.unpatch(norm) is norm and patched_by(norm) == ()


# ---- GPU: SD1.5 UNet and the SD VAE decoder in fp16 ------------------------------------------------------------

def fp16_errors(model, run, inputs, layout, backend):
    """Relative errors against the fp32 model of (the fp16 eager model, the fp16 patched model)."""
    with torch.no_grad():
        expected = run(model, inputs)
        model.half()
        inputs = [t.half() if t.is_floating_point() else t for t in inputs]
        if layout == "channels_last":
            model.to(memory_format=torch.channels_last)
            inputs = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs]
        eager = run(model, inputs)
        patch(model, channels_last=layout == "channels_last")  # "contiguous": the NCHW model as it is
        forced = sdkernels.use_backend(backend, op="group_norm", strict=True) if backend else contextlib.nullcontext()
        with forced:
            patched = run(model, inputs)
    return relative_error(eager, expected), relative_error(patched, expected)


GPU_CASES = [("triton", "contiguous"), ("triton", "channels_last"), (None, "channels_last")]  # None: dispatch picks


@pytest.mark.gpu
@pytest.mark.parametrize("backend,layout", GPU_CASES)
def test_sd15_unet_fp16_gpu(backend, layout, op_calls, exact_fp32):
    unet = randomize(UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)).cuda()
    inputs = [torch.randn(2, 4, 64, 64, device="cuda"), torch.tensor([10, 700], device="cuda"),
              torch.randn(2, 77, 768, device="cuda")]
    eager, patched = fp16_errors(unet, lambda m, i: m(*i).sample, inputs, layout, backend)
    print(f"SD1.5 UNet fp16, {backend or 'dispatch'}, {layout}: error vs fp32 eager {eager:.3e} patched "
          f"{patched:.3e}; backends {sorted(set(op_calls.backends))}; {summary(unet)}")
    assert left_but_head_dims(summary(unet)) == [] and summary(unet).replaced["resnet_gn_silu"] == 22
    assert len(op_calls) == count(unet, nn.GroupNorm) and "reference" not in op_calls.backends
    assert patched <= 2 * eager + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("backend,layout", GPU_CASES)
def test_sd_vae_decoder_fp16_gpu(backend, layout, op_calls, exact_fp32):
    vae = randomize(AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2))
    decoder = nn.Sequential(vae.post_quant_conv, vae.decoder).cuda()
    eager, patched = fp16_errors(decoder, lambda m, i: m(*i), [torch.randn(1, 4, 64, 64, device="cuda")], layout,
                                 backend)
    print(f"SD VAE decoder fp16 512x512, {backend or 'dispatch'}, {layout}: error vs fp32 eager {eager:.3e} "
          f"patched {patched:.3e}; backends {sorted(set(op_calls.backends))}; {summary(decoder)}")
    assert left_but_head_dims(summary(decoder)) == [] and summary(decoder).replaced["norm_out_gn_silu"] == 1
    assert len(op_calls) == count(decoder, nn.GroupNorm) and "reference" not in op_calls.backends
    assert patched <= 2 * eager + 1e-4


@pytest.mark.gpu
def test_compiled_patched_unet_gpu(exact_fp32):
    """The patched tiny UNet under inductor with fullgraph=True: no graph break, our op inside the graph."""
    unet = tiny_unet().cuda()
    inputs = [t.cuda() for t in unet_inputs(batch=2)]
    with torch.no_grad():
        expected = run_unet(unet, inputs)
        unet.half()
        inputs = [inputs[0].half(), inputs[1], inputs[2].half()]
        eager = relative_error(run_unet(unet, inputs), expected)
        patch(unet)
        torch._dynamo.reset()
        dispatch._last_backend.pop("group_norm", None)
        compiled = relative_error(run_unet(torch.compile(unet, fullgraph=True), inputs), expected)
    print(f"tiny UNet fp16: error vs fp32 eager {eager:.3e}, patched and compiled {compiled:.3e}")
    assert dispatch.last_backend("group_norm") in ("cuda", "triton")
    assert compiled <= 2 * eager + 1e-4


def test_resnet_block_adds_into_its_conv_outputs(no_tf32):
    """The patched ResnetBlock2D adds temb and the shortcut into the convs' own outputs (no new activation) where
    the sum keeps their dtype and shape, with eager's values; a temb of another dtype takes eager's promoting sum."""
    block = randomize(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=2,
                                    output_scale_factor=2.0)).to(DEVICE).eval()
    x, temb = torch.randn(2, 8, 5, 5, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    twin = copy.deepcopy(block)
    patch(block, ops=["resnet_gn_silu"])
    seen = []
    block.conv2.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad(), sdkernels.use_backend("reference"):
        out = block(x, temb)
        assert out is seen[0]  # conv2's output, the shortcut added and the scale divided in place
        torch.testing.assert_close(out, twin(x, temb), rtol=1e-5, atol=1e-5)
    add = gn_patchers._add_into_fresh
    fresh = torch.randn(2, 3, 4, 4).half()
    kept = fresh.clone()
    for other in (torch.randn(2, 3, 1, 1), torch.randn(2, 3, 4, 4), fresh.new_ones(1, 1, 2, 3, 4, 4)):
        result = add(fresh, other)  # promotes, or broadcasts past fresh's shape: eager's out-of-place sum
        assert torch.equal(fresh, kept) and torch.equal(result, kept + other) and result.dtype == (kept + other).dtype
    view = fresh[:, :2]
    assert add(view, view.clone()) is not view  # a view may alias what the caller keeps: never written


def test_resnet_blocks_share_one_silu_of_the_time_embedding(monkeypatch, exact_fp32):
    """Every ResNet block of a patched UNet applies SiLU to the same time embedding: computed once per forward,
    for each new embedding, and again after an in-place change to it."""
    silu = torch.nn.functional.silu
    unet, inputs = on_device(tiny_unet(), *unet_inputs())
    expected = run_unet(unet, inputs)
    patch(unet)
    seen = []
    monkeypatch.setattr(torch.nn.functional, "silu", lambda x, inplace=False: seen.append(x.shape) or silu(x))
    out = run_unet(unet, inputs)
    monkeypatch.undo()
    assert_close(out, expected, torch.float32, reduction_size=4 * 64, what="patched tiny UNet, shared SiLU")
    resnets = count(unet, ResnetBlock2D)
    temb_calls = [s for s in seen if len(s) == 2]  # (batch, channels): the time embedding's
    assert resnets > 1 and len(temb_calls) == 2  # the UNet's own time_embedding act and one shared by the blocks
    temb = torch.randn(1, 128, device=DEVICE)
    first = gn_patchers.shared_silu(nn.SiLU(), temb)
    assert gn_patchers.shared_silu(nn.SiLU(), temb) is first
    temb.mul_(2)
    assert_close(gn_patchers.shared_silu(nn.SiLU(), temb), silu(temb), torch.float32, what="after an in-place change")
    with torch.inference_mode():
        t = torch.randn(1, 8, device=DEVICE)
        assert gn_patchers.shared_silu(nn.SiLU(), t) is not gn_patchers.shared_silu(nn.SiLU(), t)  # not remembered


@pytest.mark.parametrize("make", [tiny_unet, tiny_vae])
def test_save_pretrained_while_patched(make, tmp_path):
    """diffusers' save_pretrained of a model patched with the default channels_last (NHWC weights, grouped
    projections) writes the same values a fresh model loads back."""
    model = make()
    patch(model)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
