"""sdkernels.replay: a flat graph's op call recorded once (aten ops, cached Triton launches, extension calls) and
replayed with later calls' tensors, computing what the implementation computes; calls it cannot record completely
(outside tensors, value-dependent ops, fresh dispatch selections, Triton's own launch path) keep running the
implementation; replays stop where a backend is forced."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import _disable_current_modes

from sdkernels import _ext, dispatch, flat, replay
from sdkernels.replay import RecordedCall
from sdkernels.testing import assert_close

from conftest import DEVICE

importlib.import_module("sdkernels.linear_groups")  # defines sdkernels::linear_group_all


@pytest.fixture
def replaying(monkeypatch):
    monkeypatch.setattr(replay, "active", True)


def counted(fn):
    """fn, counting its calls in .calls."""
    def wrapper(*args):
        wrapper.calls += 1
        return fn(*args)
    wrapper.calls = 0
    return wrapper


def recorded(call) -> bool:
    return any(p.__class__ is tuple for p in call.programs.values())


def silu_scaled(x, w, eps):
    out = torch.empty_like(x)
    out.copy_(F.silu(x * w[:, None]) + eps)
    return out.view(-1)[: x.numel()].view(x.shape)  # a view of the allocation: replayed as the same view


def test_a_recorded_call_replays_with_each_calls_tensors(replaying):
    implementation = counted(silu_scaled)
    call = RecordedCall("sdkernels::test_silu", implementation)
    results = []
    for _ in range(4):
        x, w = torch.randn(3, 5), torch.randn(3)
        out = call(x, w, 0.5)
        results.append((out, silu_scaled(x, w, 0.5)))
    assert implementation.calls == 1 and recorded(call)  # recorded at the first call, replayed after
    for out, expected in results:  # each replay its own output, never overwritten by a later call
        assert_close(out, expected, torch.float32, reduction_size=1, what="replayed")
    assert len({o.data_ptr() for o, _ in results}) == 4


def test_without_replay_active_the_implementation_runs(monkeypatch):
    implementation = counted(silu_scaled)
    call = RecordedCall("sdkernels::test_silu", implementation)
    x, w = torch.randn(3, 5), torch.randn(3)
    for _ in range(2):
        call(x, w, 0.5)
    assert implementation.calls == 2 and call.programs == {}


_CACHED = torch.randn(5)


@pytest.mark.parametrize("body, why", [
    (lambda x: x + _CACHED, "outside the call's arguments"),                # a cache kept across calls
    (lambda x: x * float(x.sum()), "depends on tensor values"),             # a host read of a value
    (lambda x: x[x > 0].sum() + x, "depends on tensor values"),             # a data-dependent shape
    (lambda x: x * x.sum().is_nonzero(), "depends on tensor values"),      # a bool read from a value
    (lambda x: [x + 1, len(x)], "returned"),                                 # not a tensor
])
def test_calls_it_cannot_replay_run_their_implementation(replaying, body, why):
    implementation = counted(body)
    call = RecordedCall("sdkernels::test_unrecordable", implementation)
    for attempt in range(replay.MAX_ATTEMPTS + 2):
        x = torch.randn(4, 5)
        out = call(x)
        expected = body(x)
        if isinstance(out, list):
            out, expected = out[0], expected[0]
        assert torch.equal(out, expected)
    assert implementation.calls == replay.MAX_ATTEMPTS + 2
    assert not recorded(call) and why in call.why_not
    assert call.programs[next(iter(call.programs))] == replay.MAX_ATTEMPTS  # it stopped trying


@pytest.mark.parametrize("result, spoils", [(lambda t: (t, 7, None), None), (lambda t: (t, True), "bool"),
                                             (lambda t: 2.5, "float")])
def test_a_step_may_return_sizes_but_not_values(result, spoils):
    """Besides tensors, an aten op's results may be sizes (SDPA's inner ops return sequence lengths to its C++
    code), never a bool or float read from a tensor."""
    recording = replay._Recording([])
    recording.keep(result(torch.randn(2)))
    assert recording.spoiled is None if spoils is None else spoils in recording.spoiled


def test_a_fresh_dispatch_selection_is_not_recorded_but_a_remembered_one_is(replaying):
    op = dispatch.Op("replay_test", reference=lambda x: x * 2)
    op.register(dispatch.Backend("doubler", lambda x: x + x, lambda x: None))
    call = RecordedCall("sdkernels::replay_test", lambda x: op(x))
    x = torch.randn(6)
    assert torch.equal(call(x), 2 * x)
    assert not recorded(call) and "selected afresh" in call.why_not
    call(torch.randn(6))
    assert recorded(call)
    y = torch.randn(6)
    assert torch.equal(call(y), y + y)


def test_recordings_are_kept_per_alignment(replaying):
    """What dynamo does not guard, the 16-byte alignment of a call's tensors, keys the recordings (a backend or a
    Triton specialization may differ with it)."""
    def by_alignment(x):
        return x + (1 if x.data_ptr() % 16 == 0 else 2)
    call = RecordedCall("sdkernels::test_alignment", by_alignment)
    base = torch.randn(2, 9)
    for _ in range(2):
        aligned, shifted = base[:, :8].clone(), torch.randn(9)[1:]  # 4 bytes past an aligned allocation
        assert torch.equal(call(aligned), aligned + 1) and torch.equal(call(shifted), shifted + 2)
    assert sum(p.__class__ is tuple for p in call.programs.values()) == 2


def test_extension_calls_and_triton_launches_are_steps(replaying, monkeypatch):
    """The two doors besides aten: an extension function (through sdkernels._ext's checked wrapper) and a cached
    Triton launch (kernels.launch tells the recorder its compiled kernel's run, grid and arguments)."""
    launch = pytest.importorskip("sdkernels.kernels.launch")
    monkeypatch.setattr(launch, "_stream", lambda device: "stream")

    class Extension:
        @staticmethod
        def scale_into(x, out, factor):
            torch.mul(x, factor, out=out)  # (aten inside the extension call: not a step of its own)
            return ""

    checked = _ext._Checked(Extension)
    launches = []

    def kernel_run(grid_x, grid_y, grid_z, stream, x, out, shift):  # stands in for CompiledKernel.run
        launches.append((grid_x, stream))
        with _disable_current_modes():  # (a kernel's work, unseen by the recorder as a GPU kernel's is)
            out.add_(shift)

    def implementation(x):
        out = torch.empty_like(x)
        checked.scale_into(x, out, 3.0)
        kernel_run(7, 1, 1, "stream", x, out, 0.5)
        if launch.recorder is not None:
            launch.recorder.launched(kernel_run, (7, 1, 1), 0, (x, out, 0.5))
        return out

    call = RecordedCall("sdkernels::test_doors", implementation)
    for _ in range(3):
        x = torch.randn(5)
        assert_close(call(x), 3 * x + 0.5, torch.float32, reduction_size=1, what="extension + launch")
    assert recorded(call) and len(launches) == 3 and launches[-1] == (7, "stream")


def test_triton_launches_outside_the_cached_path_spoil_the_recording(replaying):
    """Triton's own JITFunction.run (a first launch, an uncached kernel) and the interpreter's are not seen by the
    recorder: a call launching through them is never replayed, and both are put back afterwards."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    for cls in (JITFunction, InterpretedFunction):
        real = cls.__dict__["run"]
        cls.run = lambda self, *args, **kwargs: None  # a launch that does nothing here

        def implementation(x, cls=cls):
            cls.run(None, grid=(1,), warmup=False)  # what kernel[grid](...) comes down to
            return x + 1
        try:
            stand_in = cls.__dict__["run"]
            call = RecordedCall("sdkernels::test_triton", implementation)
            for _ in range(2):
                x = torch.randn(3)
                assert torch.equal(call(x), x + 1)
            assert not recorded(call) and "Triton launch" in call.why_not
            assert cls.__dict__["run"] is stand_in
        finally:
            cls.run = real


def test_replays_stop_where_a_backend_is_forced(monkeypatch):
    assert replay.allowed() is (replay._launch_module() is None or replay._launch_module().ENABLED)
    with dispatch.use_backend("reference"):
        assert not replay.allowed()
    monkeypatch.setenv("SDKERNELS_REPLAY", "0")
    assert not replay.allowed()


def test_flat_graphs_record_their_ops_and_lose_idle_dropouts_and_repeats():
    class Block(torch.nn.Module):
        def forward(self, x, temb, w):
            x = F.dropout(x, 0.1, training=False)
            h = torch.ops.sdkernels.group_norm(x, 2, None, None, 1e-5, True, None, None)
            s = F.silu(temb)
            a = torch.ops.sdkernels.linear_group_all(s, w, None, None)[:, :4]
            b = torch.ops.sdkernels.linear_group_all(F.silu(temb), w, None, None)[:, 4:]
            return h + (a + b)[:, :, None, None]

    graphs = []

    def backend(gm, example_inputs):
        flat.flat_backend(gm, example_inputs)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        x, temb, w = torch.randn(2, 4, 3, 3), torch.randn(2, 6), torch.randn(8, 6)
        out = torch.compile(Block(), backend=backend, dynamic=False)(x, temb, w)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out, Block()(x, temb, w), atol=1e-5)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    recorded_ops = [t.op_name for t in targets if isinstance(t, RecordedCall)]
    assert recorded_ops == ["sdkernels::group_norm", "sdkernels::linear_group_all"]
    assert F.dropout not in targets and targets.count(F.silu) == 1


@pytest.mark.gpu
def test_flat_unet_replays_its_ops_on_the_gpu(monkeypatch, no_tf32):
    """On a GPU the op nodes' calls record (Triton and extension launches) and the flat step with replays computes
    what the implementations compute."""
    import gc
    pytest.importorskip("diffusers")
    from sdkernels.patch import patch
    from test_patch import on_device, run_unet, tiny_unet, unet_inputs
    monkeypatch.delenv("SDKERNELS_POISON_OUTPUTS", raising=False)  # (with it the recordings poison too; off to
    torch._dynamo.reset()                                           # compare two runs' outputs bit for bit)
    unet, inputs = on_device(tiny_unet(), *unet_inputs(batch=2))
    patch(unet, flat=True, tune=False)
    run_unet(unet, inputs), run_unet(unet, inputs)  # eager, then traced (and recorded)
    calls = [o for o in gc.get_objects() if type(o) is RecordedCall]
    assert calls and all(recorded(c) for c in calls), [(c.op_name, c.why_not) for c in calls if not recorded(c)]
    fresh = [torch.randn_like(inputs[0]), inputs[1], torch.randn_like(inputs[2])]
    replayed = run_unet(unet, fresh)
    monkeypatch.setenv("SDKERNELS_REPLAY", "0")
    implemented = run_unet(unet, fresh)
    assert DEVICE == "cuda"
    assert_close(replayed, implemented, torch.float32, reduction_size=1, what="replayed against implemented")
    torch._dynamo.reset()


@pytest.mark.gpu
def test_sdpa_records_as_its_inner_ops_on_the_gpu(replaying):
    """F.scaled_dot_product_attention reaches the recorder as the backend op SDPA chose (flash, efficient, cuDNN),
    whose results include sequence lengths (ints): recorded, and replayed with each call's q, k and v."""
    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    call = RecordedCall("sdkernels::test_sdpa", attention)
    for _ in range(3):
        q, k, v = (torch.randn(2, 8, 256, 40, device="cuda", dtype=torch.float16) for _ in range(3))
        assert torch.equal(call(q, k, v), attention(q, k, v))
    assert recorded(call), call.why_not
