"""A patched model's Triton kernels compiled in parallel before its first call of each input signature.

On a machine whose Triton cache is empty, a patched SD1.5 UNet's first call compiled its Triton kernels one after
another: 56 s on an H200, nearly all of it Triton's frontend, LLVM and ptxas (bench/NOTES.md, session 7). The
compiles do not depend on each other, and a GPU machine has cores to spare, so the first call of each input
signature of a patched model goes in three steps:

1. A dry call on clones of the inputs, under no_grad. Each launch of a Triton kernel not yet compiled in this
   process is recorded through Triton's ``jit_cache_hook`` and skipped. What is recorded is the kernel's
   specialization, which ``JITFunction.preload`` compiles. Kernels in Triton's disk cache are only counted.
   sdkernels' measured choices (sdkernels.tuning) call each candidate once instead of timing it and keep nothing;
   Triton's autotuners launch each config once, and their caches are put back after. So every candidate's kernels
   are recorded. The dry call's results are garbage and dropped. Working on clones keeps caches keyed on the
   caller's tensors clean.
2. Meanwhile the recorded kernels compile into Triton's disk cache in worker processes, one per core at most,
   started as kernels are recorded (class Workers), and, after the dry call, in this process too. The workers
   answer Triton's device queries with a stand-in driver for this GPU's target (sdkernels.compile_check), so they
   never touch the GPU. They are forks of this process (os.fork, see _start_method) or, with
   SDKERNELS_PRECOMPILE_START=spawn, plain subprocesses; never multiprocessing's spawn, which would re-run a
   caller's script that has no ``__main__`` guard.
3. The real call, in which each kernel loads from the disk cache.

Anything that goes wrong in steps 1 and 2 is logged and left to step 3, which compiles what is missing on first
launch, as without this. SDKERNELS_PRECOMPILE=0 turns it off; SDKERNELS_PRECOMPILE_JOBS sets the number of workers.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import tuning
from ._env import getenv
from .shadow import Shadowing, attach, detach

logger = logging.getLogger("sdkernels")
_PRECOMPILER = "_sdkernels_precompiler"  # on a model: its Precompiler


@dataclass
class Report:
    """What one precompile did."""
    recorded: int = 0         # distinct kernel specializations the dry call launched, not compiled in this process
    on_disk: int = 0          # of those, already in Triton's disk cache
    compiled: int = 0         # compiled by the workers and this process
    compiled_here: int = 0    # of those, by this process (after the dry call)
    failed: list = field(default_factory=list)  # "kernel: error" for each the workers could not compile
    kernels: list = field(default_factory=list)  # names of the kernels sent to the workers
    specs: list = field(default_factory=list)    # and their specializations (Triton's JSON)
    workers: int = 0
    dry_s: float = 0.0
    compile_s: float = 0.0    # after the dry call, until the workers were done
    error: str = ""           # why the dry call or the workers stopped early, if they did

    def __str__(self) -> str:
        line = (f"sdkernels.precompile: {self.recorded} kernels launched by the dry call ({self.dry_s:.2f} s), "
                f"{self.on_disk} in Triton's cache, {self.compiled} compiled by {self.workers} workers and this "
                f"process ({self.compiled_here} here; done {self.compile_s:.1f} s after it)")
        if self.failed:
            line += f"; {len(self.failed)} left to compile on first launch ({self.failed[0]})"
        return line + (f"; stopped: {self.error}" if self.error else "")


# ---- the model's method ------------------------------------------------------------------------------------------

def install(model: nn.Module, method: str) -> None:
    """Precompile before the first call of each input signature of ``model.<method>`` (nothing if installed)."""
    attach(model, _PRECOMPILER, lambda: Precompiler(model, method))


def uninstall(model: nn.Module) -> None:
    detach(model, _PRECOMPILER)


def installed(model: nn.Module):
    return model.__dict__.get(_PRECOMPILER)


class Precompiler(Shadowing):
    """A model method shadowed on the instance by one that precompiles before each new input signature."""

    def __init__(self, model: nn.Module, method: str):
        self.seen = set()     # input signatures precompiled for (or skipped)
        self.reports = []
        super().__init__(model, method)

    def __call__(self, *args, **kwargs):
        if self.open:
            leaves = tree_flatten((args, kwargs))[0]
            key = tuning.signature(*leaves)
            if key not in self.seen and why_not(leaves) is None:
                self.seen.add(key)
                self.reports.append(precompile(lambda: self.original(*_clones(args), **_clones(kwargs))))
        return self.original(*args, **kwargs)


def _clones(tree):
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def why_not(leaves) -> str | None:
    """Why a call with these argument leaves is not precompiled for (None if it is)."""
    from sdkernels.kernels.utils import interpreting
    if getenv("SDKERNELS_PRECOMPILE", "1") == "0":
        return "SDKERNELS_PRECOMPILE=0"
    if interpreting():
        return "Triton's interpreter compiles nothing"
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves):
        return "no CUDA tensor among the inputs"
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "inside torch.compile tracing or a CUDA-graph capture"
    try:
        from triton import knobs
        knobs.runtime.jit_cache_hook  # noqa: B018  (Triton 3.4 and newer)
    except (ImportError, AttributeError):
        return "this Triton has no jit_cache_hook"
    return None


# ---- step 1: the dry call ---------------------------------------------------------------------------------------

class _Recorder:
    """Triton's jit_cache_hook: records each launch's compile request, hands it to ``on_new`` if it is not on disk,
    and tells Triton to skip the launch."""

    def __init__(self, on_new: Callable[[str, str, str], None] = lambda spec, module, kernel: None):
        self.kernels: dict = {}   # specialization data -> (module, qualified name) of the kernel
        self.on_disk: set = set()
        self.on_new = on_new

    def hook(self, *, fn, compile, **_) -> bool:
        spec = compile["specialization_data"]
        if spec not in self.kernels and spec not in self.on_disk:
            jit_fn = fn.jit_function
            if on_disk(jit_fn, compile, spec):
                self.on_disk.add(spec)
            else:
                self.kernels[spec] = (jit_fn.fn.__module__, jit_fn.fn.__qualname__)
                self.on_new(spec, *self.kernels[spec])
        return True


def on_disk(jit_fn, compile: dict, spec: str) -> bool:
    """Whether Triton's disk cache holds this compile: the lookup triton.compile makes before compiling, written
    against Triton 3.6 and 3.9; False wherever this Triton differs."""
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.compiler.compiler import ASTSource
        from triton.runtime.cache import get_cache_key, get_cache_manager
        from triton.runtime.driver import driver
        backend = jit_fn.device_caches[driver.active.get_current_device()][3]
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec)["options"].items()}
        src = ASTSource(jit_fn, compile["signature"], compile["constants"], compile["configs"][0])
        key = get_cache_key(src, backend, backend.parse_options(options), get_cache_invalidating_env_vars())
        name = f"{src.name[:150]}.json"
        group = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest()).get_group(name)
        return bool(group) and name in group
    except Exception:  # noqa: BLE001  (an internal API that moved: compile it to be sure)
        return False


def _autotuners() -> list:
    """Triton's autotuners among sdkernels' kernel modules that are loaded."""
    from triton.runtime.autotuner import Autotuner
    return [obj for name, mod in list(sys.modules.items()) if name.startswith("sdkernels.kernels.") and mod
            for obj in vars(mod).values() if isinstance(obj, Autotuner)]


@contextlib.contextmanager
def autotuners_launching_once():
    """Autotuners that launch each config once (timing none) and forget what they tuned on the way out."""
    from .compile_check import bench_once
    saved = [(t, dict(t.cache), getattr(t, "best_config", None), t.__dict__.get("do_bench")) for t in _autotuners()]
    for t, *_ in saved:
        t.__dict__["do_bench"] = bench_once  # do_bench is a cached_property: its value lives in the instance dict
    try:
        yield
    finally:
        for t, cache, best, bench in saved:
            t.cache.clear()
            t.cache.update(cache)
            t.best_config = best
            if bench is None:
                t.__dict__.pop("do_bench", None)
            else:
                t.__dict__["do_bench"] = bench


@contextlib.contextmanager
def dry_call(recorder: _Recorder):
    """Launches recorded and skipped, choices and autotuners calling each candidate once and keeping nothing."""
    from triton import knobs
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = recorder.hook
    try:
        with autotuners_launching_once(), tuning.dry_run(), torch.no_grad():
            yield
    finally:
        knobs.runtime.jit_cache_hook = previous


# ---- step 2: the workers ----------------------------------------------------------------------------------------

def _jobs() -> int:
    wanted = getenv("SDKERNELS_PRECOMPILE_JOBS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(wanted) if wanted else cores)


def _this_arch() -> list:
    """(compute capability, shared memory per block, SMs) of the current GPU: compile_check.Arch's fields."""
    from triton.runtime.driver import driver
    target = driver.active.get_current_target()
    if target.backend != "cuda":
        raise RuntimeError(f"the stand-in driver is for NVIDIA GPUs, not {target.backend}")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return [target.arch, props.shared_memory_per_block_optin, props.multi_processor_count]


class Workers:
    """Worker processes that compile kernels into Triton's disk cache while the dry call goes on: one more starts
    with each kernel added, up to ``jobs``, so that their start (importing torch, a few seconds) overlaps the dry
    call, and a call with one kernel to compile starts one. A task is a file the caller writes; a worker claims
    one by creating its claim file exclusively, and writes its result next to it (see _worker). After the dry call
    the caller claims tasks too, from the last one back: it has no start to wait for, and what it compiles is then
    in its memory as well (the VAE's 20 kernels took longer through starting workers alone than compiled in turn)."""

    def __init__(self, arch: list | None = None, jobs: int | None = None, here: bool = True):
        self.arch, self.jobs, self.here = arch, jobs, here
        self.dir = None
        self.procs, self.tasks = [], []
        self._stderr = None

    def add(self, spec: str, module: str, kernel: str) -> None:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="sdkernels-precompile-"))
            _write(self.dir / "arch.json", self.arch or _this_arch())
            self._stderr = open(self.dir / "stderr.txt", "wb")
        task = {"module": module, "kernel": kernel, "spec": spec}
        _write(self.dir / f"task-{len(self.tasks)}.json", task)
        self.tasks.append(task)
        if len(self.procs) < (self.jobs or _jobs()):
            self.procs.append(_forked(self.dir) if _start_method() == "fork" else self._spawned())

    def _spawned(self) -> subprocess.Popen:
        # the worker imports this sdkernels and this Triton, from wherever this process found them
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
        return subprocess.Popen([sys.executable, "-m", "sdkernels.precompile", str(self.dir)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def finish(self, report: Report) -> None:
        """Compile what no worker has taken, wait for the rest, stop the workers; count it all into the report."""
        report.workers = len(self.procs)
        if self.dir is None:
            return
        try:
            (self.dir / "end").touch()  # no more tasks: a worker that finds none left exits
            if self.here:
                for i in reversed(range(len(self.tasks))):
                    if _claim(self.dir, i):
                        report.compiled_here += 1
                        _write(self.dir / f"{i}.json", {"error": _compile_task(self.tasks[i], launcher=False)})
            results = [self.dir / f"{i}.json" for i in range(len(self.tasks))]
            deadline = time.monotonic() + WORKER_WAIT_S
            while (not all(r.exists() for r in results) and any(p.poll() is None for p in self.procs)
                   and time.monotonic() < deadline):
                time.sleep(WORKER_POLL_S)
            for proc in self.procs:  # all tasks done: the rest are still starting or looking for work
                if proc.poll() is None:
                    proc.terminate()
                proc.wait()
            for task, result in zip(self.tasks, results):
                error = json.loads(result.read_text())["error"] if result.exists() else "no worker finished it"
                if error is None:
                    report.compiled += 1
                else:
                    report.failed.append(f"{task['kernel']}: {error}")
            if report.failed:
                logger.debug("sdkernels.precompile workers' stderr:\n%s", (self.dir / "stderr.txt").read_text()[-4000:])
        finally:
            self._stderr.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def _claim(folder: Path, i: int) -> bool:
    """Whether this process took task i (a claim is a file created exclusively)."""
    try:
        os.close(os.open(folder / f"{i}.claim", os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _write(path: Path, obj) -> None:
    """Write JSON so that a reader sees the whole file or none (a rename is atomic)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def compile_in_workers(kernels: dict, report: Report, arch: list | None = None) -> None:
    """Compile {specialization data: (module, kernel name)} into Triton's disk cache in worker processes only, for
    ``arch`` (compile_check.Arch's fields; default: the current GPU's)."""
    workers = Workers(arch, here=False)
    for spec, (module, kernel) in kernels.items():
        workers.add(spec, module, kernel)
    workers.finish(report)


def _compile_task(task: dict, launcher: bool = True) -> str | None:
    """Compile one task (and, with ``launcher``, Triton 3.6's launcher for it); None, or why it failed."""
    try:
        kernel = getattr(importlib.import_module(task["module"]), task["kernel"]).preload(task["spec"])
    except Exception as e:  # noqa: BLE001  (the real call compiles it again and raises there)
        return f"{type(e).__name__}: {e}"[:300]
    if not launcher:
        return None
    try:  # Triton 3.6 builds a C launcher per signature, cached on disk: build it here too
        from triton.backends.nvidia.driver import CudaLauncher
        CudaLauncher(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001  (newer Triton has one launcher; the real call builds what is missing)
        pass
    return None


WORKER_POLL_S = 0.005
WORKER_WAIT_S = 60  # for the workers' last tasks once this process is done with its own (one compile takes seconds)


def _start_method() -> str:
    """"fork" (default where there is one): a worker is a copy of this process, with torch and the kernels already
    imported, started in a millisecond where a new interpreter takes seconds to import them (the VAE's 20 kernels
    compiled no sooner through spawned workers than one after another). It never touches CUDA, which is what makes a
    fork after CUDA's initialization unsafe. SDKERNELS_PRECOMPILE_START=spawn starts new interpreters instead."""
    wanted = getenv("SDKERNELS_PRECOMPILE_START")
    if wanted in ("fork", "spawn"):
        return wanted
    return "fork" if hasattr(os, "fork") and sys.platform == "linux" else "spawn"


class _Forked:
    """A forked worker, with the part of subprocess.Popen's interface Workers uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _forked(directory: Path) -> _Forked:
    importlib.import_module("sdkernels.compile_check")  # here, not in the child: no import lock to inherit
    with warnings.catch_warnings():  # Python 3.12 warns about forking a process with threads: see _start_method
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return _Forked(pid)
    try:  # the child: compile, and leave without running this process's exit handlers (CUDA's among them)
        _worker(str(directory))
        code = 0
    except BaseException:  # noqa: BLE001
        code = 1
    os._exit(code)


def _worker(directory: str) -> None:
    """Take the tasks no other worker has claimed, in order, until the caller says there are no more."""
    from triton import knobs

    from .compile_check import Arch, set_target
    if hasattr(os, "nice"):
        os.nice(5)  # behind the caller, whose dry call records the kernels these workers wait for
    folder = Path(directory)
    set_target(Arch(*json.loads((folder / "arch.json").read_text())))
    knobs.runtime.jit_cache_hook = None
    i = 0
    while True:
        task = folder / f"task-{i}.json"
        if not task.exists():
            if (folder / "end").exists() and not task.exists():  # the caller writes every task before "end"
                return
            time.sleep(WORKER_POLL_S)
            continue
        if not _claim(folder, i):
            i += 1
            continue
        _write(folder / f"{i}.json", {"error": _compile_task(json.loads(task.read_text()))})
        i += 1


# ---- all three steps --------------------------------------------------------------------------------------------

def precompile(call: Callable[[], object]) -> Report:
    """Run ``call`` dry, compiling the Triton kernels it launches in worker processes as they are recorded (see the
    module docstring); the caller then makes the real call."""
    report, workers = Report(), Workers()
    recorder = _Recorder(on_new=workers.add)
    start = time.perf_counter()
    try:
        with dry_call(recorder):
            call()
    except Exception as e:  # noqa: BLE001  (the real call that follows raises what is the caller's to see)
        report.error = f"the dry call raised {type(e).__name__}: {e}"[:300]
    report.dry_s = time.perf_counter() - start
    report.recorded, report.on_disk = len(recorder.kernels) + len(recorder.on_disk), len(recorder.on_disk)
    report.kernels = sorted(name for _, name in recorder.kernels.values())
    report.specs = list(recorder.kernels)
    try:
        workers.finish(report)
    except Exception as e:  # noqa: BLE001
        report.error = f"the workers failed: {type(e).__name__}: {e}"[:300]
    report.compile_s = time.perf_counter() - start - report.dry_s
    logger.info("%s", report)
    return report


if __name__ == "__main__":
    _worker(sys.argv[1])
