#!/usr/bin/env bash
# Probe (GPU): the two-kernel CUDA GroupNorm plan's block count, via SDKERNELS_GN_PLAN="rows,blocks_per_sm" (the
# rows per thread it aims at, the blocks per SM it allows; default 4,4), at the SD1.5 UNet shapes, CUDA backend forced.
set -uo pipefail
cd "$(dirname "$0")/.."
for knobs in ${KNOBS:-2,4 4,4 2,8 1,8}; do
  echo "== SDKERNELS_GN_PLAN=$knobs"
  SDKERNELS_GN_PLAN=$knobs SDKERNELS_BACKEND=group_norm=cuda python3 bench/bench_group_norm.py --models sd15 --quick \
    --out "${OUT:-.out}/gn_plan_${knobs/,/_}.json" 2>&1 | grep -E "^B=2.*layout=cl " | awk '{print $1, $6}'
done
