#!/bin/bash
# A/B: code words loaded with L2 evict_first (a copy of the package, patched) against as shipped
set -u
V=$(mktemp -d); cp -r decode_monitor $V/
sed -i "s/words = tl.load(ptrs, mask=valid)$/words = tl.load(ptrs, mask=valid, eviction_policy='evict_first')/; s/        words = tl.load(ptrs, mask=(word < K \/\/ PER_WORD) \& valid, other=0)/        words = tl.load(ptrs, mask=(word < K \/\/ PER_WORD) \& valid, other=0, eviction_policy='evict_first')/" $V/decode_monitor/engine/fused/dequant.py
sed -i "s|    words = gl.load(W + w_off + k0 // (8 if INT4 else 4))|    words = gl.load(W + w_off + k0 // (8 if INT4 else 4), eviction_policy='evict_first')|" $V/decode_monitor/engine/fused/staged.py
grep -c evict_first $V/decode_monitor/engine/fused/dequant.py $V/decode_monitor/engine/fused/staged.py | tee $OUT/patch_count.txt
W=$(mktemp -d)
export PYTHONUNBUFFERED=1 DECODE_MONITOR_CACHE=$W/cache
nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader > $OUT/env.txt
B="python3 -m decode_monitor.bench --contexts 2048 --modes graph --backends fused --no-progress --weights bf16 int8 int4 --models qwen2.5-7b --sessions 1"
for r in 1 2; do
  PYTHONPATH=$V timeout -s INT 60 $B -o $W/evict_$r > $W/evict_$r.log 2>&1
  PYTHONPATH=$PWD timeout -s INT 60 $B -o $W/shipped_$r > $W/shipped_$r.log 2>&1
done
rm -rf $W/cache $W/*/*.png $W/*/*.svg
tar czf $OUT/evict.tgz -C $W .
for d in evict_1 shipped_1 evict_2 shipped_2; do echo "== $d"; grep -h "^| qwen" $W/$d/report.md | grep -v "FAIL\|pass" | cut -c1-90; done
