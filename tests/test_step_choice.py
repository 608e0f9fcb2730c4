"""sdkernels.step_choice: without CUDA graphs a patched UNet's step runs its patched or its original modules,
whichever measured faster for the input signature; patch.running_originals makes every patched module run the
original code."""
import pytest
import torch

from sdkernels import dispatch, step_choice, tuning
from sdkernels.patch import patch, running_originals, unpatch
from conftest import DEVICE

pytest.importorskip("diffusers")
from test_patch import run_unet, tiny_unet, unet_inputs  # noqa: E402


def _unet():
    unet = tiny_unet().to(DEVICE)
    inputs = [t.to(DEVICE) for t in unet_inputs(batch=2)]
    return unet, inputs


def _ops_run(fn) -> set:
    """The sdkernels ops (and their backends) that ran during fn()."""
    dispatch._last_backend.clear()
    result = fn()
    return result, {op: backend for op, backend in dispatch._last_backend.items()}


def test_running_originals_runs_the_unpatched_code(no_tf32):
    unet, inputs = _unet()
    expected = run_unet(unet, inputs)
    patch(unet, tune=False, channels_last=False)  # the originals bit for bit
    patched, ran = _ops_run(lambda: run_unet(unet, inputs))
    assert ran  # the patched modules call our ops
    with running_originals():
        out, ran = _ops_run(lambda: run_unet(unet, inputs))
    assert not ran and torch.equal(out, expected)


def test_patch_installs_a_step_choice_without_graphs_only():
    unet, _ = _unet()
    patch(unet, tune=False, channels_last=False)  # the originals bit for bit
    assert step_choice.installed(unet) is None  # nothing is measured without tune
    unpatch(unet)
    patch(unet)
    assert step_choice.installed(unet) is not None and "forward" in unet.__dict__
    assert step_choice.installed(unet).choices.alternate  # the two ways timed in alternation (host drift)
    unflat = step_choice.installed(unet).choices.name
    patch(unet, flat=True)  # flat steps weigh differently: never the unflattened step's stored choice
    assert step_choice.installed(unet).choices.name == unflat + "_flat"
    patch(unet.to(DEVICE), ops=[], cuda_graph=True)  # graphs replace it: replays are GPU time only
    assert step_choice.installed(unet) is None
    unpatch(unet)
    assert "forward" not in unet.__dict__ and step_choice.installed(unet) is None


@pytest.mark.parametrize("faster", [step_choice.PATCHED, step_choice.ORIGINALS])
def test_the_faster_way_runs_from_then_on(tmp_path, faster, no_tf32):
    unet, inputs = _unet()
    expected = run_unet(unet, inputs)
    patch(unet, ops=["group_norm"])  # one patcher: the Triton interpreter's time stays small
    timed = []

    def timer(fn):
        fn()
        timed.append(len(timed))
        return 1.0 if (len(timed) == 1) == (faster == step_choice.PATCHED) else 2.0  # ways: patched, originals

    choice = step_choice.installed(unet)
    choice.choices = tuning.MeasuredChoice("step_test", timer=timer, can_measure=lambda *args: True,
                                           path=tmp_path / "tuning.json")
    first = run_unet(unet, inputs)  # measures both ways, then runs the faster
    assert len(timed) == 2
    out, ran = _ops_run(lambda: run_unet(unet, inputs))
    assert len(timed) == 2  # measured once per signature
    assert bool(ran) == (faster == step_choice.PATCHED)
    for result in (first, out):
        torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    if faster == step_choice.ORIGINALS:  # (the cheaper case to run twice more)
        run_unet(unet, [t[:1] for t in inputs])  # a new signature: measured again
        assert len(timed) == 4
    unpatch(unet)
    assert "forward" not in unet.__dict__


def test_autograd_runs_the_patched_modules_unmeasured():
    unet, inputs = _unet()
    patch(unet)
    choice = step_choice.installed(unet)
    choice.choices = tuning.MeasuredChoice("step_test", timer=lambda fn: pytest.fail("measured"),
                                           can_measure=lambda *args: True)
    out = unet(*inputs).sample  # grad enabled: the patched modules run the originals themselves
    assert out.requires_grad
