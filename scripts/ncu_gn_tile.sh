#!/usr/bin/env bash
# Nsight Compute (GPU) on GroupNorm's kernels, one call per layout and shape: duration, DRAM bytes and throughput,
# L2 hit rate, L1 sectors per request, occupancy, the top warp stall reasons. First asked for why the Triton tile
# takes ~1.5x as long in channels_last as in NCHW for the same group (2x320x32x32: 5.9 against 3.8 us, H200,
# bench/NOTES.md session 26); BACKEND=cuda KERNEL=gn_ profiles the CUDA backend's two kernels (the VAE's shapes).
#   [BACKEND=triton] [KERNEL=_tile_kernel] [LAYOUTS="cl nchw"] bash scripts/ncu_gn_tile.sh [B,C,H,W;...]
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPES=${1:-"2,320,32,32;2,640,16,16"}
BACKEND=${BACKEND:-triton}; KERNEL=${KERNEL:-_tile_kernel}; LAYOUTS=${LAYOUTS:-"cl nchw"}
OUT=${OUT:-.out}; mkdir -p "$OUT"
stalls=smsp__average_warps_issue_stalled
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,\
dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,\
launch__block_size,lts__t_sectors_srcunit_tex_op_read.sum,\
l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,\
l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_st.sum,\
${stalls}_long_scoreboard_per_issue_active.ratio,${stalls}_barrier_per_issue_active.ratio,\
${stalls}_lg_throttle_per_issue_active.ratio,${stalls}_mio_throttle_per_issue_active.ratio,\
${stalls}_membar_per_issue_active.ratio,${stalls}_short_scoreboard_per_issue_active.ratio,\
smsp__average_warp_latency_per_inst_issued.ratio,smsp__inst_executed.sum
for layout in $LAYOUTS; do
  IFS=';' read -ra shapes <<< "$SHAPES"
  for shape in "${shapes[@]}"; do
    echo "== $BACKEND $layout $shape"
    # Clocks left as they are (the device notes: ncu's default locks them to base, which slows short kernels).
    ncu --clock-control none --kernel-name "regex:$KERNEL" --launch-skip 4 --launch-count 2 --metrics "$metrics" \
      --csv python3 - "$layout" "$shape" "$BACKEND" <<'PY' 2>&1 | grep -v "^==PROF==" \
      | tee -a "$OUT/ncu_gn_${BACKEND}.csv" | awk -F'","' 'NR>1 {print substr($5, 1, 28), $(NF-2), $NF}' | sed 's/"//g'
import sys
import torch
import sdkernels
layout, shape, backend = sys.argv[1], tuple(int(v) for v in sys.argv[2].split(",")), sys.argv[3]
x = torch.randn(shape, device="cuda", dtype=torch.float16)
if layout == "cl":
    x = x.to(memory_format=torch.channels_last)
w, b = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
with sdkernels.use_backend(backend, op="group_norm", strict=True):
    for _ in range(8):
        sdkernels.group_norm(x, 32, w, b, 1e-5, True)
torch.cuda.synchronize()
PY
  done
done
