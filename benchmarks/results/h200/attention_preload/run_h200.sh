#!/bin/bash
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DECODE_MONITOR_CACHE=$OUT/cache
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > $OUT/env.txt 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu test/test_gpu.py -k "graph or attention" > $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log; tail -3 $OUT/gpu_tests.log
timeout 300 python3 w/ab_attention.py $OUT/ab_attention.json qwen2.5-7b llama-3-8b > $OUT/ab.log 2>&1
echo "rc=$?" >> $OUT/ab.log
rm -rf $OUT/cache
cat $OUT/ab.log | cut -c1-200
