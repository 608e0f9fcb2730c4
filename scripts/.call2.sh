export TEST_JOBS=8 TEST_TIMEOUT_S=400 TEST_TAIL=3
bash scripts/gpu_lane.sh build > $OUT/build.log 2>&1
SANITIZE_MATCH=add_layer_norm SANITIZE_TIMEOUT_S=60 bash scripts/gpu_lane.sh sanitize > $OUT/san.log 2>&1
PYTEST_ARGS="tests/test_patch.py tests/test_pipeline.py tests/test_graphs.py tests/test_transformer_block_patch.py tests/test_layer_norm_patch.py tests/test_transformer_layout.py tests/test_step_choice.py tests/test_call_path.py tests/test_projections.py tests/test_conv3x3_patch.py tests/test_attention_processor.py tests/test_bench_cli.py tests/test_profile.py tests/test_add_layer_norm.py" bash scripts/gpu_lane.sh test > $OUT/test.log 2>&1
tail -3 $OUT/san.log; grep -E "^== |passed|failed|FAILED|ERROR|WARNING" $OUT/test.log | tail -60
