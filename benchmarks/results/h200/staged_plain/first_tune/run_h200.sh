#!/bin/bash
# staged plain GEMV (o_proj, down_proj) for int8/int4: GPU tests; tune qwen2.5-7b's int8/int4
# o_proj and down rows with the staged candidates; bench with that table and the shipped one
set -u
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider test/test_quant.py -k "staged or gated or gemv" -rA > $W/gpu_tests.log 2>&1
echo "tests rc=$?" >> $W/gpu_tests.log
tail -3 $W/gpu_tests.log
python3 - $SHIPPED $W/nvidia-h200.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
qwen = {(3584, 3584), (3584, 18944)}
data['gemv'] = [r for r in data['gemv'] if not (r['weights'] in ('int8', 'int4') and (r['n'], r['k']) in qwen)]
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
cd $W && timeout -s INT 150 python3 -m decode_monitor.bench tune qwen2.5-7b --weights int8 int4 \
  --candidates small --budget-s 120 -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
grep -i "kept\|gemv int" $W/tune.log | tail -12
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --models qwen2.5-7b --weights bf16 int8 int4 --sessions 2"
timeout -s INT 110 $B --kernel-configs $W/nvidia-h200.json -o $W/bench_tuned > $W/bench.log 2>&1
echo "bench_tuned rc=$?" >> $W/bench.log
timeout -s INT 110 $B --kernel-configs $SHIPPED -o $W/bench_shipped >> $W/bench.log 2>&1
echo "bench_shipped rc=$?" >> $W/bench.log
timeout 100 python3 benchmarks/experiments/step_anatomy.py --weights int8 int4 --kernel-configs $W/nvidia-h200.json --out $W/anatomy_tuned.json > $W/anatomy.log 2>&1
rm -rf $W/cache $W/bench_*/*.png $W/bench_*/*.svg
tar czf $OUT/plain.tgz -C $W .
grep -v Warn $W/anatomy.log | grep -v warn
grep -h "^| qwen2.5-7b" $W/bench_tuned/report.md $W/bench_shipped/report.md | cut -c1-110
