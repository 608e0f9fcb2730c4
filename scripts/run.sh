#!/usr/bin/env bash
# The main job: every benchmark (bench/bench_*.py), writing bench/results/*.json. Without a GPU the Triton kernels
# run on the CPU in the interpreter at tiny sizes, as a correctness smoke run whose times are not speed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "${TRITON_INTERPRET:-0}" = "1" ]; then
  echo "run.sh: no GPU here: running the kernels in Triton's interpreter at tiny sizes (timings are not speed)"
fi
for script in bench/bench_*.py; do
  echo "== $script"
  "$PY" "$script" "$@"
done
