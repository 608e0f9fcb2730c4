#!/usr/bin/env bash
# Runs scripts/probe_attention.py over head dims, chunkings, tile configs and masks, one process each, PROBE_JOBS
# at a time (a memory error ends only its own process; compiling in parallel saves device time). PROBE_SANITIZE=1
# runs each under compute-sanitizer memcheck, which reports out-of-range shared reads that may not change results.
cd "$(dirname "$0")/.."
probe() {
  local prefix=()
  [ "${PROBE_SANITIZE:-0}" = 1 ] && prefix=(compute-sanitizer --tool memcheck --error-exitcode 3)
  timeout 150 "${prefix[@]}" python3 scripts/probe_attention.py "$@" 2>&1 \
    | grep -E "^probe|Error:|ERROR SUMMARY: [1-9]|Invalid|Out-of-range" | sort -u | head -3 | sed "s/^/[$*] /"
}
export -f probe
grep -v '^#' <<'CASES' | xargs -P ${PROBE_JOBS:-6} -L 1 bash -c 'probe "$@"' _
# the kernels' own choices (two-chunk head dims fold the tail into the key loop)
40 fp16 32,16 128,128,8,3
40 fp16 32,16 64,64,4,3 keys
40 bf16 32,16 128,128,8,3
64 fp16 64,0 64,64,4,3 keys
64 fp16 64,0 128,128,8,3
80 fp16 64,16 64,64,4,3
80 fp16 64,16 64,64,4,3 keys
80 fp16 64,16 128,64,8,3 full
80 bf16 64,16 128,64,8,3
128 fp16 128,0 128,64,8,2
160 fp16 128,32 128,64,8,2
160 fp16 128,32 128,64,8,2 keys
160 bf16 128,32 64,64,4,2 full
# head dim 40's second chunk overlapping the first (OVERLAP_LAST_CHUNK), an experiment for speed
40 fp16 32,16 128,128,8,3 - overlap
40 fp16 32,16 64,64,4,3 keys overlap
40 bf16 32,16 128,64,8,3 full overlap
# the partial block after the loop, which went wrong at 80 and 160 (kept to see a Triton fix)
80 fp16 64,16 64,64,4,3 - tail-after
160 fp16 128,32 128,64,8,2 - tail-after
CASES
