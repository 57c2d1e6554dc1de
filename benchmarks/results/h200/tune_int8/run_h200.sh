#!/bin/bash
# This record's run on the H200, from the repository root: bash run_h200.sh OUT_DIR
# (with the GPU checks of ../ttft_qgemm_right's final code first, in the same session)
set -u
OUT=${1:?usage: run_h200.sh OUT_DIR}
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $OUT/env.txt 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu test/test_gpu.py test/test_qgemm.py \
  test/test_prefill_graphs.py -k "graph_tokens_equal or qgemm or prefill" -rA > $OUT/gpu_tests.log 2>&1
timeout 60 python3 benchmarks/experiments/qgemm_right_check.py > $OUT/check.log 2>&1
cp $SHIPPED $W/nvidia-h200.json
# qwen2.5-7b's int8 rows measured again with the wide set and a budget that reaches every shape
cd $W && timeout -s INT 230 python3 -m decode_monitor.bench tune qwen2.5-7b --weights int8 \
  --candidates wide --restart --budget-s 190 -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --models qwen2.5-7b"
timeout -s INT 100 $B --weights bf16 int8 --sessions 2 --kernel-configs $W/nvidia-h200.json -o $W/bench_new > $W/bench.log 2>&1
echo "bench_new rc=$?" >> $W/bench.log
timeout -s INT 50 $B --weights int8 --sessions 1 --kernel-configs $SHIPPED -o $W/bench_old >> $W/bench.log 2>&1
echo "bench_old rc=$?" >> $W/bench.log
rm -rf $W/cache $W/bench_*/*.png $W/bench_*/*.svg
cp -r $W/bench_new $W/bench_old $W/tune.log $W/bench.log $W/nvidia-h200.json $OUT/ 2>/dev/null
tail -1 $OUT/gpu_tests.log; grep "M=" $OUT/check.log; grep -c "regs" $OUT/check.log
grep -h "^| qwen2.5-7b" $W/bench_new/report.md $W/bench_old/report.md | cut -c1-110 | head -12
