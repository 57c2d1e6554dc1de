#!/bin/bash
# the shipped H200 table (with the staged q/k/v rows), 5 fresh sessions, three models, bf16 / int8 / int4 (the README table)
set -u
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout -s INT 540 python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused \
  --weights bf16 int8 int4 --sessions 5 --no-progress --models qwen2.5-7b llama-3-8b mistral-7b \
  -o $W/bench > $W/bench.log 2>&1
echo "bench rc=$?" >> $W/bench.log
rm -rf $W/cache $W/bench/*.png $W/bench/*.svg
tar czf $OUT/five.tgz -C $W .
grep -h "^| [qlm]" $W/bench/report.md | grep -v "FAIL\|pass" | cut -c1-110
tail -3 $W/bench.log
