#!/bin/bash
# staged o_proj / down_proj rows for int8 and int4: GPU tests; tune qwen2.5-7b's and
# llama-3-8b's (= mistral-7b's shapes) int8 / int4 o_proj and down rows with the staged
# candidates; bench with that table and with the shipped one
set -u
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider test/test_quant.py -k "staged" -rA > $W/gpu_tests.log 2>&1
echo "tests rc=$?" >> $W/gpu_tests.log
tail -2 $W/gpu_tests.log
python3 - $SHIPPED $W/nvidia-h200.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
plain = {(3584, 3584), (3584, 18944), (4096, 4096), (4096, 14336)}
data['gemv'] = [r for r in data['gemv'] if not (r['weights'] in ('int8', 'int4') and r['kind'] == 'gemv' and (r['n'], r['k']) in plain)]
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
cd $W && timeout -s INT 200 python3 -m decode_monitor.bench tune qwen2.5-7b llama-3-8b --weights int8 int4 \
  --candidates small --budget-s 170 -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
grep "gemv int" $W/tune.log
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --weights bf16 int8 int4"
timeout -s INT 110 $B --models qwen2.5-7b --sessions 2 --kernel-configs $W/nvidia-h200.json -o $W/qwen_tuned > $W/bench.log 2>&1
echo "qwen_tuned rc=$?" >> $W/bench.log
timeout -s INT 110 $B --models qwen2.5-7b --sessions 2 --kernel-configs $SHIPPED -o $W/qwen_shipped >> $W/bench.log 2>&1
echo "qwen_shipped rc=$?" >> $W/bench.log
timeout -s INT 130 $B --models llama-3-8b mistral-7b --sessions 1 --kernel-configs $W/nvidia-h200.json -o $W/llama_mistral_tuned >> $W/bench.log 2>&1
echo "llama_mistral_tuned rc=$?" >> $W/bench.log
timeout -s INT 130 $B --models llama-3-8b mistral-7b --sessions 1 --kernel-configs $SHIPPED -o $W/llama_mistral_shipped >> $W/bench.log 2>&1
echo "llama_mistral_shipped rc=$?" >> $W/bench.log
rm -rf $W/cache $W/*/*.png $W/*/*.svg
tar czf $OUT/ship.tgz -C $W .
for d in qwen_tuned qwen_shipped llama_mistral_tuned llama_mistral_shipped; do echo "== $d"; grep -h "^| [qlm]" $W/$d/report.md | grep -v "FAIL\|pass" | cut -c1-100; done
