#!/bin/bash
# persistent beside fused and hf: three models, ctx 2048 and 16384, graph and eager, bf16
set -u
OUT=${1:?usage: run_ladder.sh OUT_DIR}
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
timeout -s INT 530 python3 -m decode_monitor.bench --grid quick \
  --models qwen2.5-7b llama-3-8b mistral-7b --contexts 2048 16384 --modes graph eager \
  --backends persistent fused hf --weights bf16 --sessions 1 --steps 50 --warmup 10 \
  --no-progress -o $W/bench > $W/bench.log 2>&1
echo "bench rc=$?" >> $W/bench.log
rm -rf $W/cache $W/bench/*.png $W/bench/*.svg
tar czf $OUT/ladder.tgz -C $W .
cp $W/bench.log $OUT/
grep -h "^| " $W/bench/report.md | cut -c1-120 | head -60
