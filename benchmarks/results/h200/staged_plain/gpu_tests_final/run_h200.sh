#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader > $OUT/env.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu test/test_gpu.py -k "staged or graph_tokens" -rA > $OUT/gpu_tests.log 2>&1
echo "test_gpu rc=$?" >> $OUT/gpu_tests.log
timeout 150 python3 -m pytest -q -p no:cacheprovider test/test_quant.py >> $OUT/gpu_tests.log 2>&1
echo "test_quant rc=$?" >> $OUT/gpu_tests.log
grep -E "passed|failed|rc=|FAILED|Error" $OUT/gpu_tests.log | tail -12
cd benchmarks/experiments && timeout 150 python3 kernels_in_graph.py triton_down --out $OUT 2>&1 | grep -v -i warn | sort -k4 -n | head -12
