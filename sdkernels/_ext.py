"""The optional CUDA C++ extension: the one built ahead of time (``sdkernels._C``), else compiled on first use with
torch.utils.cpp_extension and cached. Importing sdkernels never fails because of it; ``unavailable_reason()`` says
why it cannot be used, and ``python -m sdkernels.info`` prints that."""
from __future__ import annotations

import os
import shutil
import sys
from importlib import resources

import torch

from ._env import cache_dir

_module = None
_reason = None
_tried = False
# While sdkernels.replay records an op call: the recorder, which runs and records each extension call
recorder = None


def sources() -> list:
    """The .cu and .cpp files of the extension, from the installed package (or the repo's csrc/)."""
    root = resources.files("sdkernels") / "csrc"
    if not root.is_dir():
        root = resources.files("sdkernels").joinpath("..", "csrc")
    return sorted(str(p) for p in root.iterdir() if p.name.endswith((".cu", ".cpp")))


def _jit_build():
    from torch.utils.cpp_extension import load
    build_dir = os.path.join(cache_dir(), f"torch{torch.__version__}-cuda{torch.version.cuda}")
    os.makedirs(build_dir, exist_ok=True)
    print(f"sdkernels: compiling the CUDA extension for this GPU into {build_dir} (once; cached)", file=sys.stderr)
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return load(name="sdkernels_C_jit", sources=sources(), build_directory=build_dir,
                extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17"], extra_cflags=["-O3", "-std=c++17"],
                verbose=False)


class _Checked:
    """The extension's functions, raising RuntimeError with the message a function returns when its checks fail (the
    binding returns it rather than throwing a C++ exception into Python)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        function = getattr(self._module, name)

        def call(*args, **kwargs):
            if recorder is not None:
                return recorder.extension_call(call, function, args, kwargs)
            error = function(*args, **kwargs)
            if error:
                raise RuntimeError(error)

        call.__name__ = call.__qualname__ = name
        setattr(self, name, call)  # looked up once
        return call


def load():
    """The extension's functions (``load().winograd_conv3x3(...)``); raises RuntimeError with the reason when the
    extension cannot be had."""
    global _module, _reason, _tried
    if _tried:
        if _module is None:
            raise RuntimeError(f"sdkernels CUDA extension unavailable: {_reason}")
        return _module
    _tried = True
    try:
        from . import _C  # built by setup.py
        _module = _Checked(_C)
        return _module
    except ImportError as e:
        aot_error = e
    if not torch.cuda.is_available():
        _reason = "no CUDA device (the extension was not built ahead of time: %s)" % aot_error
    elif torch.version.cuda is None:
        _reason = "this torch has no CUDA"
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        _reason = "not built ahead of time and no nvcc to compile it on first use"
    elif os.environ.get("SDKERNELS_NO_JIT") == "1":
        _reason = "not built ahead of time and SDKERNELS_NO_JIT=1"
    else:
        try:
            _module = _Checked(_jit_build())
            return _module
        except Exception as e:  # a failed compile must not break import or the other backends
            _reason = f"compiling on first use failed: {type(e).__name__}: {str(e)[-2000:]}"
    raise RuntimeError(f"sdkernels CUDA extension unavailable: {_reason}")


def unavailable_reason():
    """None when the extension can be used, else why not (compiles it on first call where it can)."""
    try:
        load()
        return None
    except RuntimeError:
        return _reason


def built_ahead_of_time() -> bool:
    try:
        from . import _C  # noqa: F401
        return True
    except ImportError:
        return False
