#!/bin/bash
# staged lm_head rows for int8 / int4: tune the head rows of qwen2.5-7b, llama-3-8b, mistral-7b
# with the staged candidates; bench qwen2.5-7b with that table and the shipped one
set -u
SHIPPED=decode_monitor/engine/fused/tuned/nvidia-h200.json
W=$OUT/w; mkdir -p $W/cache
export PYTHONPATH=$PWD DECODE_MONITOR_CACHE=$W/cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > $W/env.txt 2>&1
python3 - $SHIPPED $W/nvidia-h200.json <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data["gemv"] = [r for r in data["gemv"] if not (r["weights"] in ("int8", "int4") and r["kind"] == "head" and r["n"] != 32000)]
json.dump(data, open(sys.argv[2], 'w'), indent=1)
PY
cd $W && timeout -s INT 100 python3 -m decode_monitor.bench tune qwen2.5-7b llama-3-8b --weights int8 int4 \
  --candidates small --budget-s 80 -o nvidia-h200.json --no-progress > tune.log 2>&1
echo "tune rc=$?" >> tune.log; cd - > /dev/null
grep "head int" $W/tune.log
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --weights bf16 int8 int4 --models qwen2.5-7b --sessions 1"
timeout -s INT 60 $B --kernel-configs $W/nvidia-h200.json -o $W/qwen_tuned > $W/bench.log 2>&1
echo "qwen_tuned rc=$?" >> $W/bench.log
timeout -s INT 60 $B --kernel-configs $SHIPPED -o $W/qwen_shipped >> $W/bench.log 2>&1
echo "qwen_shipped rc=$?" >> $W/bench.log
rm -rf $W/cache $W/*/*.png $W/*/*.svg
tar czf $OUT/head.tgz -C $W .
for d in qwen_tuned qwen_shipped; do echo "== $d"; grep -h "^| qwen" $W/$d/report.md | grep -v "FAIL\|pass" | cut -c1-90; done
