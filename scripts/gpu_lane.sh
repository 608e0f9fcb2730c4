#!/usr/bin/env bash
# One call on the GPU machine (device tool): build, run the whole test suite on the GPU, check every kernel
# under compute-sanitizer, run the benchmarks. Logs and results go to $OUT (default .out/).
#   bash scripts/gpu_lane.sh [build] [sanitize] [test] [bench]      (default: all four, in this order)
# Test or bench arguments: PYTEST_ARGS="tests/test_group_norm.py tests/test_geglu.py" BENCH=bench/bench_group_norm.py BENCH_ARGS=--quick
# memcheck on several GPUs at once: SANITIZE_GPUS=0,1,2,3 (one process a GPU, the case families dealt out in turn).
# diffusers is not on that machine: carry .whl/ (bash ../shared/device/prepare.sh puts its wheels there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT"
steps=${*:-build sanitize test bench}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
LOG="$OUT/lane.log"
step() { echo; echo "=== $1 ($(date +%T))"; }
exec > >(tee -a "$LOG") 2>&1  # one log of everything (the device returns few files)

if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [[ $steps == *build* ]]; then
  step build
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
  python3 -m sdkernels.info
fi

if [[ $steps == *sanitize* ]]; then
  # First: a memory error found here names its kernel and case, where in the tests it would poison every later test.
  step sanitize
  # SANITIZE_GPUS=0,1,2,3: one process a GPU, each taking its share of the case families (SANITIZE_SHARD).
  IFS=, read -ra sgpus <<< "${SANITIZE_GPUS:-${SANITIZE_GPU:-${CUDA_VISIBLE_DEVICES:-0}}}"
  pids=()
  for i in "${!sgpus[@]}"; do
    SANITIZE_SHARD="$i/${#sgpus[@]}" CUDA_VISIBLE_DEVICES=${sgpus[$i]} timeout ${SANITIZE_TIMEOUT_S:-420} \
      compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
      python3 scripts/sanitize_kernels.py > "$OUT/sanitize.$i.log" 2>&1 &
    pids+=($!)
  done
  rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  cat "$OUT"/sanitize.[0-9]*.log > "$OUT/sanitize.log"; rm -f "$OUT"/sanitize.[0-9]*.log
  grep -v "^=========     " "$OUT/sanitize.log" | tail -40
  # The tail alone says nothing of earlier cases when a time limit cuts the run before its summary: count them.
  echo "memcheck: $(grep -vc '^=' "$OUT/sanitize.log") case lines, $(grep -c '^========= \(Invalid\|Program hit\)' \
    "$OUT/sanitize.log") error reports"; grep -m 20 "^========= \(Invalid\|Program hit\)" "$OUT/sanitize.log"
  [ "$rc" = 0 ] || { echo "SANITIZER FAILED rc=$rc"; status=1; }
fi

if [[ $steps == *test* ]]; then
  step test
  # One pytest process per test file, TEST_JOBS at a time: a CUDA error in one file cannot fail another, and the
  # files compile their kernels in parallel on the machine's cores. Each file's log is appended to $OUT/tests.log as
  # soon as the file finishes (one file: the device returns only a few), so a call cut off by its time limit still
  # returns the files that finished; the per-file logs stay off $OUT.
  LOGS=$(mktemp -d); : > "$OUT/tests.log"; export TESTS_LOG="$OUT/tests.log"
  # On a machine of several GPUs each job slot takes one of TEST_GPUS (default: all of them) in turn.
  TEST_GPUS=${TEST_GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -)}
  run_file() {
    log="$LOGS/$(basename "$1" .py).log"
    IFS=, read -ra gpus <<< "${TEST_GPUS:-0}"
    CUDA_VISIBLE_DEVICES=${gpus[$(( ${SLOT:-0} % ${#gpus[@]} ))]} \
      timeout ${TEST_TIMEOUT_S:-300} python3 -m pytest -q -rs -p no:cacheprovider --durations=5 "$1" > "$log" 2>&1
    echo "rc=$?" >> "$log"
    flock "$TESTS_LOG" bash -c 'echo "== $1"; cat "$2"' _ "$1" "$log" >> "$TESTS_LOG"  # whole, not interleaved
  }
  export -f run_file; export LOGS TEST_TIMEOUT_S TEST_GPUS
  # The longest files first (tests/durations.json; files it does not know count as long), so that none starts last.
  python3 -c 'import json, os, sys; t = json.load(open("tests/durations.json"))["gpu_lane"]
print("\n".join(sorted(sys.argv[1:], key=lambda f: -t.get(os.path.basename(f)[:-3], 1e9))))' \
    $(ls ${PYTEST_ARGS:-tests/test_*.py}) | xargs -P ${TEST_JOBS:-6} --process-slot-var=SLOT -I{} bash -c 'run_file {}'
  for file in ${PYTEST_ARGS:-tests/test_*.py}; do
    log="$LOGS/$(basename "$file" .py).log"
    echo "== $file"; tail -${TEST_TAIL:-15} "$log"
    rc=$(tail -1 "$log"); [ "$rc" = rc=0 ] || { echo "TESTS FAILED: $file $rc"; status=1; }
  done
  # The GPU lane must run its GPU tests, not skip them.
  if grep -q "needs a CUDA GPU" "$OUT/tests.log"; then echo "GPU LANE ERROR: GPU tests were skipped"; status=1; fi
  # A module missing on this machine skips its tests (diffusers: carry .whl/; transformers and peft are installed
  # there): that is GPU tests not run, so the lane fails and says which.
  if grep -h "SKIPPED.*could not import\|SKIPPED.*is not installed" "$OUT/tests.log" | sed 's/^/GPU LANE ERROR: /' \
      | grep .; then status=1; fi

fi

if [[ $steps == *bench* ]]; then
  step bench
  for script in ${BENCH:-bench/bench_*.py}; do
    [ -f "$script" ] || continue
    name=$(basename "$script" .py); name=${name#bench_}
    echo "== $script"
    python3 "$script" ${BENCH_ARGS:-} --out "$OUT/$name.json" || status=1
  done
fi
echo; echo "=== gpu_lane done: status $status"
exit $status
