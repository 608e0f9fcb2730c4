"""kernels/launch.py: a repeated Triton launch skips JITFunction.run, keyed by everything Triton specializes on.
CPU lane: the key, and the cached path's argument assembly against a stand-in for Triton's compiled kernel. GPU lane:
real kernels launched through the cache compute what Triton's own path computes."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from conftest import DEVICE
from sdkernels.kernels import launch
from sdkernels.kernels.launch import CachedLaunchJITFunction, cached_launch, signature_key


def _scale_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, ADD: tl.constexpr = True):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n) * alpha
    if ADD:
        v += tl.load(y_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, v, mask=offs < n)


def test_key_follows_what_triton_specializes_on(monkeypatch):
    monkeypatch.setattr(launch, "_device", lambda: 0)
    x = torch.randn(64, device=DEVICE)
    key = signature_key((x, 7, 1e-5, True, None), {"BLOCK": 32, "num_warps": 4})
    assert key == signature_key((torch.randn(64, device=DEVICE), 7, 1e-6, True, None),
                                {"BLOCK": 32, "num_warps": 4})  # another tensor, another float: one signature
    assert key != signature_key((x[1:], 7, 1e-5, True, None), {"BLOCK": 32, "num_warps": 4})  # 4-byte aligned
    assert key != signature_key((x.half(), 7, 1e-5, True, None), {"BLOCK": 32, "num_warps": 4})
    assert key != signature_key((x, 8, 1e-5, True, None), {"BLOCK": 32, "num_warps": 4})
    assert key != signature_key((x, 7, 1e-5, 1, None), {"BLOCK": 32, "num_warps": 4})  # True is not 1
    assert key != signature_key((x, 7, 1e-5, True, None), {"BLOCK": 64, "num_warps": 4})
    assert key != signature_key((x, 7, 1e-5, True, None), {"BLOCK": 32, "num_warps": 8})
    assert signature_key((x, object()), {}) is None  # a kind not keyed (a TMA descriptor, say): Triton's path
    # Subclasses (keyed after the exact types): an IntEnum by its class and value, a float subclass as a float
    import enum
    import numpy as np
    Mode = enum.IntEnum("Mode", "A B")
    assert signature_key((x, Mode.A), {}) != signature_key((x, 1), {})
    assert signature_key((x, Mode.A), {}) != signature_key((x, Mode.B), {})
    assert signature_key((x, np.float64(0.5)), {}) == signature_key((x, 0.25), {})


class _StandInCompiled:
    """What CachedLaunchJITFunction reads of Triton's CompiledKernel; records its launches."""
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


def test_cached_path_launches_with_the_arguments_triton_would_bind(monkeypatch):
    kernel = cached_launch(JITFunction(_scale_add))
    assert type(kernel) is CachedLaunchJITFunction
    compiled = _StandInCompiled()
    public = []
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, grid, warmup, **kw: public.append((a, kw)) or compiled)
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 99)
    monkeypatch.setattr(launch, "ENABLED", True)
    x, y, out = (torch.randn(40) for _ in range(3))
    assert kernel[(3,)](x, y, out, 40, 0.5, BLOCK=16, num_warps=2) is compiled  # first: Triton's path
    assert len(public) == 1 and compiled.launches == []
    x2 = torch.randn(40)
    assert kernel[(3, 2)](x2, y, out, 40, 2.0, BLOCK=16, num_warps=2) is compiled  # again: the cached path
    assert len(public) == 1
    (launched,) = compiled.launches
    assert launched[:8] == (3, 2, 1, 99, "function", "metadata", None, None)
    assert launched[8] is None and launched[9] is x2 and launched[10] is y and launched[11] is out
    assert launched[12:] == (40, 2.0, 16, True)  # ADD from its default, num_warps not a parameter
    kernel[(3,)](x2, y, out, 40, 2.0, BLOCK=16, ADD=False, num_warps=2)  # another signature: Triton's path
    kernel[lambda meta: (3,)](x2, y, out, 40, 2.0, BLOCK=16, num_warps=2)  # a callable grid: Triton's path
    assert len(public) == 3 and len(compiled.launches) == 1
    kernel[(3,)](x2, y, out, 40, 2.0, BLOCK=16, ADD=False, num_warps=2)  # that signature again: the cache
    assert len(public) == 3 and len(compiled.launches) == 2 and compiled.launches[1][-1] is False
    monkeypatch.setattr(launch, "ENABLED", False)
    kernel[(3,)](x2, y, out, 40, 2.0, BLOCK=16, num_warps=2)
    assert len(public) == 4 and len(compiled.launches) == 2
    monkeypatch.setattr(launch, "ENABLED", True)
    hooks = launch.knobs.runtime.launch_enter_hook
    monkeypatch.setattr(launch.knobs.runtime, "launch_enter_hook", print if hooks is None else type(hooks)())
    if hooks is not None:
        launch.knobs.runtime.launch_enter_hook.add(print)
    kernel[(3,)](x2, y, out, 40, 2.0, BLOCK=16, num_warps=2)  # a profiler's hook: Triton's path, which calls it
    assert len(public) == 5 and len(compiled.launches) == 2


def test_interpreter_kernels_are_left_alone():
    from triton.runtime.interpreter import InterpretedFunction
    interpreted = InterpretedFunction(_scale_add)
    assert cached_launch(interpreted) is interpreted and type(interpreted) is InterpretedFunction


@pytest.mark.gpu
def test_cached_launches_compute_what_triton_computes(monkeypatch):
    kernel = cached_launch(triton.jit(_scale_add))
    assert type(kernel) is CachedLaunchJITFunction
    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    # aligned, then 4-byte-aligned views (another specialization), each twice (the second from the cache)
    for start in (0, 0, 1, 1, 0):
        n = 1000 - start - 3
        out = torch.full((n,), float("nan"), device="cuda")
        kernel[(triton.cdiv(n, 128),)](x[start:], y[start:], out, n, 0.75, BLOCK=128)
        torch.testing.assert_close(out, x[start:start + n] * 0.75 + y[start:start + n], rtol=1e-6, atol=1e-6)
    assert len(kernel._launches) == 2
    # a real sdkernels kernel: group_norm's tile through the cache against the same launches on Triton's path
    import sdkernels
    h = torch.randn(2, 320, 17, 19, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, device="cuda", dtype=torch.float16), torch.randn(320, device="cuda", dtype=torch.float16)
    import sdkernels.kernels.group_norm as gn
    kernels = [k for k in vars(gn).values() if isinstance(k, CachedLaunchJITFunction)]
    for k in kernels:
        k.__dict__.pop("_launches", None)
    with sdkernels.use_backend("triton", op="group_norm", strict=True):  # the Triton kernels, not the CUDA one
        monkeypatch.setattr(launch, "ENABLED", False)
        expected = sdkernels.group_norm(h, 32, w, b, 1e-5, silu=True)
        assert not any(k.__dict__.get("_launches") for k in kernels)  # Triton's own path remembers nothing here
        monkeypatch.setattr(launch, "ENABLED", True)
        for _ in range(3):
            assert torch.equal(sdkernels.group_norm(h, 32, w, b, 1e-5, silu=True), expected)
    assert any(k.__dict__.get("_launches") for k in kernels)  # the calls went through the cache
