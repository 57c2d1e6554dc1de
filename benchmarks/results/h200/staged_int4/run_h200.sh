#!/bin/bash
# the staged int4 gate/up kernel: GPU tests, then bench with the shipped table and with the
# qwen2.5-7b / llama-3-8b int4 gate/up rows staged
set -u
OUT=${1:?usage: run_staged.sh OUT_DIR}
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider test/test_quant.py -k "staged or gated or gemv" -rA > $W/gpu_tests.log 2>&1
echo "tests rc=$?" >> $W/gpu_tests.log
python3 - $SHIPPED $W/staged.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for r in data['gemv']:
    if r['kind'] == 'gated' and r['weights'] == 'int4' and (r['n'], r['k']) in ((18944, 3584), (14336, 4096)):
        r['config'] = [16, 512, 8, 1, 1, None, True]
data['provenance']['command'] += ' (then the qwen2.5-7b and llama-3-8b int4 gate/up rows set to [16, 512, 8, 1, 1, null, true] by hand)'
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --models qwen2.5-7b llama-3-8b --weights bf16 int8 int4 --sessions 2"
timeout -s INT 190 $B --kernel-configs $SHIPPED -o $W/bench_shipped > $W/bench.log 2>&1
echo "bench_shipped rc=$?" >> $W/bench.log
timeout -s INT 190 $B --kernel-configs $W/staged.json -o $W/bench_staged >> $W/bench.log 2>&1
echo "bench_staged rc=$?" >> $W/bench.log
rm -rf $W/cache $W/bench_*/*.png $W/bench_*/*.svg
tar czf $OUT/staged.tgz -C $W .
tail -3 $W/gpu_tests.log
grep -h "^| qwen2.5-7b\|^| llama-3-8b" $W/bench_shipped/report.md $W/bench_staged/report.md | grep -v FAIL | cut -c1-100
