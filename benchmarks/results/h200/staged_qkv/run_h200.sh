#!/bin/bash
# staged q/k/v (staged_qkv.py): GPU tests; each kernel alone in a graph of 28; tune qwen2.5-7b's
# and llama-3-8b's (= mistral-7b's shape) int8 / int4 q/k/v rows with the staged candidates;
# bench with that table and with the shipped one
set -u
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider test/test_quant.py -k "staged or qkv" -rA > $W/gpu_tests.log 2>&1
echo "tests rc=$?" >> $W/gpu_tests.log
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu test/test_gpu.py -k "staged_rows" -rA >> $W/gpu_tests.log 2>&1
echo "gpu tests rc=$?" >> $W/gpu_tests.log
grep -h "passed\|failed\|rc=" $W/gpu_tests.log | tail -4
timeout 150 python3 benchmarks/experiments/kernels_in_graph.py staged_qkv --out $W > $W/kernels_in_graph.log 2>&1
echo "kig rc=$?" >> $W/kernels_in_graph.log
grep "qkv" $W/kernels_in_graph.log
python3 - $SHIPPED $W/nvidia-h200.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data['gemv'] = [r for r in data['gemv'] if not (r['weights'] in ('int8', 'int4') and r['kind'] == 'qkv')]
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
cd $W && timeout -s INT 200 python3 -m decode_monitor.bench tune qwen2.5-7b llama-3-8b --weights int8 int4 \
  --candidates small --budget-s 170 -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
grep "qkv int" $W/tune.log
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --weights bf16 int8 int4"
timeout -s INT 110 $B --models qwen2.5-7b --sessions 2 --kernel-configs $W/nvidia-h200.json -o $W/qwen_tuned > $W/bench.log 2>&1
echo "qwen_tuned rc=$?" >> $W/bench.log
timeout -s INT 110 $B --models qwen2.5-7b --sessions 2 --kernel-configs $SHIPPED -o $W/qwen_shipped >> $W/bench.log 2>&1
echo "qwen_shipped rc=$?" >> $W/bench.log
timeout -s INT 70 $B --models llama-3-8b --sessions 1 --kernel-configs $W/nvidia-h200.json -o $W/llama_tuned >> $W/bench.log 2>&1
echo "llama_tuned rc=$?" >> $W/bench.log
timeout -s INT 70 $B --models llama-3-8b --sessions 1 --kernel-configs $SHIPPED -o $W/llama_shipped >> $W/bench.log 2>&1
echo "llama_shipped rc=$?" >> $W/bench.log
rm -rf $W/cache $W/*/*.png $W/*/*.svg
tar czf $OUT/qkv.tgz -C $W .
for d in qwen_tuned qwen_shipped llama_tuned llama_shipped; do echo "== $d"; grep -h "^| [qlm]" $W/$d/report.md | grep -v "FAIL\|pass" | cut -c1-100; done
