#!/usr/bin/env bash
# Nsight Compute (GPU) on GroupNorm's Triton tile kernel at the same group in both layouts: why the channels_last
# tile takes ~1.5x the NCHW one (2x320x32x32: 5.9 against 3.8 us, H200, bench/NOTES.md session 26). Prints, per
# layout and shape, duration, DRAM and L2 throughput, L1 sectors per request, the top warp stall reasons.
#   bash scripts/ncu_gn_tile.sh [shapes as B,C,H,W;...]          (default 2,320,32,32;2,640,16,16)
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPES=${1:-"2,320,32,32;2,640,16,16"}
OUT=${OUT:-.out}; mkdir -p "$OUT"
stalls=smsp__average_warps_issue_stalled
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_srcunit_tex_op_read.sum,\
l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,\
l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_st.sum,\
${stalls}_long_scoreboard_per_issue_active.ratio,${stalls}_barrier_per_issue_active.ratio,\
${stalls}_lg_throttle_per_issue_active.ratio,${stalls}_mio_throttle_per_issue_active.ratio,\
smsp__average_warp_latency_per_inst_issued.ratio
for layout in cl nchw; do
  IFS=';' read -ra shapes <<< "$SHAPES"
  for shape in "${shapes[@]}"; do
    echo "== $layout $shape"
    ncu --kernel-name regex:_tile_kernel --launch-skip 2 --launch-count 1 --metrics "$metrics" --csv \
      python3 - "$layout" "$shape" <<'PY' 2>&1 | grep -v "^==PROF==" | tee -a "$OUT/ncu_gn_tile.csv" \
      | cut -d, -f12- | tail -14
import sys
import torch
import sdkernels
layout, shape = sys.argv[1], tuple(int(v) for v in sys.argv[2].split(","))
x = torch.randn(shape, device="cuda", dtype=torch.float16)
if layout == "cl":
    x = x.to(memory_format=torch.channels_last)
w, b = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
with sdkernels.use_backend("triton", op="group_norm", strict=True):
    for _ in range(4):
        sdkernels.group_norm(x, 32, w, b, 1e-5, True)
torch.cuda.synchronize()
PY
  done
done
