#!/usr/bin/env bash
# Runs scripts/probe_attention.py over head dims, chunkings and tile configs, one process each.
cd "$(dirname "$0")/.."
while read -r d dt chunks cfg; do
  timeout 60 python3 scripts/probe_attention.py "$d" "$dt" "$chunks" "$cfg" 2>&1 | grep -E "^probe|Error:" | head -2 \
    | sed "s/^/[$d $dt $chunks $cfg] /"
done <<'CASES'
40 fp16 32,16 64,128,4,3
40 fp16 32,16 64,128,4,1
40 fp16 32,16 128,128,8,3
40 fp16 32,16 64,64,4,2
40 fp16 64,0 64,128,4,3
40 fp16 64,0 128,128,8,3
64 fp16 64,0 64,128,4,3
64 fp16 64,0 128,128,8,3
80 fp16 64,16 64,64,4,3
80 fp16 64,16 128,64,8,3
128 fp16 128,0 128,64,8,3
160 fp16 128,32 128,64,8,2
40 bf16 32,16 128,128,8,3
CASES
