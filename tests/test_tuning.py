"""The measured chooser (sdkernels.tuning): it picks the fastest of the backends that can run an input and the
reference, measures each signature once, remembers it on disk, and measures nothing where it must not."""
import json

import pytest
import torch

import sdkernels
from sdkernels import dispatch, tuning

from conftest import DEVICE, GPU

OP = "tuning_test_op"


@pytest.fixture
def fake_op():
    """An op with backends "fast" (only for 2-D inputs), "slow" and the reference; each run returns its name."""
    op = dispatch.define(OP, lambda x: "reference")
    op.register(dispatch.Backend("fast", lambda x: "fast", lambda x: None if x.dim() == 2 else "2-D only"))
    op.register(dispatch.Backend("slow", lambda x: "slow", lambda x: None))
    yield op
    dispatch._ops.pop(OP)


def fake_timer(times, timed):
    """A timer that runs the call once and reports the given time of whoever ran."""
    def timer(fn):
        name = fn()
        timed.append(name)
        return times[name]
    return timer


def chooser_for(tmp_path, times, timed, **kwargs):
    return tuning.MeasuredChooser(OP, timer=fake_timer(times, timed), can_measure=lambda *a: True,
                                  path=tmp_path / "tuning.json", **kwargs)


def test_picks_the_fastest_runnable_backend_and_measures_once(fake_op, tmp_path):
    timed = []
    choose = chooser_for(tmp_path, {"fast": 3.0, "slow": 1.0, "reference": 2.0}, timed)
    x = torch.randn(4, 5)
    assert choose(x) == "slow"
    assert sorted(timed) == ["fast", "reference", "slow"]
    assert choose(x) == "slow" and len(timed) == 3  # remembered
    timed.clear()
    assert choose(torch.randn(2, 3, 4)) == "slow"  # "fast" cannot run 3-D: it is not timed
    assert sorted(timed) == ["reference", "slow"]


def test_a_backend_not_measured_is_never_timed_but_runs_where_forced(fake_op, tmp_path):
    fake_op.register(dispatch.Backend("unmeasured", lambda x: "unmeasured", lambda x: None, measured=False))
    timed = []
    fake_op.chooser = chooser_for(tmp_path, {"fast": 3.0, "slow": 2.0, "reference": 4.0, "unmeasured": 0.1}, timed)
    assert fake_op(torch.randn(4, 5)) == "slow" and sorted(timed) == ["fast", "reference", "slow"]
    with dispatch.use_backend("unmeasured", op=OP, strict=True):
        assert fake_op(torch.randn(4, 5)) == "unmeasured"


def test_backends_timed_and_not_chosen_let_go_of_what_they_kept(fake_op, tmp_path):
    released = []
    fake_op.register(dispatch.Backend("keeper", lambda x: "keeper", lambda x: None,
                                      release=lambda x: released.append(("keeper", tuple(x.shape)))))
    fake_op.register(dispatch.Backend("winner", lambda x: "winner", lambda x: None,
                                      release=lambda x: released.append(("winner", tuple(x.shape)))))
    choose = chooser_for(tmp_path, {"fast": 3.0, "slow": 2.0, "reference": 4.0, "keeper": 5.0, "winner": 1.0}, [])
    assert choose(torch.randn(4, 5)) == "winner" and released == [("keeper", (4, 5))]
    assert choose(torch.randn(4, 5)) == "winner" and released == [("keeper", (4, 5))]  # remembered: nothing timed
    with tuning.dry_run():  # precompile's dry call runs every way once: the same letting go
        assert choose(torch.randn(3, 5)) == "fast" and released[1:] == [("keeper", (3, 5)), ("winner", (3, 5))]


def test_reference_choice_runs_the_reference_without_a_warning(fake_op, tmp_path, recwarn):
    fake_op.chooser = chooser_for(tmp_path, {"fast": 3.0, "slow": 4.0, "reference": 1.0}, [])
    assert fake_op(torch.randn(4, 5)) == "reference"
    assert dispatch.last_backend(OP) == "reference"
    assert not [w for w in recwarn if issubclass(w.category, dispatch.SdkernelsFallbackWarning)]
    with dispatch.use_backend("fast", op=OP, strict=True):  # forcing still wins over any choice
        assert fake_op(torch.randn(4, 5)) == "fast"


def test_choices_persist_across_processes(fake_op, tmp_path):
    times = {"fast": 1.0, "slow": 2.0, "reference": 3.0}
    chooser_for(tmp_path, times, [])(torch.randn(4, 5))
    stored = json.loads((tmp_path / "tuning.json").read_text())[OP]
    assert stored[0]["choice"] == "fast" and stored[0]["ms"]["slow"] == 2.0
    timed = []
    again = chooser_for(tmp_path, times, timed)
    assert again(torch.randn(4, 5)) == "fast" and timed == []  # read back, not measured
    assert again(torch.randn(4, 6)) == "fast" and len(timed) == 3  # a new signature is measured


def test_a_corrupt_cache_file_is_measured_over(fake_op, tmp_path):
    (tmp_path / "tuning.json").write_text("{not json")
    timed = []
    assert chooser_for(tmp_path, {"fast": 1.0, "slow": 2.0, "reference": 3.0}, timed)(torch.randn(4, 5)) == "fast"
    assert len(timed) == 3 and json.loads((tmp_path / "tuning.json").read_text())[OP]


def test_without_measuring_the_rule_decides(fake_op, tmp_path):
    timed = []
    choose = tuning.MeasuredChooser(OP, rule=lambda x: "slow", timer=fake_timer({}, timed),
                                    can_measure=lambda *a: False, path=tmp_path / "t.json")
    assert choose(torch.randn(4, 5)) == "slow" and timed == []
    no_rule = tuning.MeasuredChooser(OP, can_measure=lambda *a: False, path=tmp_path / "t.json")
    assert no_rule(torch.randn(4, 5)) is None


def test_each_objective_has_its_own_choice(fake_op, tmp_path):
    """A graph replay pays GPU time only, a plain call its launch too: the same signature is measured for each, and
    each keeps its own winner."""
    timed = []
    per_objective = {"call": {"fast": 3.0, "slow": 2.0, "reference": 1.0},
                     "device": {"fast": 1.0, "slow": 2.0, "reference": 3.0}}

    def timer(fn):
        timed.append(fn())
        return per_objective[tuning.objective()][timed[-1]]

    choose = tuning.MeasuredChooser(OP, timer=timer, can_measure=lambda *a: True, path=tmp_path / "t.json")
    x = torch.randn(4, 5)
    assert choose(x) == "reference" and len(timed) == 3
    with tuning.optimizing_for("device"):
        assert choose(x) == "fast" and len(timed) == 6
        assert choose(x) == "fast" and len(timed) == 6
    assert tuning.objective() == "call" and choose(x) == "reference" and len(timed) == 6
    with pytest.raises(ValueError, match="unknown objective"):
        with tuning.optimizing_for("wall"):
            pass


@pytest.mark.gpu
def test_device_time_leaves_the_host_out():
    """A call that spends 10 ms on the host before a tiny kernel: an isolated call takes those 10 ms, its GPU time
    is microseconds. Wide margins: the GPU lane runs test files in parallel processes that share the GPU, and their
    kernels can delay either event by a time slice."""
    import time
    x = torch.randn(1024, device=DEVICE)

    def slow_host():
        time.sleep(0.010)
        x.add_(1.0)

    assert tuning.cuda_event_ms(slow_host) > 5.0
    assert tuning.device_ms(slow_host) < 2.0
    with tuning.optimizing_for("device"):
        assert tuning.measure_ms(slow_host) < 2.0


@pytest.mark.gpu
def test_device_time_starts_from_a_cold_l2():
    """Reading 24 MiB, which fits the L2 of an H100/H200, back to back: from L2 it could beat the HBM; device_ms
    flushes the L2 before each call, so the reads come from HBM, slower than 6 TB/s (above these cards' HBM)."""
    x = torch.randn(6 << 20, device=DEVICE)
    floor_ms = x.numel() * 4 / 6e12 * 1e3
    assert tuning.device_ms(lambda: x.sum()) > floor_ms


def test_alternating_times_take_the_ways_in_turn(monkeypatch, tmp_path):
    """alternating_ms times one call of each way per round, the order reversed every other round (a drifting host
    then slows both ways alike), and takes each way's median; a MeasuredChoice with alternate=True and the default
    timer measures that way (the step choice's: tests/test_step_choice.py)."""
    calls, clock = [], iter(range(100))
    monkeypatch.setattr(tuning, "_event_ms", lambda run: (run(), float(next(clock)))[1])
    ways = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = tuning.alternating_ms(ways)
    warm = tuning.WARMUP_CALLS
    timed = calls[2 * warm:]
    assert calls[:2 * warm] == ["a"] * warm + ["b"] * warm
    assert timed[:4] == ["a", "b", "b", "a"] and len(timed) == 2 * tuning.TIMED_CALLS
    # a drifting host (the clock rises every call) leaves the two medians one call apart, not a round's span
    assert abs(times["a"] - times["b"]) <= 1
    choice = tuning.MeasuredChoice("alternating_test", can_measure=lambda *a: True, path=tmp_path / "t.json",
                                   alternate=True)
    monkeypatch.setattr(tuning, "alternating_ms", lambda ways: {"a": 2.0, "b": 1.0})
    assert choice.choose((torch.zeros(2),), lambda: ways) == "b"


def test_signature_keeps_what_decides_speed():
    x = torch.randn(4, 6)
    assert tuning.signature(x, 1e-5, True, 3) == tuning.signature(torch.randn(4, 6), 1e-6, True, 3)
    assert tuning.signature(x) != tuning.signature(x.t().contiguous().t())  # same shape, other strides
    assert tuning.signature(x) != tuning.signature(x.half())
    assert tuning.signature(x, None, "tanh") != tuning.signature(x, None, "none")


def test_never_measures_on_cpu_or_when_turned_off(monkeypatch):
    assert not tuning._can_measure(torch.randn(3))
    assert not tuning._can_measure(1.0)
    if GPU:
        x = torch.randn(3, device=DEVICE)
        monkeypatch.setattr(tuning, "_enabled", [False])
        monkeypatch.setenv("SDKERNELS_TUNING", "1")
        assert not tuning._can_measure(x)  # nothing enabled it (patch(tune=True) does)
        tuning.enable([])
        assert tuning._can_measure(x)
        monkeypatch.setenv("SDKERNELS_TUNING", "0")
        assert not tuning._can_measure(x)


def test_the_rules_answer_is_remembered_where_nothing_can_be_measured(fake_op, tmp_path):
    """On a CPU input (or with measuring off) the default can_measure never measures: dispatch remembers the rule's
    answer, until a choice measured for the same signature (signatures leave out the device) would answer instead."""
    rule_calls = []
    fake_op.chooser = choose = tuning.MeasuredChooser(OP, rule=lambda x: rule_calls.append(x) or "slow",
                                                      path=tmp_path / "t.json")
    x = torch.randn(4, 5)
    assert choose.settled(x) and fake_op(x) == "slow" and fake_op(x) == "slow" and len(rule_calls) == 1
    choose.choices[("call",) + tuning.signature(x)] = "fast"
    choose._changed()  # as after a measurement
    assert fake_op(x) == "fast" and len(rule_calls) == 1
    assert not tuning.MeasuredChooser(OP, can_measure=lambda *a: False).settled(torch.randn(3))  # its own: unknown


def test_enable_keeps_each_ops_rule_and_is_idempotent(fake_op):
    rule = lambda x: "slow"  # noqa: E731
    fake_op.chooser = rule
    installed = tuning.enable([OP])
    assert isinstance(fake_op.chooser, tuning.MeasuredChooser) and fake_op.chooser.rule is rule
    assert tuning.enable([OP])[OP] is installed[OP]


def test_cache_file_names_the_gpu_and_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("SDKERNELS_CACHE", str(tmp_path))
    path = tuning.cache_path()
    assert path.parent == tmp_path / "tuning" and torch.__version__.split("+")[0] in path.name
    assert f"sdkernels{sdkernels.__version__}" in path.name


@pytest.mark.gpu
def test_measures_real_backends_on_the_gpu(tmp_path, monkeypatch):
    """group_norm at a small and a large shape: whatever wins is a backend that runs the input, and it is stored."""
    monkeypatch.setenv("SDKERNELS_TUNING", "1")
    tuning.enable([])
    choose = tuning.MeasuredChooser("group_norm", path=tmp_path / "t.json")
    for shape in ((2, 1280, 8, 8), (1, 128, 256, 256)):
        x = torch.randn(shape, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
        w = torch.randn(shape[1], device=DEVICE, dtype=torch.float16)
        args = (x, 32, w, w, 1e-5, True, None)
        choice = choose(*args)
        op = dispatch.ops()["group_norm"]
        assert choice == dispatch.REFERENCE or op.reasons(*args)[choice] is None
        assert set(choose.timings[("call",) + tuning.signature(*args)]) >= {"reference", choice}
    assert len(json.loads((tmp_path / "t.json").read_text())["group_norm"]) == 2


def test_patch_installs_measured_choosers_that_keep_the_rules():
    import torch.nn as nn
    import sdkernels
    rules = {name: op.chooser for name, op in dispatch.ops().items()}
    sdkernels.patch(nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()))
    for name, op in dispatch.ops().items():
        if op.in_place:  # never timed: each timed call would write into the live tensors again
            assert op.chooser is rules[name], name
            continue
        assert isinstance(op.chooser, tuning.MeasuredChooser), name
        rule = rules[name]
        assert op.chooser.rule is (rule.rule if isinstance(rule, tuning.MeasuredChooser) else rule)


@pytest.mark.gpu
def test_a_tuned_first_call_computes_what_eager_does(tmp_path, monkeypatch):
    """The first call of a patched ResNet block with tuning on, where the choices get measured (in-place ops among
    them before they were excluded: their timed calls added the bias again and again), equals eager's."""
    import copy
    from diffusers.models.resnet import ResnetBlock2D
    import sdkernels
    from sdkernels.testing import randomize_weights, relative_error
    monkeypatch.setenv("SDKERNELS_TUNING", "1")
    monkeypatch.setenv("SDKERNELS_CACHE", str(tmp_path))
    block = randomize_weights(ResnetBlock2D(in_channels=64, out_channels=128, temb_channels=None, groups=8,
                                            time_embedding_norm="group"))
    block = block.to(DEVICE, torch.float16).to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, 48, 40, device=DEVICE, dtype=torch.float16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = copy.deepcopy(block).float()(x.float(), None)
        eager = copy.deepcopy(block)(x, None)
        sdkernels.patch(block)
        out = block(x, None)
    # within eager's own fp16 distance from the fp32 block (a bias added nine times would be far outside)
    assert relative_error(out, exact) <= 2 * relative_error(eager, exact) + 1e-4
