#!/bin/bash
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DECODE_MONITOR_CACHE=$OUT/cache
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > $OUT/env.txt 2>&1
timeout 420 python3 benchmarks/experiments/early_launch_probe.py --models qwen2.5-7b \
  --weights int8 int4 bf16 --out $OUT/early_qwen.json > $OUT/early_qwen.log 2>&1
echo "rc=$?" >> $OUT/early_qwen.log
rm -rf $OUT/cache
grep -v "^ *$" $OUT/early_qwen.log | cut -c1-150 | tail -40
