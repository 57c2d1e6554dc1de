#!/bin/bash
R=$(pwd)
nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader > $OUT/env.txt
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)" >> $OUT/env.txt
mkdir -p $OUT/new $OUT/old
new() { local w=$1; shift; (cd $R/benchmarks/experiments && timeout 150 python3 persistent_probe.py --weights $w --variants "$@" --peak-gbs 4814 --out $OUT/new > $OUT/new/$w.log 2>&1); }
old() { local w=$1; shift; (cd $R/_ab_base/benchmarks/experiments && timeout 150 python3 persistent_probe.py --weights $w --variants "$@" --peak-gbs 4814 --out $OUT/old > $OUT/old/$w.log 2>&1); }
new bf16 q-default
old bf16 q-default
new int8 q-16x512-r128
old int8 q-16x512
new int4 q-16x1024-r168
old int4 q-16x1024
timeout 240 python3 -m pytest -q -p no:cacheprovider test/test_gpu_persistent.py -rA > $OUT/gpu_tests.log 2>&1
for f in $OUT/new/*.log $OUT/old/*.log; do echo "== $f"; grep -A8 "^backend" $f; done
tail -3 $OUT/gpu_tests.log
cd $OUT && tar czf ab.tgz new old && rm -rf new old
