#!/bin/bash
# This record's run on the H200, from the repository root: bash run_h200.sh OUT_DIR (tune_waves)
set -u
OUT=${1:?usage: run_h200.sh OUT_DIR (tune_waves)}
R=benchmarks/results/h200/tune_waves
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
# the shipped table without qwen2.5-7b's int8 and int4 rows: the tune fills those in
python3 - $SHIPPED $W/nvidia-h200.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
qwen = {(4608, 3584), (3584, 3584), (18944, 3584), (3584, 18944), (152064, 3584)}
data['gemv'] = [r for r in data['gemv']
                if not (r['weights'] in ('int8', 'int4') and (r['n'], r['k']) in qwen)]
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
cd $W && timeout -s INT 240 python3 -m decode_monitor.bench tune qwen2.5-7b --weights int4 int8 \
  --candidates waves -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --models qwen2.5-7b"
timeout -s INT 110 $B --weights bf16 int8 int4 --sessions 3 --kernel-configs $W/nvidia-h200.json -o $W/bench_new > $W/bench.log 2>&1
echo "bench_new rc=$?" >> $W/bench.log
timeout -s INT 110 $B --weights bf16 int8 int4 --sessions 3 --kernel-configs $SHIPPED -o $W/bench_old >> $W/bench.log 2>&1
echo "bench_old rc=$?" >> $W/bench.log
rm -rf $W/cache $W/*.ncu-rep $W/bench_*/*.png $W/bench_*/*.svg
tar czf $OUT/tune_waves.tgz -C $W .
cp $W/tune.log $W/bench.log $W/nvidia-h200.json $OUT/
grep -h "^| qwen2.5-7b" $W/bench_new/report.md $W/bench_old/report.md | cut -c1-110
