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
40 fp16 32,16 128,128,8,3
40 fp16 32,16 64,64,4,3 keys
40 fp16 32,16 64,64,4,3 full
40 bf16 32,16 128,128,8,3
64 fp16 64,0 64,64,4,3 keys
80 fp16 64,16 64,64,4,3
80 fp16 64,16 64,64,4,3 - fold-tail
80 fp16 64,16 64,64,4,3 - tail-first
80 fp16 64,16 64,64,4,2
80 fp16 64,16 64,64,4,1
80 fp16 128,0 64,64,4,3
80 fp16 64,16 64,64,4,3 keys
80 fp16 64,16 128,64,8,3 full
160 fp16 128,32 128,64,8,2
160 fp16 128,32 128,64,8,2 - fold-tail
160 fp16 128,32 128,64,8,2 - tail-first
64 fp16 64,0 64,64,4,3
64 fp16 64,0 128,128,8,3
160 fp16 128,32 128,64,8,1
160 fp16 256,0 64,64,4,2
CASES
