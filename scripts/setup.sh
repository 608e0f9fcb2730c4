# Sourced by scripts/test.sh and scripts/run.sh: installs what is missing, then this checkout of sdkernels.
# Never replaces an installed torch (a CUDA torch stays CUDA); on a machine with no torch it installs 2.13.0.
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
have() { "$PY" -c "import $1" 2>/dev/null; }

have torch || pip_install "torch==2.13.0"
missing=()
have triton || missing+=(triton)
have diffusers || missing+=("diffusers>=0.27")
have transformers || missing+=(transformers)  # the demo and the whole-pipeline tests (CLIP text encoders)
have peft || missing+=(peft)  # the LoRA tests: diffusers loads LoRA adapters through peft
have hypothesis || missing+=(hypothesis)
have pytest || missing+=(pytest)
have numpy || missing+=(numpy)
have ninja || missing+=(ninja)        # the CUDA extension's build (ahead of time or on first use)
have pybind11 || missing+=(pybind11)
"$PY" -c "import setuptools, wheel" 2>/dev/null || missing+=(setuptools wheel)
if [ ${#missing[@]} -gt 0 ]; then pip_install "${missing[@]}"; fi
# This checkout, editable, built against the torch above (the CUDA extension only where torch has CUDA).
pip_install --no-build-isolation --no-deps -e .
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
