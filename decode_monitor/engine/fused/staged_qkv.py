"""int8 / int4 q/k/v with RoPE through the staged kernel's loop (Gluon; staged.py).

gemv.qkv_rope_kernel's work with x' staged in shared memory: RMSNorm of x, [q; k; v] = W x'
(+ bias), RoPE on q and k, q to Q and k, v to the cache at pos (read from device memory). A
program takes BLOCK_N rotate-half row pairs (j, j + HALF) of the heads, so both halves of a
rotation land in the same thread: the pair's two rows are streamed as gate/up streams its gate
and up rows (staged.stream, PAIR), and the Triton kernel's epilogue (gemv._qkv_rope_store,
whose element-wise operations take any layout) finishes them. K is not split (RMSNorm needs
all of x). CUDA only, like staged.py: gemv.qkv_rope runs it for a `staged` int8 / int4 row
that staged.fits takes, the Triton kernel elsewhere.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.gemv import _qkv_rope_store
from decode_monitor.engine.fused.staged import ahead, stream


@gluon.jit
def staged_qkv_kernel(W, S, Z, B, X, NW, COS, SIN, POS, Q, KC, VC, n_pairs, q_pairs, k_pairs,
                      cache_head_stride, K: gl.constexpr, stride_w, stride_s, eps,
                      HALF: gl.constexpr, HAS_BIAS: gl.constexpr, INT4: gl.constexpr,
                      GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      CH2: gl.constexpr, AHEAD: gl.constexpr, WARPS: gl.constexpr,
                      PDL: gl.constexpr):
    """Grid (pair blocks,). W code words (all q, k and v rows, K / 8 or K / 4), S scales, Z
    offsets (int4); Q (q_heads * 2 HALF,); KC, VC (kv_heads, max_context, 2 HALF) of this
    layer. Thread layout as staged.staged_kernel's, BLOCK_N pairs a program."""
    NSUB: gl.constexpr = BLOCK_K // (32 if INT4 else 16)
    TR: gl.constexpr = 32 // NSUB
    RT: gl.constexpr = BLOCK_N // (TR * WARPS)
    SPG: gl.constexpr = GROUP // (32 if INT4 else 16)  # sub-blocks a group
    CHUNKS: gl.constexpr = K // BLOCK_K
    L3: gl.constexpr = gl.BlockedLayout([RT, 1, 4], [TR, NSUB, 1], [WARPS, 1, 1], [2, 1, 0])
    LD: gl.constexpr = gl.SliceLayout(2, L3)
    LX: gl.constexpr = gl.SliceLayout(0, L3)
    p = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD))
    p_mask = p < n_pairs
    p = gl.minimum(p, n_pairs - 1)  # tail pairs load valid memory; their stores are masked
    j = p % HALF
    rows_a = (p // HALF) * (2 * HALF) + j
    rows_b = rows_a + HALF
    subs = gl.expand_dims(gl.arange(0, NSUB, layout=gl.SliceLayout(0, LD)) // SPG, 0)
    st = (gl.expand_dims(gl.expand_dims(gl.arange(0, NSUB, layout=gl.SliceLayout(1, LX)), 1), 0)
          * 4 + gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LX)),
                                              0), 0))
    ra3 = gl.expand_dims(gl.expand_dims(rows_a, 1), 2).to(gl.int64)
    rb3 = gl.expand_dims(gl.expand_dims(rows_b, 1), 2).to(gl.int64)
    ra2 = gl.expand_dims(rows_a, 1).to(gl.int64)
    rb2 = gl.expand_dims(rows_b, 1).to(gl.int64)
    acc_a, acc_b, sum_sq = stream(W, S, Z, X, NW, ra3 * stride_w + st, rb3 * stride_w + st,
                                  ra2 * stride_s + subs, rb2 * stride_s + subs, 0, CHUNKS,
                                  CHUNKS, True, True, INT4, GROUP, BLOCK_N, BLOCK_K, CH2, NSUB,
                                  AHEAD, WARPS, PDL, L3, LX, LD)
    _qkv_rope_store(gl.sum(acc_a, axis=1), gl.sum(acc_b, axis=1), sum_sq, p, p_mask, j,
                    rows_a, rows_b, B, COS, SIN, POS, Q, KC, VC, eps, q_pairs, k_pairs,
                    cache_head_stride, K, HALF, HAS_BIAS)


def qkv_rope(w, bias, x, norm_weight, cos, sin, pos, q, k_cache, v_cache, q_heads, kv_heads,
             eps, config):
    """gemv.qkv_rope through staged_qkv_kernel; w an int8 or int4 QuantWeight."""
    codes = w.q.view(torch.int32)  # the kernel reads whole 32-bit words of codes
    half = k_cache.shape[-1] // 2
    k = x.shape[0]
    n_pairs = (q_heads + 2 * kv_heads) * half
    staged_qkv_kernel[(triton.cdiv(n_pairs, config.block_n),)](
        codes, w.scale, w.offset if w.offset is not None else w.scale,
        bias if bias is not None else w.scale, x, norm_weight, cos, sin, pos, q, k_cache,
        v_cache, n_pairs, q_heads * half, kv_heads * half, k_cache.stride(0), k,
        codes.stride(0), w.scale.stride(0), eps, HALF=half, HAS_BIAS=bias is not None,
        INT4=w.fmt == 'int4', GROUP=w.group, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        CH2=triton.next_power_of_2(k // config.block_k), AHEAD=ahead(config),
        WARPS=config.num_warps, num_warps=config.num_warps, **pdl.launch_args(x.device))
