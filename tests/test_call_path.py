"""How the ops' Python entry points reach their backends: straight through the op's dispatch where nothing needs to see
the call (torch.library.custom_op's layers cost more host time than a small kernel takes on the GPU), and through
torch.ops.sdkernels.* wherever something does: torch.compile, fake tensors, autograd, vmap, torch function modes.
Also the environment reads every call makes (sdkernels._env.getenv)."""
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import sdkernels
from sdkernels import dispatch
from sdkernels._env import getenv
from sdkernels.ops import conv3x3_fused, group_norm_stats
from conftest import DEVICE


def _rand(*shape):
    return torch.randn(*shape, device=DEVICE)


def _cases():
    """(op name, public entry point, inputs) for every op, at small sizes."""
    x = _rand(2, 8, 4, 4)
    w = _rand(8)
    q = _rand(2, 5, 2 * 64)
    yield "geglu", sdkernels.geglu, (_rand(2, 3, 16),)
    yield "gelu", sdkernels.gelu, (_rand(2, 3, 16),)
    yield "linear_geglu", sdkernels.linear_geglu, (_rand(2, 3, 8), _rand(16, 8), _rand(16))
    yield "group_norm", lambda *a: sdkernels.group_norm(*a, silu=True), (x, 4, w, w)
    yield "group_norm_stats", group_norm_stats, (x, 4)
    yield "flash_attention", lambda q, k, v: sdkernels.flash_attention(q, k, v, heads=2), (q, q, q)
    yield "conv3x3_fused", conv3x3_fused, (x, _rand(8, 8, 3, 3))


CASES = {name: (fn, args) for name, fn, args in _cases()}


class PassThrough(TorchFunctionMode):
    """A torch function mode that changes nothing (as a user's logging mode might be)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _CountingPacket:
    """Stands in for a torch.ops.sdkernels packet: counts calls, forwards everything else (torch looks overloads
    up on it)."""

    def __init__(self, real, name, calls):
        self._real, self._name, self._calls = real, name, calls

    def __call__(self, *args, **kwargs):
        self._calls.append(self._name)
        return self._real(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._real, attr)


@pytest.fixture
def op_path_calls(monkeypatch):
    """Names of the ops called through torch.ops.sdkernels.* (each still runs the real op)."""
    calls = []
    for name in CASES:
        monkeypatch.setattr(torch.ops.sdkernels, name, _CountingPacket(getattr(torch.ops.sdkernels, name), name, calls))
    return calls


def _map_tensors(f, args):
    return tuple(f(a) if isinstance(a, torch.Tensor) else a for a in args)


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _run(name, requires_grad=False):
    fn, args = CASES[name]
    return fn(*_map_tensors(lambda t: t.detach().requires_grad_(requires_grad), args))


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad, torch.inference_mode])
@pytest.mark.parametrize("name", CASES)
def test_eager_call_runs_the_dispatch_directly(name, grad_mode, op_path_calls):
    with grad_mode():
        _run(name)
    assert op_path_calls == []
    assert dispatch.last_backend(name) != "reference"


@pytest.mark.parametrize("name", CASES)
def test_direct_call_matches_the_op(name):
    fn, args = CASES[name]
    with torch.no_grad():
        direct = fn(*args)
        with PassThrough():  # any mode sends the call through torch.ops
            through_op = fn(*args)
    for a, b in zip(_outputs(direct), _outputs(through_op)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_autograd_takes_the_op(name, op_path_calls):
    """Inputs that require grad in grad mode go through the op, whose autograd layer says it has no backward."""
    out = _outputs(_run(name, requires_grad=True))[0]
    assert op_path_calls == [name]
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


@pytest.mark.parametrize("name", CASES)
def test_fake_tensors_take_the_op(name, op_path_calls):
    fn, args = CASES[name]
    with FakeTensorMode() as mode:
        fake = fn(*_map_tensors(mode.from_tensor, args))
    assert op_path_calls == [name]
    real = fn(*args)
    for f, r in zip(_outputs(fake), _outputs(real)):
        assert f.shape == r.shape and f.dtype == r.dtype and f.stride() == r.stride()


def test_vmap_takes_the_op(op_path_calls):
    h = _rand(3, 2, 16)
    torch.testing.assert_close(torch.func.vmap(sdkernels.geglu)(h), sdkernels.geglu(h))
    assert op_path_calls == ["geglu"]


def test_function_modes_take_the_op(op_path_calls):
    with PassThrough():
        _run("geglu")
    assert "geglu" in op_path_calls  # (the mode may see the op more than once)


@pytest.mark.parametrize("name", ["geglu", "linear_geglu", "group_norm", "flash_attention"])
def test_compiled_graph_calls_the_op(name):
    fn, args = CASES[name]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a), backend=capture, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), fn(*args))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any(f"sdkernels.{name}" in t for t in targets), targets


def test_getenv_follows_the_environment(monkeypatch):
    monkeypatch.delenv("SDKERNELS_TEST_VARIABLE", raising=False)
    assert getenv("SDKERNELS_TEST_VARIABLE") is None
    assert getenv("SDKERNELS_TEST_VARIABLE", "default") == "default"
    monkeypatch.setenv("SDKERNELS_TEST_VARIABLE", "1")
    assert getenv("SDKERNELS_TEST_VARIABLE", "default") == "1"
    os.environ["SDKERNELS_TEST_VARIABLE"] = "ü"
    assert getenv("SDKERNELS_TEST_VARIABLE") == "ü"
    monkeypatch.delenv("SDKERNELS_TEST_VARIABLE")
    assert getenv("SDKERNELS_TEST_VARIABLE") is None


def test_forced_backend_from_the_environment_is_read_per_call(monkeypatch):
    h = _rand(2, 3, 16)
    monkeypatch.setenv("SDKERNELS_BACKEND", "geglu=reference")
    sdkernels.geglu(h)
    assert dispatch.last_backend("geglu") == "reference"
    monkeypatch.delenv("SDKERNELS_BACKEND")
    sdkernels.geglu(h)
    assert dispatch.last_backend("geglu") != "reference"
