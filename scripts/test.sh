#!/usr/bin/env bash
# The tests. No GPU: the CPU lane (Triton kernels in the interpreter at small sizes, references, dispatch,
# patching, CUDA sources compiled for sm_80/sm_90). With a GPU: the GPU lane too (every backend at SD sizes).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
"$PY" -m pytest -q -rs -p no:cacheprovider "$@" tests
