"""Compile every Triton kernel of sdkernels for real NVIDIA GPUs (sm_90, sm_80) on a machine without one.

The CPU test lane runs the kernels in Triton's interpreter, which never runs the GPU compiler: errors only it raises
(a loop-carried variable whose type changes, a kernel reading a non-constexpr global, a tile config whose shared
memory does not fit) would first show on a GPU. This module runs the ops' Triton backends on small CPU tensors and
lets them make the launch choices they make on a GPU: a stand-in Triton driver reports the target GPU (its SM count
and shared memory too), and Triton's ``jit_cache_hook`` records each launch's compile request (signature from the
real arguments, constexprs, num_warps, num_stages) instead of compiling and launching it. Autotuned kernels go
through the autotuner with a benchmarker that times nothing, so every candidate config is recorded. Then every
distinct request is compiled for its target in a process pool: all of them through the frontend, the target's
TritonGPU passes and the shared-memory allocation, and one per kernel and dtypes on sm_90 on to a cubin (see
"compiling" below; --full compiles all to cubins, ~15 CPU-minutes).

    python -m sdkernels.compile_check [--arch 90,80] [--jobs N] [--full] [--list]

One line per compiled variant, then a summary. Exits 1 listing every failure: a compile error; shared memory over
the target's limit where the launcher would pick that variant there (on sm_90, and on sm_80 for launchers that ask
the GPU for its shared memory; elsewhere an sm_80 overflow is a warning: the launchers' tables are for sm_90); an
autotuned shape none of whose candidates fits; a scenario that failed to launch; a kernel no scenario launched.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import math
import multiprocessing
import os
import pkgutil
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional
from unittest import mock

@dataclass(frozen=True)
class Arch:
    cc: int             # compute capability, e.g. 90
    shared_limit: int   # the most shared memory one block may use (opt-in), bytes
    sms: int            # streaming multiprocessors the launchers see (H100 SXM, A100)

    @property
    def name(self) -> str:
        return f"sm_{self.cc}"


ARCHS = {90: Arch(90, 232448, 132), 80: Arch(80, 166912, 108)}
PRIMARY_CC = 90  # the launchers' tables are tuned for it: an overflow there always fails


# ---- environment ------------------------------------------------------------------------------------------------

def _compiler_env() -> None:
    """The GPU compiler, not the interpreter, and the launchers' GPU defaults whatever the caller's environment
    (the test suite sets knobs for the CPU lane). Must run before sdkernels.kernels is imported: triton.jit picks
    the interpreter at decoration time."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
    for knob in ("SDKERNELS_AUTOTUNE", "SDKERNELS_GN_PLAN", "SDKERNELS_GN_TILE_WARPS", "SDKERNELS_GN_TILE_SUMS",
                 "SDKERNELS_POISON_OUTPUTS", "SDKERNELS_ADD_LN_TILE", "SDKERNELS_PARTIAL_PDL", "SDKERNELS_GN_PDL",
                 "SDKERNELS_PARTIAL_ONE_LAUNCH", "SDKERNELS_FLASH_TMA",
                 "SDKERNELS_FLASH_TMA_ONE_CHUNK"):
        os.environ.pop(knob, None)


def _kernel_modules() -> dict:
    """Every module of sdkernels.kernels by short name, imported for the GPU compiler."""
    from triton.runtime.interpreter import InterpretedFunction

    import sdkernels.kernels as package
    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    mods = {name: importlib.import_module(f"{package.__name__}.{name}") for name in names}
    if any(isinstance(obj, InterpretedFunction) for mod in mods.values() for obj in vars(mod).values()):
        sys.exit("sdkernels.kernels was imported under TRITON_INTERPRET=1: run python -m sdkernels.compile_check "
                 "in a fresh process")
    return mods


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports the target GPU; nothing reaches a device."""

    def __init__(self, arch: Arch):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch.cc, 32)
        self.utils = SimpleNamespace(get_device_properties=self._properties)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch.cc  # one JIT device cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        return bench_once

    def _properties(self, device):
        return {"max_shared_mem": self.arch.shared_limit, "multiprocessor_count": self.arch.sms}


def bench_once(kernel_call, quantiles, **kwargs):
    """The autotuner's benchmarker: launch once (recording the config), equal times for all."""
    kernel_call()
    return [1.0] * len(quantiles)


def set_target(arch: Arch) -> None:
    from triton.runtime.driver import driver
    driver.set_active(_TargetDriver(arch))


# ---- recording launches -----------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One distinct compile request."""
    arch: Arch
    module: str
    kernel: str
    spec: str                 # Triton's specialization data (JSON), what JITFunction.preload compiles
    constexprs: dict
    num_warps: int
    num_stages: int
    ptr_types: str
    scenarios: list = field(default_factory=list)
    strict: bool = False      # a shared-memory overflow fails (the launcher picks it on this arch)
    groups: set = field(default_factory=set)  # autotune candidate groups it belongs to
    chosen: bool = False      # launched outside an autotuner's benchmarking
    cubin: bool = False       # compiled through LLVM and ptxas, not only to the shared-memory allocation
    shared: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.arch.name} {self.kernel} [{self.ptr_types}] {consts} warps={self.num_warps} " \
               f"stages={self.num_stages}"

    def overflows(self) -> bool:
        return self.shared is not None and self.shared > self.arch.shared_limit


class Recorder:
    """Triton's jit_cache_hook: records the launch's compile request and tells Triton to skip it."""

    def __init__(self):
        self.variants: dict[str, Variant] = {}
        self.arch: Optional[Arch] = None
        self.scenario = ""
        self.arch_aware = False
        self.group: Optional[tuple] = None

    def hook(self, *, fn, compile, **_):
        spec = compile["specialization_data"]
        v = self.variants.get(spec)
        if v is None:
            v = self.variants[spec] = self._variant(fn.jit_function, compile, spec)
        v.scenarios.append(self.scenario)
        v.strict |= self.arch.cc == PRIMARY_CC or self.arch_aware
        if self.group is None:
            v.chosen = True
        else:
            v.groups.add(self.group)
        return True  # skip compiling and launching

    def _variant(self, jit_fn, compile, spec) -> Variant:
        params = jit_fn.params
        consts = {params[path[0]].name: _short(val) for path, val in compile["constants"].items()
                  if params[path[0]].is_constexpr}
        ptrs = dict.fromkeys(t[1:] for t in compile["signature"].values() if isinstance(t, str) and t[:1] == "*")
        return Variant(self.arch, jit_fn.fn.__module__, jit_fn.fn.__qualname__, spec, consts,
                       compile["num_warps"], compile["num_stages"], ",".join(ptrs))


def _short(value):
    return getattr(value, "value", value)


def _autotuner_run_recording_groups(recorder: Recorder):
    """Autotuner.run that marks what it launches as candidates of one group (the autotuner drops candidates that
    run out of resources, so only a group with no candidate that fits fails)."""
    from triton.runtime.autotuner import Autotuner
    original = Autotuner.run

    def run(self, *args, **kwargs):
        outer = recorder.group
        recorder.group = (recorder.scenario, self.base_fn.__name__)
        try:
            return original(self, *args, **kwargs)
        finally:
            recorder.group = outer
    return run


@contextlib.contextmanager
def _gpu_view(arch: Arch, recorder: Recorder, mods: dict):
    """Launchers see a GPU of this arch; launches are recorded, not run."""
    import torch
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    from sdkernels.kernels import utils
    set_target(arch)
    recorder.arch = arch
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(knobs.runtime, "jit_cache_hook", recorder.hook))
        stack.enter_context(mock.patch.object(Autotuner, "run", _autotuner_run_recording_groups(recorder)))
        from .precompile import autotuners_launching_once  # (autotuners with a do_bench of their own)
        stack.enter_context(autotuners_launching_once())
        # Our CPU tensors would send the launchers' device queries to the CPU answers: answer for the target.
        stack.enter_context(mock.patch.object(utils, "device_ok", lambda *tensors: True))
        sm_count = utils.multiprocessor_count
        for mod in (utils, *mods.values()):
            if getattr(mod, "multiprocessor_count", None) is sm_count:
                stack.enter_context(mock.patch.object(mod, "multiprocessor_count", lambda device: arch.sms))
        fits = mods["linear_geglu"].fits  # asks the (stand-in) driver for a CUDA device's shared memory
        gpu = torch.device("cuda", arch.cc)
        stack.enter_context(mock.patch.object(mods["linear_geglu"], "fits", lambda c, dt, dev: fits(c, dt, gpu)))
        yield


def _forget_tuning(mods: dict) -> None:
    """Empty the autotuners' caches: a shape tuned by an earlier scenario (its key ignores the arch and the
    constexpr flags) would launch the remembered config instead of trying every candidate."""
    from triton.runtime.autotuner import Autotuner
    for mod in mods.values():
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                obj.cache.clear()


# ---- scenarios: op inputs that reach every launch choice ----------------------------------------------------------

@dataclass
class Scenario:
    label: str
    run: Callable[[], None]
    arch_aware: bool = False  # the launcher asks the GPU for its shared memory and picks configs that fit
    min_cc: int = 0  # the backend refuses older GPUs (e.g. 90: the copy engine's tensor descriptors)


def _backend_call(op: str, backend: str, *args) -> Callable[[], None]:
    """Run an op's backend on args as dispatch would on a GPU (its checks first: only inputs it accepts)."""
    def call():
        from sdkernels import dispatch
        b = next(b for b in dispatch.ops()[op].backends if b.name == backend)
        reason = b.why_not(*args)
        if reason:
            raise RuntimeError(f"{op}/{backend} refuses these inputs: {reason}")
        b.run(*args)
    return call


def _dtypes():
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def _settings(env: Optional[dict] = None, matmul_tf32: Optional[bool] = None, cudnn_tf32: Optional[bool] = None):
    """Environment knobs and torch's TF32 flags for one scenario, restored after."""
    import torch
    flags = [(obj, value) for obj, value in ((torch.backends.cuda.matmul, matmul_tf32),
                                             (torch.backends.cudnn, cudnn_tf32)) if value is not None]
    saved = [(obj, obj.allow_tf32) for obj, _ in flags]
    try:
        for obj, value in flags:
            obj.allow_tf32 = value
        with mock.patch.dict(os.environ, env or {}):
            yield
    finally:
        for obj, value in saved:
            obj.allow_tf32 = value


def _with_settings(call, **settings):
    def run():
        with _settings(**settings):
            call()
    return run


ATTENTION_HEAD_DIMS = (40, 64, 80, 128, 160)
# SD 1.5 self-attention lengths: 256 leaves too few 128-row tiles to fill the GPU (the launcher halves BLOCK_M),
# 4096 does not.
ATTENTION_TOKENS = (256, 4096)


def _attention_inputs(d, dtype, mask_kind, n, heads=8, batch=2, nk=None):
    """diffusers' layout (B, N, H*d) with n queries and nk keys (default n); mask kind 1: one key-padding row per
    sample, 2: a full (N, Nk) mask."""
    import torch
    nk = nk or n
    q = torch.empty(batch, n, heads * d, dtype=dtype)
    k, v = (torch.empty(batch, nk, heads * d, dtype=dtype) for _ in range(2))
    shape = {0: None, 1: (batch, 1, 1, nk), 2: (batch, 1, n, nk)}[mask_kind]
    mask = None if shape is None else torch.empty(shape, dtype=dtype)
    return q, k, v, d ** -0.5, mask, heads


# Cross-attention to 77 text tokens: the short-key tile configs (SHORT_KEY_CONFIGS), the same for fp16 and bf16.
CROSS_ATTENTION_KEYS = 77


def attention_scenarios():
    for backend, d, (dt, dtype), mask, n in itertools.product(("flash", "partial_softmax"), ATTENTION_HEAD_DIMS,
                                                              _dtypes().items(), (0, 1, 2), ATTENTION_TOKENS):
        yield Scenario(f"{backend} d={d} {dt} mask={mask} N={n}",
                       _backend_call("flash_attention", backend, *_attention_inputs(d, dtype, mask, n)))
    for backend, d, mask in itertools.product(("flash", "partial_softmax"), ATTENTION_HEAD_DIMS, (0, 1, 2)):
        nk = CROSS_ATTENTION_KEYS
        yield Scenario(f"{backend} d={d} fp16 mask={mask} N=4096 Nk={nk}",
                       _backend_call("flash_attention", backend,
                                     *_attention_inputs(d, _dtypes()["fp16"], mask, 4096, nk=nk)))
    for d, (dt, dtype), n in itertools.product((40, 64, 80, 160), _dtypes().items(), ATTENTION_TOKENS):
        if dt != "fp32":  # the descriptor (TMA) flash kernel: 16-bit, no mask, sm_90+
            yield Scenario(f"flash d={d} {dt} N={n} tensor descriptors",
                           _with_settings(_backend_call("flash_attention", "flash",
                                                        *_attention_inputs(d, dtype, 0, n)),
                                          env={"SDKERNELS_FLASH_TMA": "1"}), min_cc=90)
    yield Scenario("flash d=40 fp16 N=4096 tensor descriptors as two chunks, 32 + 16 (the one-chunk knob off)",
                   _with_settings(_backend_call("flash_attention", "flash",
                                                *_attention_inputs(40, _dtypes()["fp16"], 0, 4096)),
                                  env={"SDKERNELS_FLASH_TMA": "1", "SDKERNELS_FLASH_TMA_ONE_CHUNK": ""}), min_cc=90)
    yield Scenario("partial_softmax row statistics, merged by their own kernel", _merged_row_stats)
    for d, mask in itertools.product(ATTENTION_HEAD_DIMS, (0, 1, 2)):  # what an sm_90 GPU runs: griddepcontrol
        yield Scenario(f"partial_softmax d={d} fp16 mask={mask} N=256 programmatic launch",
                       _with_settings(_backend_call("flash_attention", "partial_softmax",
                                                    *_attention_inputs(d, _dtypes()["fp16"], mask, 256)),
                                      env={"SDKERNELS_PARTIAL_PDL": "1", "SDKERNELS_PARTIAL_ONE_LAUNCH": "0"}),
                       min_cc=90)
        yield Scenario(f"partial_softmax d={d} fp16 mask={mask} N=256 one launch",
                       _with_settings(_backend_call("flash_attention", "partial_softmax",
                                                    *_attention_inputs(d, _dtypes()["fp16"], mask, 256)),
                                      env={"SDKERNELS_PARTIAL_ONE_LAUNCH": "1"}))
        yield Scenario(f"partial_softmax d={d} fp16 mask={mask} Nk=13: one launch",
                       _backend_call("flash_attention", "partial_softmax",
                                     *_attention_inputs(d, _dtypes()["fp16"], mask, 256, nk=13)))


def _merged_row_stats():
    """attention_row_stats_triton with split key ranges: the statistics' merge kernel (the attention op merges the
    splits inside its softmax . V kernel instead)."""
    from sdkernels.kernels.partial_softmax import attention_row_stats_triton
    from sdkernels.ops.attention import as_bhnd
    q, k, _v, scale, _mask, heads = _attention_inputs(64, _dtypes()["fp16"], 0, 256)
    attention_row_stats_triton(as_bhnd(q, heads), as_bhnd(k, heads), scale, None, splits=4)


# (N, C, H, W): groups of 2560 (one pass, BLOCK 4096), 40960 (one pass, BLOCK 65536) and 131072 elements (split).
GROUP_NORM_SHAPES = ((2, 1280, 8, 8), (2, 320, 64, 64), (1, 256, 128, 128))
GROUPS = 32
# weight and bias, SiLU, residual: none; the norm before attention; the ResNet norm; everything.
GROUP_NORM_EPILOGUES = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))


def _group_norm_x(shape, dtype, layout):
    """x in a layout: contiguous NCHW (flat indexing), channels_last, or a channel slice (strided NCHW)."""
    import torch
    if layout == "nhwc":
        return torch.empty(shape, dtype=dtype).to(memory_format=torch.channels_last)
    if layout == "slice":
        n, c, h, w = shape
        return torch.empty((n, 2 * c, h, w), dtype=dtype)[:, :c]
    return torch.empty(shape, dtype=dtype)


def _group_norm_inputs(shape, dtype, layout, epilogue, residual_layout=None):
    import torch
    affine, silu, residual = epilogue
    x = _group_norm_x(shape, dtype, layout)
    weight, bias = (torch.empty(shape[1], dtype=dtype) for _ in range(2)) if affine else (None, None)
    res = _group_norm_x(shape, dtype, residual_layout or layout) if residual else None
    return x, GROUPS, weight, bias, 1e-5, silu, res


def group_norm_scenarios():
    import torch
    for (dt, dtype), shape, layout in itertools.product(_dtypes().items(), GROUP_NORM_SHAPES,
                                                        ("nchw", "nhwc", "slice")):
        for epilogue in GROUP_NORM_EPILOGUES:
            args = _group_norm_inputs(shape, dtype, layout, epilogue)
            yield Scenario(f"group_norm {dt} {shape} {layout} affine,silu,residual={epilogue}",
                           _backend_call("group_norm", "triton", *args))
        x = _group_norm_x(shape, dtype, layout)
        yield Scenario(f"group_norm_stats {dt} {shape} {layout}",
                       _backend_call("group_norm_stats", "triton", x, GROUPS, 1e-5))
        stats = torch.empty((shape[0], GROUPS, 2), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for silu in (False, True):
            yield Scenario(f"group_norm_apply {dt} {shape} {layout} silu={silu}",
                           _backend_call("group_norm_apply", "triton", x, stats, x.new_empty(shape[1]),
                                         x.new_empty(shape[1]), silu))
        # channels_last x with an NCHW residual: the flat plan in channels_last order
        args = _group_norm_inputs(shape, dtype, "nhwc", (True, True, True), residual_layout="nchw")
        yield Scenario(f"group_norm {dt} {shape} nhwc, nchw residual",
                       _backend_call("group_norm", "triton", *args))
        # the ResNet block's norm2: conv1's bias + temb as an (N, C) shift
        args = _group_norm_inputs(shape, dtype, layout, (True, True, False)) + (torch.empty(shape[:2], dtype=dtype),)
        yield Scenario(f"group_norm {dt} {shape} {layout} shift", _backend_call("group_norm", "triton", *args))
        # Every plan, forced: the launcher's choice reaches only some at these shapes (the tests force them too).
        for plan, knobs in (("tile", {}), ("tile", {"SDKERNELS_GN_TILE_SUMS": "axes"}),
                            ("tile", {"SDKERNELS_GN_TILE_SUMS": "pivot"}),
                            ("tile", {"SDKERNELS_GN_TILE_SUMS": "stat"}), ("one_pass", {}),
                            ("flat", {}), ("rows", {})):
            if plan != "rows" or layout == "nhwc":
                args = _group_norm_inputs(shape, dtype, layout, (True, True, True))
                yield Scenario(f"group_norm {dt} {shape} {layout} plan={plan} {knobs or ''}",
                               _with_settings(_backend_call("group_norm", "triton", *args),
                                              env={"SDKERNELS_GN_PLAN": plan, **knobs}))


def group_norm_programmatic_scenarios():
    """What an sm_90 GPU runs: the one-program plans' kernels and the flat plan's partials -> apply as programmatic
    dependents (griddepcontrol)."""
    import torch
    pdl = {"SDKERNELS_GN_PDL": "1"}
    for (dt, dtype), plan in itertools.product(_dtypes().items(), ("tile", "one_pass", "flat")):
        args = _group_norm_inputs((2, 64, 8, 8), dtype, "nhwc", (True, True, True))
        yield Scenario(f"group_norm {dt} (2, 64, 8, 8) plan={plan} programmatic launch",
                       _with_settings(_backend_call("group_norm", "triton", *args),
                                      env={**pdl, "SDKERNELS_GN_PLAN": plan}), min_cc=90)
        x = _group_norm_x((2, 64, 8, 8), dtype, "nhwc")
        yield Scenario(f"group_norm_stats {dt} (2, 64, 8, 8) programmatic launch",
                       _with_settings(_backend_call("group_norm_stats", "triton", x, GROUPS, 1e-5), env=pdl),
                       min_cc=90)
        x = torch.empty(512, 1280, 1, dtype=dtype)
        yield Scenario(f"layer_norm as group_norm {dt} (512, 1280, 1) programmatic launch",
                       _with_settings(_backend_call("group_norm", "triton", x, 1, x.new_empty(1280),
                                                    x.new_empty(1280), 1e-5, False, None), env=pdl), min_cc=90)


def layer_norm_scenarios():
    """LayerNorm as one-group group_norm on (rows, C, 1), and small contiguous groups: several groups a program."""
    import torch
    for (dt, dtype), (rows, C) in itertools.product(_dtypes().items(), ((8192, 320), (512, 1280), (154, 768))):
        x = torch.empty(rows, C, 1, dtype=dtype)
        w = x.new_empty(C)
        yield Scenario(f"layer_norm as group_norm {dt} ({rows}, {C}, 1)",
                       _backend_call("group_norm", "triton", x, 1, w, w, 1e-5, False, None))
        x = torch.empty(2, 64, 4, 4, dtype=dtype)
        yield Scenario(f"group_norm {dt} (2, 64, 4, 4) small groups, shift",
                       _backend_call("group_norm", "triton", x, 32, x.new_empty(64), x.new_empty(64), 1e-5, True,
                                     torch.empty_like(x), x.new_empty(2, 64)))


def bias_add_scenarios():
    import torch
    for (dt, dtype), layout in itertools.product(_dtypes().items(), ("nchw", "nhwc")):
        y = _group_norm_x((2, 320, 64, 64), dtype, layout)
        for residual, scale in ((None, 1.0), (torch.empty_like(y), 0.5)):
            yield Scenario(f"add_bias_residual_ {dt} {layout} residual={residual is not None}",
                           _backend_call("add_bias_residual_", "triton", y, y.new_empty(320), residual, scale))


# (rows, C): SD1.5 / SDXL transformer widths (several rows a program), CLIP's 768 (154 rows: a tail), and the
# widest row the kernel takes (16 warps on one row).
ADD_LAYER_NORM_SHAPES = ((8192, 320), (2048, 640), (512, 1280), (154, 768), (4, 8192))


def add_layer_norm_scenarios():
    import torch
    for (dt, dtype), (rows, C) in itertools.product(_dtypes().items(), ADD_LAYER_NORM_SHAPES):
        x = torch.empty(2, rows // 2, C, dtype=dtype)
        affines = ((True, True), (True, False), (False, False)) if C == 320 else ((True, True),)
        for weight, bias in affines:
            args = (x, torch.empty_like(x), x.new_empty(C) if weight else None, x.new_empty(C) if bias else None, 1e-5)
            yield Scenario(f"add_layer_norm {dt} {tuple(x.shape)} weight={weight} bias={bias}",
                           _backend_call("add_layer_norm", "triton", *args))


def gelu_scenarios():
    import torch
    for (dt, dtype), approximate in itertools.product(_dtypes().items(), ("none", "tanh")):
        dense = torch.empty(2, 4096, 1280, dtype=dtype)                      # flat: one 4096-wide tile row
        strided = torch.empty(2, 4096, 2560, dtype=dtype)[..., :1280]       # rows of 1280: 16 x 256 tiles
        for label, x in (("dense", dense), ("strided", strided)):
            yield Scenario(f"gelu {dt} {approximate} {label}", _backend_call("gelu", "triton", x, approximate))
        for inner in (1280, 2560):                                          # 16 x 256 and 8 x 512 tiles
            h = torch.empty(2, 1024, 2 * inner, dtype=dtype)
            yield Scenario(f"geglu {dt} {approximate} inner={inner}", _backend_call("geglu", "triton", h, approximate))


def linear_geglu_scenarios():
    """SD 1.5's first feed-forward (K = 320 -> 2 x 1280): every autotuner candidate, the default config (no
    autotuning, or a CUDA-graph capture) and the other flags; fp32 with and without TF32."""
    import torch
    for (dt, dtype), tf32 in itertools.product(_dtypes().items(), (False, True)):
        if tf32 and dtype != torch.float32:
            continue  # allow_tf32 only changes fp32's dots
        x, w, b = (torch.empty(shape, dtype=dtype) for shape in ((2, 4096, 320), (2560, 320), (2560,)))
        tag = f"linear_geglu {dt}{' tf32' if tf32 else ''}"
        for autotune, bias, approximate in (("1", b, "none"), ("0", b, "none"), ("0", None, "tanh")):
            call = _backend_call("linear_geglu", "triton", x, w, bias, approximate)
            how = "autotuned" if autotune == "1" else "default config"
            label = f"{tag} {how} bias={bias is not None} {approximate}"
            yield Scenario(label, _with_settings(call, env={"SDKERNELS_AUTOTUNE": autotune}, matmul_tf32=tf32),
                           arch_aware=True)


# (N, C, H, W): more than 256 pixels (HALF_CONFIG) and at most 256 (SMALL_M_CONFIG)
CONV_SHAPES = ((2, 320, 64, 64), (2, 1280, 16, 16))


def _conv_inputs(shape, dtype, layout, which):
    """The ResNet block's convs: "conv1" (norm1 prologue; bias + temb; norm2's statistics), "conv1 vae" (the same
    without temb, as in the VAE) and "conv2" (norm2 prologue; bias + shortcut, / output_scale_factor)."""
    import torch
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype).to(memory_format=fmt)
    weight = torch.empty(c, c, 3, 3, dtype=dtype).to(memory_format=fmt)
    bias, norm_w, norm_b = (torch.empty(c, dtype=dtype) for _ in range(3))
    stats = torch.empty(n, GROUPS, 2, dtype=torch.float32)
    if which == "conv2":
        return x, weight, bias, stats, norm_w, norm_b, None, torch.empty_like(x), 1.0, 0, 1e-6
    temb = torch.empty(n, c, dtype=dtype) if which == "conv1" else None
    return x, weight, bias, stats, norm_w, norm_b, temb, None, 1.0, GROUPS, 1e-6


def conv3x3_scenarios():
    for (dt, dtype), tf32 in itertools.product(_dtypes().items(), (True, False)):
        if not tf32 and dt != "fp32":
            continue  # allow_tf32 only changes fp32's dots
        for shape, layout, which in itertools.product(CONV_SHAPES, ("nhwc", "nchw"), ("conv1", "conv1 vae", "conv2")):
            if layout == "nchw" and (dt != "fp16" or which == "conv1 vae"):
                continue  # NCHW changes only which strides are 1: once is enough
            call = _backend_call("conv3x3_fused", "triton", *_conv_inputs(shape, dtype, layout, which))
            yield Scenario(f"conv3x3 {which} {dt}{'' if tf32 else ' ieee'} {shape} {layout}",
                           _with_settings(call, cudnn_tf32=tf32))
        yield from _plain_conv3x3_scenarios(dt, dtype, tf32)


def _plain_conv3x3_scenarios(dt, dtype, tf32):
    """sdkernels::conv3x3 (the same kernel without prologue or statistics), where that op is defined."""
    import torch

    from sdkernels import dispatch
    if not any(b.name == "triton_igemm" for b in getattr(dispatch.ops().get("conv3x3"), "backends", [])):
        return
    for shape, residual in itertools.product(CONV_SHAPES, (False, True)):
        x, weight, bias = _conv_inputs(shape, dtype, "nhwc", "conv2")[:3]
        args = (x, weight, bias, torch.empty_like(x) if residual else None, 1.0)
        call = _backend_call("conv3x3", "triton_igemm", *args)
        yield Scenario(f"conv3x3 plain residual={residual} {dt}{'' if tf32 else ' ieee'} {shape} nhwc",
                       _with_settings(call, cudnn_tf32=tf32))


def conv3x3_tma_scenarios():
    """sdkernels::conv3x3's triton_tma backend: one sample per tile and two with split-K (8 x 8 images), with and
    without bias and residual, fp16 and bf16."""
    import torch
    for (dt, dtype), (shape, epilogue) in itertools.product(
            (("fp16", torch.float16), ("bf16", torch.bfloat16)),
            (((2, 64, 16, 16), True), ((2, 64, 16, 16), False), ((2, 1280, 8, 8), True))):
        n, c, h, w = shape
        x = torch.empty(shape, dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.empty(c, c, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
        bias, residual = (torch.empty(c, dtype=dtype), torch.empty_like(x)) if epilogue else (None, None)
        yield Scenario(f"conv3x3 triton_tma {dt} {shape} epilogue={epilogue}",
                       _backend_call("conv3x3", "triton_tma", x, weight, bias, residual, 1.0), min_cc=90)


def conv3x3_bordered_scenarios():
    """sdkernels::conv3x3_fused's triton_bordered backend (the bordered GN + SiLU write and the shifted-GEMM conv):
    the ResNet block's two convs at SD1.5's 64 x 64, 32 x 32 (the 8-warp tile), 16 x 16 and 8 x 8 (split-K there),
    fp16 and bf16."""
    import torch
    for (dt, dtype), shape, which in itertools.product((("fp16", torch.float16), ("bf16", torch.bfloat16)),
                                                       CONV_SHAPES + ((2, 640, 32, 32), (2, 1280, 8, 8)),
                                                       ("conv1", "conv2")):
        call = _backend_call("conv3x3_fused", "triton_bordered", *_conv_inputs(shape, dtype, "nhwc", which))
        yield Scenario(f"conv3x3 triton_bordered {which} {dt} {shape}", call, min_cc=90)


def winograd_scenarios():
    """sdkernels::conv3x3's triton_winograd backend, with and without bias and residual, fp16, bf16 and fp32."""
    import torch
    for (dt, dtype), epilogue in itertools.product(_dtypes().items(), (True, False)):
        x = torch.empty(2, 64, 16, 16, dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.empty(64, 64, 3, 3, dtype=dtype)
        bias, residual = (torch.empty(64, dtype=dtype), torch.empty_like(x)) if epilogue else (None, None)
        yield Scenario(f"conv3x3 triton_winograd {dt} epilogue={epilogue}",
                       _backend_call("conv3x3", "triton_winograd", x, weight, bias, residual, 1.0))


SCENARIO_FAMILIES = (attention_scenarios, linear_geglu_scenarios, conv3x3_scenarios, conv3x3_tma_scenarios,
                     conv3x3_bordered_scenarios, winograd_scenarios,
                     group_norm_scenarios, group_norm_programmatic_scenarios, gelu_scenarios, bias_add_scenarios,
                     layer_norm_scenarios,
                     add_layer_norm_scenarios)


def collect(archs, mods) -> tuple[dict, list]:
    """Run every scenario on every arch; (compile requests by specialization data, scenario failures)."""
    import sdkernels.ops  # noqa: F401  (registers the ops' backends)
    recorder, failures = Recorder(), []
    for arch in archs:
        with _gpu_view(arch, recorder, mods):
            for family in SCENARIO_FAMILIES:
                for scenario in family():
                    if arch.cc < scenario.min_cc:
                        continue
                    recorder.scenario, recorder.arch_aware = scenario.label, scenario.arch_aware
                    _forget_tuning(mods)
                    try:
                        scenario.run()
                    except Exception as e:  # a launcher that fails before compiling is a failure too
                        failures.append(f"{arch.name} scenario {scenario.label!r} raised:\n"
                                        + _indent(_error_text(e)))
    return recorder.variants, failures


# ---- compiling ----------------------------------------------------------------------------------------------------
# Compiling all ~800 variants to cubins takes ~15 CPU-minutes, most of it in LLVM and ptxas, after everything this
# check is for: the frontend (type and constexpr errors), the target's TritonGPU passes (layouts, pipelining) and the
# shared-memory allocation. So every variant goes that far ("shared" depth, ~0.3 s), and on the primary arch one
# variant per kernel and dtypes, the one with the largest tiles, goes on through LLVM and ptxas to a cubin (--full:
# every variant).

TILE_PARAMS = re.compile(r"BLOCK|TILE|GROUP_M|CHUNK")  # constexprs that size tiles


def _tile_size(v: Variant) -> tuple:
    tiles = [x for k, x in v.constexprs.items() if TILE_PARAMS.search(k) and isinstance(x, int)]
    return math.prod(tiles), v.num_warps, v.num_stages


def pick_cubin_depth(variants: list) -> None:
    groups: dict = {}
    for v in variants:
        if v.arch.cc == PRIMARY_CC:
            groups.setdefault((v.module, v.kernel, v.ptr_types), []).append(v)
    for members in groups.values():
        max(members, key=_tile_size).cubin = True


def _shared_depth_stages(*args):
    """Triton's add_stages_inspection_hook: without arguments the key that keeps these partial compiles apart from
    real ones in Triton's cache; with them, the llir stage cut to the shared-memory allocation (what make_llir runs
    before it) and no PTX or cubin."""
    if not args:
        return "sdkernels-compile-check-shared-depth", "shared-depth"
    backend, stages, options, language, capability = args
    stages["llir"] = lambda src, metadata: _allocate_shared(backend, src, metadata, options, capability)
    stages["ptx"] = lambda src, metadata: ""
    stages["cubin"] = lambda src, metadata: b""


def _allocate_shared(backend, mod, metadata, options, capability):
    """The passes Triton 3.9's make_llir runs up to the shared-memory allocation, then the allocation."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options
    pm = ir.pass_manager(mod.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm, False)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    ptx_version = get_ptx_version_from_options(options, backend.target.arch)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, ptx_version)
    pm.run(mod, "sdkernels_compile_check")
    metadata["shared"] = mod.get_int_attr("ttg.shared")
    metadata["name"] = "shared_depth_only"
    return ""


def _error_text(e: BaseException, lines: int = 20) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).rstrip()
    return "\n".join(text.splitlines()[-lines:])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _preload(fn, spec: str, cubin: bool) -> int:
    from triton import knobs
    knobs.runtime.add_stages_inspection_hook = None if cubin else _shared_depth_stages
    return fn.preload(spec).metadata.shared


def compile_one(cc: int, module: str, kernel: str, spec: str, cubin: bool):
    """(shared bytes or None, seconds, error text or None): compile one request for its target. A cubin-depth
    variant is compiled to shared depth too, to check that the shortcut still matches Triton's own pipeline."""
    from triton import knobs
    set_target(ARCHS[cc])
    knobs.runtime.jit_cache_hook = None
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(module), kernel)
        shared = _preload(fn, spec, cubin=False)
        full = _preload(fn, spec, cubin=True) if cubin else shared
        if full != shared:
            return full, time.perf_counter() - start, (
                f"the shared-depth shortcut found {shared} bytes of shared memory, the full compile {full}: "
                "update _allocate_shared in sdkernels/compile_check.py to Triton's make_llir")
    except Exception as e:
        return None, time.perf_counter() - start, _error_text(e)
    return shared, time.perf_counter() - start, None


def _worker(conn) -> None:
    _compiler_env()
    for task in iter(conn.recv, None):
        conn.send(compile_one(*task))


def compile_all(variants: list, jobs: int, log) -> None:
    """Compile every variant in `jobs` worker processes (cubins first: they take longest), filling in shared,
    seconds and error; one line each. A worker that dies (an LLVM abort) fails the variant it was compiling."""
    from multiprocessing.connection import wait
    ctx = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools

    def start():
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return conn, proc

    pending = sorted(variants, key=lambda v: not v.cubin)
    idle, busy, done = [start() for _ in range(max(1, min(jobs, len(pending))))], {}, 0
    while pending or busy:
        while idle and pending:
            conn, proc = idle.pop()
            v = pending.pop(0)
            conn.send((v.arch.cc, v.module, v.kernel, v.spec, v.cubin))
            busy[conn] = (proc, v)
        for conn in wait(list(busy)):
            proc, v = busy.pop(conn)
            try:
                v.shared, v.seconds, v.error = conn.recv()
                idle.append((conn, proc))
            except (EOFError, OSError):  # the worker died
                proc.join()
                v.error = f"the compiler process died (exit code {proc.exitcode}); its stderr is above"
                idle.append(start())
            done += 1
            log(_variant_line(v, done, len(variants)))
    for conn, proc in idle:
        conn.send(None)
        proc.join()


def _variant_line(v: Variant, done: int, total: int) -> str:
    status = "FAIL" if v.error else ("over" if v.overflows() else "ok")
    more = f" (+{len(v.scenarios) - 1})" if len(v.scenarios) > 1 else ""
    return f"[{done:4d}/{total}] {status:4s} {v.describe()} shared={v.shared} " \
           f"{'cubin' if v.cubin else 'shared-depth'} {v.seconds:.1f}s <- {v.scenarios[0]}{more}"


# ---- verdict ------------------------------------------------------------------------------------------------------

def judge(variants: list) -> tuple[list, list]:
    """(failures, warnings) as report lines."""
    failures, warnings, errors = [], [], {}
    for v in variants:
        where = f"{v.describe()}\n    first launched by: {v.scenarios[0]}"
        if v.error:
            errors.setdefault(v.error, []).append(v)
        elif v.overflows():
            line = f"shared memory {v.shared} > {v.arch.shared_limit} bytes: {where}"
            if v.chosen and v.strict:
                failures.append(line)
            else:
                why = "an autotune candidate, dropped there" if not v.chosen else "its launcher does not tell " \
                      f"archs apart, and its table is for sm_{PRIMARY_CC}"
                warnings.append(f"{line}\n    ({why})")
    failures += [_compile_error(error, members) for error, members in errors.items()]
    failures += _groups_without_fit(variants)
    return failures, warnings


def _compile_error(error: str, members: list, shown: int = 5) -> str:
    """One report for the variants that failed with the same error (a kernel bug usually breaks many)."""
    lines = [f"compile error in {len(members)} variant(s):"]
    lines += [f"    {v.describe()} <- {v.scenarios[0]}" for v in members[:shown]]
    if len(members) > shown:
        lines.append(f"    ... and {len(members) - shown} more (the lines marked FAIL above)")
    return "\n".join(lines) + "\n" + _indent(error)


def _groups_without_fit(variants: list) -> list:
    groups: dict = {}
    for v in variants:
        for g in v.groups:
            groups.setdefault((v.arch.name, g), []).append(v)
    return [f"{arch} autotuning of {kernel} for {scenario!r}: no candidate config fits (shared memory "
            f"{sorted(v.shared for v in members if v.shared is not None)})"
            for (arch, (scenario, kernel)), members in groups.items()
            if not any(not v.error and not v.overflows() for v in members)]


def launched_kernels(mods: dict) -> set:
    """(module, name) of every JITFunction launched as name[grid] in the kernel modules' source."""
    from triton.runtime.jit import JITFunction
    found = set()
    for mod in mods.values():
        source = open(mod.__file__).read()
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__ \
                    and re.search(rf"\b{re.escape(name)}\[", source):
                found.add((mod.__name__, name))
    return found


def uncovered(variants: list, mods: dict, archs) -> list:
    """Kernels no scenario compiled for an arch their module runs on (a module's MIN_COMPUTE_CAPABILITY, e.g. 90 for
    tensor descriptors, exempts older archs)."""
    compiled = {(v.arch.cc, v.module, v.kernel) for v in variants}
    min_cc = {mod.__name__: getattr(mod, "MIN_COMPUTE_CAPABILITY", 0) for mod in mods.values()}
    return [f"{arch.name}: no scenario launches {module}.{name}: add one to sdkernels/compile_check.py"
            for arch in archs for module, name in sorted(launched_kernels(mods))
            if (arch.cc, module, name) not in compiled and arch.cc >= min_cc[module]]


def _summary(variants: list, archs, seconds: float) -> list:
    lines = []
    for arch in archs:
        counts: dict = {}
        for v in variants:
            if v.arch == arch:
                counts[v.kernel] = counts.get(v.kernel, 0) + 1
        lines.append(f"{arch.name}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    lines.append(f"{len(variants)} variants compiled in {seconds:.0f} s")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compiler processes")
    parser.add_argument("--full", action="store_true", help="compile every variant to a cubin (~15 CPU-minutes)")
    parser.add_argument("--list", action="store_true", help="list the compile requests, compile nothing")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _compiler_env()
    archs = [ARCHS[int(cc)] for cc in args.arch.split(",")]
    mods = _kernel_modules()

    def log(line):
        print(line, flush=True)

    variants, failures = collect(archs, mods)
    variants = list(variants.values())
    log(f"{len(variants)} distinct compile requests from the scenarios ({time.perf_counter() - start:.0f} s)")
    if args.list:
        for v in variants:
            log(f"{v.describe()} <- {'; '.join(v.scenarios)}")
        return 1 if failures else 0
    if args.full:
        for v in variants:
            v.cubin = True
    else:
        pick_cubin_depth(variants)
    compile_all(variants, args.jobs, log)
    compile_failures, warnings = judge(variants)
    failures += compile_failures + uncovered(variants, mods, archs)
    for line in warnings:
        log(f"WARNING {line}")
    for line in _summary(variants, archs, time.perf_counter() - start):
        log(line)
    for line in failures:
        log(f"FAILURE {line}")
    broken = sum(1 for v in variants if v.error)
    log(f"{len(failures)} failures ({broken} variants failed to compile), {len(warnings)} warnings")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
