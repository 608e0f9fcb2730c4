"""Builds the optional CUDA extension ``sdkernels._C`` ahead of time when torch has CUDA and nvcc is present.

    pip install --no-build-isolation .        # builds against the installed torch
    SDKERNELS_SKIP_CUDA_BUILD=1 pip install . # never builds it (it then compiles on first use, if it can)
    TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=4 # the usual torch.utils.cpp_extension knobs
"""
import glob
import os
import sys

from setuptools import setup


def cuda_extension():
    if os.environ.get("SDKERNELS_SKIP_CUDA_BUILD") == "1":
        return [], {}, "SDKERNELS_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable at build time (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return [], {}, "this torch has no CUDA"
    if CUDA_HOME is None:
        return [], {}, "nvcc not found (set CUDA_HOME)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        "sdkernels._C", sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    print(f"sdkernels: not building the CUDA extension ahead of time: {skipped}", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
