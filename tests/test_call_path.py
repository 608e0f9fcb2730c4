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
from sdkernels._env import ENVIRON, env_key, getenv
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
    yield "add_layer_norm", sdkernels.add_layer_norm, (_rand(2, 3, 8), _rand(2, 3, 8), w, w)


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
    dispatch._last_backend.clear()
    with grad_mode():
        _run(name)
    assert op_path_calls == []
    assert dispatch.last_backend(name) not in (None, "reference")  # a backend of ours ran this very call


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


def test_env_key_in_environ_follows_the_environment(monkeypatch):
    """The hot paths ask ``KEY in ENVIRON`` before getenv (no call where a variable is unset)."""
    key = env_key("SDKERNELS_TEST_VARIABLE")
    monkeypatch.delenv("SDKERNELS_TEST_VARIABLE", raising=False)
    assert key not in ENVIRON
    monkeypatch.setenv("SDKERNELS_TEST_VARIABLE", "")
    assert key in ENVIRON
    os.environ.pop("SDKERNELS_TEST_VARIABLE")
    assert key not in ENVIRON


def test_forced_backend_from_the_environment_is_read_per_call(monkeypatch):
    h = _rand(2, 3, 16)
    monkeypatch.setenv("SDKERNELS_BACKEND", "geglu=reference")
    sdkernels.geglu(h)
    assert dispatch.last_backend("geglu") == "reference"
    monkeypatch.delenv("SDKERNELS_BACKEND")
    sdkernels.geglu(h)
    assert dispatch.last_backend("geglu") != "reference"


# ---- remembered selections (sdkernels.dispatch) ------------------------------------------------------------------

class _CountingRule:
    """A chooser that prefers one backend and counts how often dispatch asked it."""

    def __init__(self, choice, settled=None):
        self.choice, self.asked = choice, 0
        if settled is not None:
            self.settled = lambda *args: settled

    def __call__(self, *args):
        self.asked += 1
        return self.choice


def _fake_op(calls):
    op = dispatch.Op("fake_memo_op", reference=lambda x, n: calls.append("reference") or x + n)
    op.register(dispatch.Backend("even", lambda x, n: calls.append("even") or x + n,
                                 lambda x, n: None if x.shape[0] % 2 == 0 else "odd rows"))
    op.register(dispatch.Backend("any", lambda x, n: calls.append("any") or x + n, lambda x, n: None))
    return op


def test_a_selection_is_remembered_per_call_key():
    calls = []
    op = _fake_op(calls)
    op.chooser = rule = _CountingRule("any")
    x = _rand(4, 3)
    for _ in range(3):
        op(x, 1)
    assert calls == ["any"] * 3 and rule.asked == 1
    for key in [(_rand(5, 3), 1), (_rand(4, 3), 2), (_rand(4, 3).t(), 1), (_rand(4, 3).half(), 1),
                (_rand(4, 3).double(), 1), (_rand(4, 3), 1.0)]:  # a new shape, value, stride, dtype or type
        op(*key)
    assert rule.asked == 7
    op(x + 1, 1)  # other data, same key
    assert rule.asked == 7


def test_an_unaligned_view_is_selected_afresh():
    """Kernels with 16-byte vector loads (the CUDA GroupNorm, TMA) check the data pointer's alignment."""
    op = _fake_op([])
    op.chooser = rule = _CountingRule(None)
    base = _rand(4, 9)
    op(base[:, :8], 1)
    op(base[:, 1:], 1)  # same shape and strides, 4 bytes off
    assert rule.asked == 2


def test_nothing_is_remembered_while_a_backend_is_forced_or_a_chooser_is_unsettled(monkeypatch):
    calls = []
    op = _fake_op(calls)
    dispatch._ops[op.name] = op
    try:
        op.chooser = rule = _CountingRule("any", settled=False)
        x = _rand(4, 3)
        op(x, 1), op(x, 1)
        assert rule.asked == 2  # a measured chooser before it measured: its answer is provisional
        op.chooser = rule = _CountingRule("any", settled=True)
        op(x, 1), op(x, 1)
        assert rule.asked == 1
        with dispatch.use_backend("even", op=op.name):
            op(x, 1)
        monkeypatch.setenv("SDKERNELS_BACKEND", f"{op.name}=reference")
        op(x, 1)
        assert calls[-2:] == ["even", "reference"]
        monkeypatch.delenv("SDKERNELS_BACKEND")
        op(x, 1)
        assert calls[-1] == "any" and rule.asked == 1
    finally:
        dispatch._ops.pop(op.name)


def test_a_new_chooser_or_backend_forgets_the_selections():
    calls = []
    op = _fake_op(calls)
    x = _rand(4, 3)
    op(x, 1)
    op.chooser = _CountingRule("any")
    op(x, 1)
    op.register(dispatch.Backend("first_choice", lambda x, n: calls.append("new") or x + n, lambda x, n: None))
    op.chooser = None
    op(x, 1)
    op.backends.insert(0, op.backends.pop())  # a change behind dispatch's back: forget_selections() says so
    op.forget_selections()
    op(x, 1)
    assert calls == ["even", "any", "even", "new"]


def test_a_remembered_fallback_still_warns_once_per_reason():
    op = _fake_op([])
    op.backends = op.backends[:1]  # only "even"
    odd = _rand(3, 3)
    with pytest.warns(dispatch.SdkernelsFallbackWarning, match="odd rows"):
        op(odd, 1)
    dispatch._warned.clear()  # as a test that expects the warning again does
    with pytest.warns(dispatch.SdkernelsFallbackWarning, match="odd rows"):
        op(odd, 1)
    assert dispatch.last_backend(op.name) == dispatch.REFERENCE


def test_the_input_check_runs_where_the_call_key_is_new(monkeypatch):
    """An op checks its inputs in its dispatch where their call key misses: a remembered key passed the check, and an
    invalid input, never remembered, fails the same way at every call (the public function's and the op's own)."""
    from sdkernels.ops._common import SdkernelsInputError
    from sdkernels.ops.group_norm import _group_norm_op
    op = dispatch.ops()["group_norm"]
    checks = []
    check = op.check
    monkeypatch.setattr(op, "check", lambda *args: checks.append(args) or check(*args))
    op.forget_selections()
    x, w = _rand(2, 8, 4, 4), _rand(8)
    with torch.no_grad():
        for _ in range(3):
            sdkernels.group_norm(x, 4, w, w)
        assert len(checks) == 1
        messages = []
        for call in (lambda: sdkernels.group_norm(x, 3, w, w), lambda: _group_norm_op._init_fn(x, 3, w, w, 1e-5,
                                                                                                False, None, None)):
            for _ in range(2):
                with pytest.raises(SdkernelsInputError, match="must be a positive integer that divides") as info:
                    call()
                messages.append(str(info.value))
        assert len(set(messages)) == 1 and len(checks) == 5


def test_remembered_selections_give_the_first_calls_results():
    """Every op, called twice with one key: the second call (a remembered selection) computes what the first did."""
    for name, (fn, args) in CASES.items():
        first = fn(*args)
        backend = dispatch.last_backend(name)
        again = fn(*args)
        assert dispatch.last_backend(name) == backend, name
        as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
        for a, b in zip(as_tuple(first), as_tuple(again)):
            assert torch.equal(a, b), name
