export TEST_JOBS=8 TEST_TIMEOUT_S=420 TEST_TAIL=3
bash scripts/gpu_lane.sh build > $OUT/build.log 2>&1
export PYTHONPATH=/tmp/site
python3 bench/bench_attention.py --sweep --sweep-dims 64 > $OUT/sweep64.log 2>&1; grep "==" $OUT/sweep64.log
PYTEST_ARGS="tests/test_attention.py tests/test_conv3x3_winograd.py tests/test_conv3x3_tma.py tests/test_group_norm.py tests/test_linear_geglu.py tests/test_resnet_block.py tests/test_geglu.py tests/test_tuning.py tests/test_banded.py tests/test_bias_add.py tests/test_pointwise_conv.py tests/test_triton_compile_sm90.py tests/test_csrc_compile.py tests/test_kernel_sources.py" bash scripts/gpu_lane.sh test > $OUT/test.log 2>&1
grep -E "^== |passed|failed|FAILED|ERROR|WARNING" $OUT/test.log | tail -60
