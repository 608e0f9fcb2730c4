"""Test lanes: on a machine without a GPU the Triton kernels run in Triton's interpreter at small sizes (the CPU
lane, CI); with a GPU every backend runs at SD sizes (the GPU lane). Tests marked ``gpu`` are skipped only when
there is no GPU, and the GPU lane's script fails if any of them was skipped."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SDKERNELS_POISON_OUTPUTS"] = "1"
# Hypothesis meets hundreds of matmul shapes: autotuning each would take minutes on a GPU. Tests of the autotuner
# turn it back on.
os.environ.setdefault("SDKERNELS_AUTOTUNE", "0")
# Tests choose their backends: patch()'s measured per-shape choice (sdkernels.tuning) could pick eager PyTorch for a
# tiny test shape and leave the kernel under test unrun. tests/test_tuning.py turns it back on.
os.environ.setdefault("SDKERNELS_TUNING", "0")
# sdkernels.precompile runs a patched model dry before its first call of each signature: tests that count op or
# module calls would count that call too. tests/test_precompile.py turns it back on (with two worker processes, not
# one per core: the GPU lane runs several test files at once).
os.environ.setdefault("SDKERNELS_PRECOMPILE", "0")
os.environ.setdefault("SDKERNELS_PRECOMPILE_JOBS", "2")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from sdkernels.testing import tf32_off  # noqa: E402

settings.register_profile("cpu", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.register_profile("gpu", deadline=None, max_examples=60, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("SDKERNELS_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "cpu"))

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def pytest_configure(config):
    """On a GPU, a failed CUDA-graph capture is an error in every test: the graphs layer falls back to eager with a
    warning, whose outputs are right, so a test comparing outputs would pass without ever replaying a graph (the
    low_memory VAE's graphs never captured and its test passed, until the fifteenth session). A filter line has no
    colons of its own (pytest splits it on them): "." stands for the message's."""
    if GPU:
        config.addinivalue_line(
            "filterwarnings", "error:sdkernels. .* runs without CUDA graphs. its CUDA graph capture failed")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_selections():
    """Ops remember their backend selection per input key (sdkernels.dispatch); tests patch the rules behind it."""
    from sdkernels import dispatch
    dispatch.forget_selections()
    yield
    dispatch.forget_selections()


@pytest.fixture
def no_tf32():
    """fp32 comparisons of whole models on a GPU: cuDNN's default TF32 convolutions would turn a 1e-7 difference in
    one op into one TF32 rounding step (5e-4) of the model's output."""
    with tf32_off():
        yield


def left_but_head_dims(summary):
    """What a patch left, but attention whose head dim the kernels do not take (the tiny test models' 4 and 8, the
    VAE's 512): that is left by design, with the reason in the summary."""
    return [entry for entry in summary.left if not (entry[1] == "attention" and "head dim" in entry[2])]


def check_left_alone(module, op: str):
    """``patch(module, ops=[op])`` patches nothing and lists nothing as left (the module is not a candidate)."""
    from sdkernels.patch import patch, summary
    patch(module, ops=[op])
    assert summary(module).replaced == {op: 0} and summary(module).left == []


def outputs_before_and_after_patch(module, x, op: str, grad: bool = False):
    """module(x) before and after ``patch(module, ops=[op])``, autograd on or off."""
    from sdkernels.patch import patch
    with torch.set_grad_enabled(grad):
        expected = module(x)
        patch(module, ops=[op])
        return expected, module(x)


def check_patch_twice_and_unpatch(module, x, op: str):
    """Patching a module again with ``op`` changes nothing, and unpatch puts its forward back: the same output, bit
    for bit, as before any patch."""
    from sdkernels.patch import patch, unpatch
    with torch.no_grad():
        expected = module(x)
        patch(module, ops=[op])
        bound = module.forward
        patch(module, ops=[op])
        assert module.forward == bound
        unpatch(module)
        assert "forward" not in module.__dict__ and torch.equal(module(x), expected)


# Seconds each test file takes in the CPU lane, to deal whole files out to shards (scripts/test.sh runs one pytest
# process per core): a stale figure only unbalances the shards.
with open(os.path.join(os.path.dirname(__file__), "durations.json")) as f:
    CPU_LANE_SECONDS = json.load(f)["cpu_lane"]


def shard_files(files, shards: int) -> list:
    """Whole files dealt out to ``shards`` lists, heaviest first, each to the lightest list so far."""
    loads = [[0.0, []] for _ in range(shards)]
    for f in sorted(files, key=lambda f: (-CPU_LANE_SECONDS.get(f, 5), f)):
        lightest = min(loads, key=lambda load: load[0])
        lightest[0] += CPU_LANE_SECONDS.get(f, 5)
        lightest[1].append(f)
    return [files for _, files in loads]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in the GPU lane)")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)
    shard = os.environ.get("SDKERNELS_TEST_SHARD")  # "i/n": this process runs the i-th of n shards of the files
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        mine = set(shard_files(sorted({item.path.stem for item in items}), count)[index])
        config.hook.pytest_deselected(items=[item for item in items if item.path.stem not in mine])
        items[:] = [item for item in items if item.path.stem in mine]
