"""Every Triton kernel compiles for real GPUs (sm_90, and sm_80) with the launch choices its launcher makes there,
checked on a machine without a GPU: Triton's interpreter, which runs the rest of the CPU lane, never runs the GPU
compiler, so errors only it raises (a loop-carried variable that changes type, a kernel reading a non-constexpr
global, shared memory over the GPU's limit) would otherwise first show on a GPU. See sdkernels/compile_check.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="CPU lane only: on a GPU the GPU tests compile every kernel for real (and the GPU machine's "
                           "Triton 3.6 rejects this cross-compile's pass options)")
def test_every_kernel_compiles_for_sm90_and_sm80():
    # A fresh process: this one imported the kernels under the interpreter (conftest sets TRITON_INTERPRET=1).
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "sdkernels.compile_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    report = [line for line in proc.stdout.splitlines() if not line.startswith("[")]  # all but the per-variant lines
    print("\n".join(report))
    assert proc.returncode == 0, "\n".join(report + proc.stderr.splitlines()[-40:])
