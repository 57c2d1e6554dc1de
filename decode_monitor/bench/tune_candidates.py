"""Candidate launch configs `bench tune` times per shape (the default always comes first).

GEMV configs are (BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K]), attention configs
(BLOCK_T, n_splits or None, num_warps, num_stages): see engine/fused/configs.py. `small` holds
what won on some shape of the study models on an H100 or an H200 and its neighbours (minutes on
a 7B model in three formats); `full` adds a wider sweep; `wide` is `small` with more rows a
program, longer chunks, more warps and pipeline stages for int8 and int4 (a GPU with more
bandwidth per SM needs more bytes in flight per SM to stream at its rate), for re-tuning the
quantised formats of one model; `waves` is `small` with split-K counts for int8 and int4 that
bring a shape's programs near a whole number of waves of resident programs. Every set but
`tiny` also offers the staged kernel (engine/fused/staged.py, staged_qkv.py) for int8 / int4
q/k/v, gate/up, o_proj, down_proj and lm_head. `tiny`
is one candidate a shape, for tests under Triton's interpreter, where programs, not bytes, cost
time.
"""
from decode_monitor.engine.fused.configs import AttentionConfig as A, GemvConfig as G

_BF16_SMALL = [G(8, 512, 4, 4), G(4, 512, 4, 3), G(4, 256, 4, 4), G(4, 512, 4, 5),
               G(16, 512, 4, 3), G(8, 512, 4, 1)]
_INT8_SMALL = [G(4, 512, 4, 2), G(8, 512, 4, 2), G(16, 512, 4, 2), G(4, 1024, 4, 3),
               G(4, 1024, 4, 2), G(4, 512, 2, 3)]
_INT4_SMALL = [G(64, 256, 4, 1, 7), G(64, 256, 4, 2, 7), G(64, 256, 4, 1, 2), G(64, 256, 4, 1),
               G(128, 256, 4, 1), G(32, 256, 4, 1), G(16, 512, 4, 2), G(64, 256, 4, 2),
               G(16, 1024, 4, 2)]
_ATTENTION_SMALL = [A(128, 16, 4, 3), A(128, 16, 4, 2), A(64, 32, 4, 2), A(32, 64, 4, 2)]

_BF16_MORE = [G(4, 512, 4, 1, 2), G(8, 512, 4, 3), G(8, 256, 4, 4), G(2, 1024, 4, 3),
              G(4, 1024, 4, 3), G(16, 512, 4, 1), G(8, 512, 8, 4)]
_INT8_MORE = [G(4, 512, 4, 1), G(8, 1024, 4, 3), G(16, 1024, 4, 2), G(2, 1024, 4, 2),
              G(8, 512, 8, 2), G(4, 2048, 8, 2), G(8, 256, 2, 2), G(4, 512, 4, 2, 2)]
_INT4_MORE = [G(32, 256, 4, 1, 4), G(128, 256, 4, 2), G(32, 512, 4, 2),
              G(8, 1024, 4, 2), G(16, 512, 4, 3), G(32, 512, 4, 3), G(16, 512, 8, 2),
              G(8, 2048, 8, 2), G(16, 512, 4, 2, 4)]
_ATTENTION_MORE = [A(64, 16, 4, 2), A(128, 32, 4, 2), A(16, 128, 4, 2), A(64, 32, 8, 2),
                   A(64, 64, 4, 3), A(128, 66, 4, 2)]

# More bytes in flight per SM: more rows or longer chunks a program, 8 warps, stages through
# shared memory (3, 4) beside the register prefetch (2); int4 also split-K with those.
_INT8_WIDE = [G(32, 512, 4, 2), G(16, 512, 8, 2), G(32, 512, 8, 2), G(16, 512, 4, 3),
              G(16, 512, 4, 4), G(8, 512, 4, 3), G(8, 512, 4, 4), G(16, 1024, 4, 2),
              G(8, 1024, 4, 3), G(4, 1024, 4, 4), G(4, 2048, 4, 2), G(4, 2048, 8, 2),
              G(16, 256, 4, 2), G(32, 256, 4, 2)]
_INT4_WIDE = [G(64, 256, 4, 3), G(64, 256, 4, 4), G(128, 256, 4, 2), G(128, 256, 4, 3),
              G(64, 256, 8, 1), G(64, 256, 8, 2), G(128, 256, 8, 1), G(32, 512, 4, 1),
              G(32, 512, 4, 2), G(32, 256, 4, 1, 4), G(64, 256, 4, 3, 7), G(32, 256, 4, 1, 7)]

# Split-K counts that fill whole waves: a shape whose row blocks alone leave most SMs with fewer
# programs than fit (o_proj, down, q/k/v), or a last wave half empty (int4 gate/up at 2 splits),
# split K further, so that programs = row blocks x splits comes near a whole number of waves.
_INT8_WAVES = [G(4, 1024, 4, 3, 2), G(4, 1024, 4, 3, 4), G(4, 512, 4, 2, 7), G(8, 512, 4, 2, 7),
               G(4, 512, 4, 2, 2), G(16, 512, 4, 2, 2), G(8, 1024, 4, 3, 2)]
_INT4_WAVES = [G(64, 256, 4, 1, 4), G(64, 256, 4, 1, 7), G(32, 256, 4, 1, 2),
               G(64, 256, 4, 2, 9), G(64, 256, 4, 2, 14), G(64, 256, 4, 2, 19),
               G(32, 256, 4, 2, 7), G(32, 256, 4, 2, 9)]

# int8 / int4 gate/up (and lm_head, q/k/v: RMSNorm over all of K) through the kernel that
# stages x' in shared memory (engine/fused/staged.py, staged_qkv.py); (BLOCK_N, BLOCK_K, warps)
# fix its thread layout: 32 / NSUB threads of a warp on rows, NSUB = BLOCK_K / 16 (int8) or
# / 32 (int4) on sub-blocks.
_INT8_STAGED = [G(16, 256, 4, 1, 1, None, True), G(32, 256, 8, 1, 1, None, True),
                G(16, 512, 8, 1, 1, None, True), G(8, 512, 8, 1, 1, None, True),
                G(16, 256, 8, 1, 1, None, True), G(8, 256, 4, 1, 1, None, True),
                G(16, 512, 8, 2, 1, None, True)]
_INT4_STAGED = [G(16, 512, 8, 1, 1, None, True), G(16, 512, 4, 1, 1, None, True),
                G(32, 512, 4, 1, 1, None, True), G(8, 512, 4, 1, 1, None, True),
                G(16, 256, 4, 1, 1, None, True), G(16, 512, 8, 2, 1, None, True)]

# int8 / int4 o_proj and down_proj (kind gemv: no norm, no gate) through the same kernel, K split
# so that a share's x' fits (down_proj's K is 5x the hidden size); num_stages is the chunks of
# codes requested ahead (1, 2). A split that leaves a share empty, or a chunk that does not fit
# the shape, runs the Triton kernel at those settings.
_INT8_STAGED_PLAIN = [G(64, 512, 8, 1, 4, None, True), G(32, 512, 8, 1, 5, None, True),
                      G(32, 512, 8, 1, 8, None, True), G(16, 512, 4, 2, 6, None, True),
                      G(16, 512, 4, 1, 1, None, True), G(16, 512, 4, 2, 1, None, True),
                      G(8, 256, 4, 2, 1, None, True)]
_INT4_STAGED_PLAIN = [G(32, 512, 8, 1, 8, None, True), G(32, 512, 8, 1, 4, None, True),
                      G(64, 512, 8, 2, 4, None, True), G(16, 512, 4, 1, 8, None, True),
                      G(16, 512, 4, 1, 1, None, True), G(32, 512, 4, 1, 3, None, True),
                      G(16, 512, 4, 2, 1, None, True)]


def _formats(base8, base4):
    """{weights: {kind or '*': configs}} of a set: the staged kernel offered for gate/up, the
    plain GEMVs, lm_head and q/k/v (RMSNorm, all of K: gate/up's configs; q/k/v streams its
    RoPE row pairs as gate/up its gate and up rows) of the quantised formats besides the set's
    own configs."""
    return {'int8': {'*': base8, 'gated': base8 + _INT8_STAGED, 'head': base8 + _INT8_STAGED,
                     'qkv': base8 + _INT8_STAGED, 'gemv': base8 + _INT8_STAGED_PLAIN},
            'int4': {'*': base4, 'gated': base4 + _INT4_STAGED, 'head': base4 + _INT4_STAGED,
                     'qkv': base4 + _INT4_STAGED, 'gemv': base4 + _INT4_STAGED_PLAIN}}


# set -> {'gemv': {weights: {kind or '*': [configs]}}, 'attention': [configs]}
CANDIDATES = {
    'small': {'gemv': {'bf16': {'*': _BF16_SMALL}, **_formats(_INT8_SMALL, _INT4_SMALL)},
              'attention': _ATTENTION_SMALL},
    'full': {'gemv': {'bf16': {'*': _BF16_SMALL + _BF16_MORE},
                      **_formats(_INT8_SMALL + _INT8_MORE, _INT4_SMALL + _INT4_MORE)},
             'attention': _ATTENTION_SMALL + _ATTENTION_MORE},
    'wide': {'gemv': {'bf16': {'*': _BF16_SMALL},
                      **_formats(_INT8_SMALL + _INT8_WIDE, _INT4_SMALL + _INT4_WIDE)},
             'attention': _ATTENTION_SMALL},
    'waves': {'gemv': {'bf16': {'*': _BF16_SMALL},
                       **_formats(_INT8_SMALL + _INT8_WAVES, _INT4_SMALL + _INT4_WAVES)},
              'attention': _ATTENTION_SMALL},
    'tiny': {'gemv': {fmt: {'*': [G(32, 128, 4, 1)]} for fmt in ('bf16', 'int8', 'int4')},
             'attention': [A(32, 2, 4, 1)]},
}
