#!/bin/bash
# the staged kernel for int8 gate/up: GPU tests; bench tune of qwen2.5-7b's int8 rows with the
# staged candidates; bench with the tuned table and with the shipped one
set -u
OUT=${1:?usage: run_int8.sh OUT_DIR}
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider test/test_quant.py -k "staged or gated" -rA > $W/gpu_tests.log 2>&1
echo "tests rc=$?" >> $W/gpu_tests.log
python3 - $SHIPPED $W/nvidia-h200.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
qwen = {(4608, 3584), (3584, 3584), (18944, 3584), (3584, 18944), (152064, 3584)}
data['gemv'] = [r for r in data['gemv'] if not (r['weights'] == 'int8' and (r['n'], r['k']) in qwen)]
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
cd $W && timeout -s INT 110 python3 -m decode_monitor.bench tune qwen2.5-7b --weights int8 \
  --candidates small -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --models qwen2.5-7b --weights bf16 int8 int4 --sessions 2"
timeout -s INT 100 $B --kernel-configs $W/nvidia-h200.json -o $W/bench_tuned > $W/bench.log 2>&1
echo "bench_tuned rc=$?" >> $W/bench.log
timeout -s INT 100 $B --kernel-configs $SHIPPED -o $W/bench_shipped >> $W/bench.log 2>&1
echo "bench_shipped rc=$?" >> $W/bench.log
rm -rf $W/cache $W/bench_*/*.png $W/bench_*/*.svg
tar czf $OUT/int8.tgz -C $W .
tail -2 $W/gpu_tests.log; grep "gated int8\|kernel configs" $W/tune.log
grep -h "^| qwen2.5-7b" $W/bench_tuned/report.md $W/bench_shipped/report.md | grep -v "FAIL\|pass" | cut -c1-100
