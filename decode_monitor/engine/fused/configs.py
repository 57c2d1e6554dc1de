"""Launch configurations of the fused kernels: defaults, and per-shape tables tuned on one GPU.

`benchmarks/fused_kernels.py` times every candidate per shape and writes the fastest as JSON;
point DECODE_MONITOR_FUSED_CONFIGS at that file (or call `load_tuned`) to use it; tables
measured here are built in (BUILTIN) and used on the GPU model they were measured on. Shapes
not in a table fall back to the defaults, which are good everywhere and best nowhere.
"""
import json
import math
import os

import triton

# GEMV kinds: (BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K]); num_stages > 1
# software-pipelines the weight loads through shared memory (more bytes in flight per SM), except
# the quantised formats' 2, which loads the next chunk into registers (dequant.quant_dot); a
# split-K of S runs S programs per row block, each over 1/S of K (gemv.py), default 1.
GEMV_DEFAULTS = {
    'gemv': (4, 512, 4, 1),  # o_proj / down_proj (+ residual)
    'gated': (4, 512, 4, 1),  # gate/up (+ RMSNorm, SiLU * up); BLOCK_N rows of each
    'qkv': (4, 512, 4, 1),  # q/k/v (+ RMSNorm, bias, RoPE, cache write); BLOCK_N row pairs
    'head': (8, 512, 4, 1),  # lm_head (+ final RMSNorm), fp32 logits
}
# Quantised weights ('<kind>.int8', '<kind>.int4'): a row is 2-4x fewer bytes, so a program
# takes more rows and longer K chunks to keep as many bytes in flight. int8's default came
# within 4 % of each shape's best on average over the 11 study shapes on an H100 (at most 12 %
# off; benchmarks/results/h100/int8_words/tune/), int4's within 18 % (at most 31 % off; int4's
# best configs are further apart: benchmarks/results/h100/int4_words/tune/).
for _kind in tuple(GEMV_DEFAULTS):
    GEMV_DEFAULTS[f'{_kind}.int8'] = (8, 1024, 4, 2)
    GEMV_DEFAULTS[f'{_kind}.int4'] = (64, 256, 4, 1, 4)
GEMV_TUNED = {}  # (kind, N, K) -> config
# The CPU interpreter pays per program, not per byte: few, large programs.
INTERPRETER_GEMV = (64, 256, 4, 1)

# Attention: (BLOCK_T, n_splits or None for about two programs per SM, num_warps, num_stages).
# Two stages of 64-row K and V tiles take 64 KB of shared memory: within every recent GPU.
ATTENTION_DEFAULT = (64, None, 4, 2)
ATTENTION_TUNED = {}  # (kv_heads, group, max_context) -> config

# Tables written by benchmarks/fused_kernels.py, applied on the GPU they were measured on.
# Hopper's 227 KB of shared memory allows stage counts other GPUs may not fit.
BUILTIN = {
    'NVIDIA H100 80GB HBM3': [
        ['qkv', 4608, 3584, 4, 512, 4, 1], ['gemv', 3584, 3584, 8, 512, 4, 4],
        ['gated', 18944, 3584, 4, 512, 4, 3], ['gemv', 3584, 18944, 4, 512, 4, 5],
        ['head', 152064, 3584, 16, 512, 4, 3], ['qkv', 6144, 4096, 4, 256, 4, 4],
        ['gemv', 4096, 4096, 4, 512, 4, 1], ['gated', 14336, 4096, 4, 512, 4, 3],
        ['gemv', 4096, 14336, 8, 512, 4, 4], ['head', 128256, 4096, 8, 512, 4, 1],
        ['head', 32000, 4096, 8, 512, 4, 1],
        ['attention', 4, 7, 2048, 128, 16, 4, 3], ['attention', 4, 7, 16384, 128, 66, 4, 2],
        ['attention', 8, 4, 2048, 128, 16, 4, 2], ['attention', 8, 4, 16384, 32, 33, 4, 3],
        # quantised weights (benchmarks/kernels_in_graph.py tune-int8, tune-int4); a 5th value
        # is the split-K
        ['qkv.int8', 4608, 3584, 4, 512, 4, 2], ['qkv.int4', 4608, 3584, 64, 256, 4, 1, 7],
        ['gemv.int8', 3584, 3584, 4, 512, 2, 3], ['gemv.int4', 3584, 3584, 64, 256, 4, 1, 7],
        ['gated.int8', 18944, 3584, 16, 512, 4, 2], ['gated.int4', 18944, 3584, 64, 256, 4, 1],
        ['gemv.int8', 3584, 18944, 4, 1024, 4, 3], ['gemv.int4', 3584, 18944, 64, 256, 4, 1, 7],
        ['head.int8', 152064, 3584, 16, 512, 4, 2], ['head.int4', 152064, 3584, 128, 256, 4, 1],
        ['qkv.int8', 6144, 4096, 8, 512, 4, 2], ['qkv.int4', 6144, 4096, 16, 512, 4, 2],
        ['gemv.int8', 4096, 4096, 8, 1024, 4, 2], ['gemv.int4', 4096, 4096, 16, 1024, 4, 2],
        ['gated.int8', 14336, 4096, 4, 512, 4, 2], ['gated.int4', 14336, 4096, 32, 256, 4, 1],
        ['gemv.int8', 4096, 14336, 8, 1024, 4, 2], ['gemv.int4', 4096, 14336, 64, 256, 4, 1, 7],
        ['head.int8', 128256, 4096, 4, 1024, 4, 2], ['head.int4', 128256, 4096, 64, 256, 4, 2],
        ['head.int8', 32000, 4096, 4, 1024, 4, 2], ['head.int4', 32000, 4096, 128, 256, 4, 2]],
}


def gemv_config(kind, n, k, on_cpu=False, fmt='bf16'):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K]) for a GEMV kind, shape and weight
    format."""
    if fmt != 'bf16':
        kind = f'{kind}.{fmt}'
    config = INTERPRETER_GEMV if on_cpu else GEMV_TUNED.get((kind, n, k), GEMV_DEFAULTS[kind])
    block_n, block_k, *rest = config
    return (block_n, min(block_k, triton.next_power_of_2(k)), *rest)


def attention_config(kv_heads, group, max_context):
    """The config tuned for the nearest context length (by ratio) of this head layout."""
    tuned = [(ctx, cfg) for (kv, g, ctx), cfg in ATTENTION_TUNED.items()
             if (kv, g) == (kv_heads, group)]
    if not tuned:
        return ATTENTION_DEFAULT
    return min(tuned, key=lambda t: abs(math.log(t[0] / max_context)))[1]


def add_rows(rows, override=True):
    """Rows ["gemv kind", N, K, *config] and ["attention", kv_heads, group, ctx, *config]."""
    for row in rows:
        table, split = (ATTENTION_TUNED, 4) if row[0] == 'attention' else (GEMV_TUNED, 3)
        key = tuple(row[1:split]) if row[0] == 'attention' else tuple(row[:split])
        if override or key not in table:
            table[key] = tuple(row[split:])


def load_tuned(path):
    with open(path) as f:
        add_rows(json.load(f))


def use_builtin(device_name):
    """Add the built-in table measured on this GPU model; a loaded file keeps precedence."""
    add_rows(BUILTIN.get(device_name, []), override=False)


if os.environ.get('DECODE_MONITOR_FUSED_CONFIGS'):  # configs tuned on this GPU by a benchmark
    load_tuned(os.environ['DECODE_MONITOR_FUSED_CONFIGS'])
