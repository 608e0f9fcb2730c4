#!/usr/bin/env bash
# The tests. No GPU: the CPU lane (Triton kernels in the interpreter at small sizes, references, dispatch,
# patching, CUDA sources compiled for sm_80/sm_90). With a GPU: the GPU lane too (every backend at SD sizes).
# Extra arguments go to pytest. Without them, the CPU lane runs its files in one pytest process per core (at most
# TEST_SHARDS, default 2; tests/conftest.py deals the files out), each on one thread, and prints each shard's log.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
shards=1
if [ $# -eq 0 ] && [ "${TRITON_INTERPRET:-0}" = 1 ]; then
  shards=$(( $(nproc) < ${TEST_SHARDS:-2} ? $(nproc) : ${TEST_SHARDS:-2} ))
fi
if [ "$shards" -le 1 ]; then
  exec "$PY" -m pytest -q -rs -p no:cacheprovider "$@" tests
fi
logs=$(mktemp -d); pids=()
for ((i = 0; i < shards; i++)); do
  SDKERNELS_TEST_SHARD=$i/$shards OMP_NUM_THREADS=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests \
    > "$logs/$i.log" 2>&1 & pids+=($!)
done
status=0
for ((i = 0; i < shards; i++)); do
  wait "${pids[$i]}" || status=1
  echo "=== shard $i/$shards"; cat "$logs/$i.log"
done
rm -rf "$logs"
exit $status
