#!/bin/bash
# int8 / int4 down_proj (qwen2.5-7b, 3584 x 18944) in K shares of equal length (37 splits) and in
# two or three long shares, each GEMV alone in a graph of 28 calls
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 benchmarks/experiments/kernels_in_graph.py even_down --out $OUT/even > $OUT/even_down.log 2>&1
python3 benchmarks/experiments/kernels_in_graph.py few_shares_down --out $OUT/few > $OUT/few_shares_down.log 2>&1
