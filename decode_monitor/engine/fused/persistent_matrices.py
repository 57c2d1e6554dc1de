"""The persistent layer kernel's matrix tasks: a ticket's range of row blocks of q/k/v (RMSNorm,
bias, RoPE, the cache write), o_proj (+ residual), gate/up (SiLU * up) or down (+ residual).

A ticket is one software-pipelined loop over its blocks and K chunks (the loads run ahead across
block boundaries); a block's epilogue runs after its last chunk, as gemv.py's kernels' do.
Activations written earlier in the same launch are read through L2 (`.cg`): an SM's L1 is not
coherent with the others'. Weights dense, or int8 / int4 codes dequantised in registers
(`_dots`).
"""
import triton
import triton.language as tl

from decode_monitor.engine.fused.dequant import chunk_dots
from decode_monitor.engine.fused.gemv import _qkv_rope_store


@triton.jit
def _chunk(W, X, NW, rows_a, rows_b, c, K: tl.constexpr, NORM: tl.constexpr,
           PAIR: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chunk c of K: the weight tiles of rows_a (and rows_b if PAIR), x' (= g * x if NORM) and
    x^2 for the norm's sum of squares. x is read through L2."""
    cols = c * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = cols < K
    x = tl.load(X + cols, mask=kmask, other=0.0, cache_modifier='.cg').to(tl.float32)
    wa = tl.load(W + rows_a.to(tl.int64)[:, None] * K + cols[None, :], mask=kmask[None, :],
                 other=0.0)
    wb = wa
    if PAIR:
        wb = tl.load(W + rows_b.to(tl.int64)[:, None] * K + cols[None, :], mask=kmask[None, :],
                     other=0.0)
    x2 = x * x
    if NORM:
        x = x * tl.load(NW + cols, mask=kmask, other=0.0).to(tl.float32)
    return wa, wb, x, x2


@triton.jit
def _dots(W, S, Z, X, NW, rows_a, rows_b, c, K: tl.constexpr, stride_w, stride_s,
          NORM: tl.constexpr, PAIR: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
          BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """Chunk c of K's terms of the accumulators of rows_a and rows_b (rows_a's unless PAIR), and
    x^2: FMT 0, dense, (BLOCK_N, BLOCK_K) products; 1 / 2, int8 / int4 codes (dequant.py,
    dequantised in registers as the fused GEMVs do), (BLOCK_N, NSUB) scaled sub-block dots."""
    if FMT == 0:
        wa, wb, x, x2 = _chunk(W, X, NW, rows_a, rows_b, c, K, NORM, PAIR, BLOCK_K)
        da = wa.to(tl.float32) * x[None, :]
        db = da
        if PAIR:
            db = wb.to(tl.float32) * x[None, :]
    else:
        da, db, x2 = chunk_dots(W, S, Z, X, NW, rows_a, rows_b, c * BLOCK_K, K, stride_w,
                                stride_s, NORM, PAIR, FMT == 2, GROUP, BLOCK_K,
                                K % BLOCK_K == 0, PTX, '.cg')
    return da, db, x2


@triton.jit
def _qkv_step(it, blk0, acc_a, acc_b, ss, WQKV, SQKV, ZQKV, sw, ss_, BQKV, H, LN1, COS, SIN, POS,
              Q, KC, VC, eps, cache_head_stride, HIDDEN: tl.constexpr, N_PAIRS: tl.constexpr,
              Q_PAIRS: tl.constexpr, K_PAIRS: tl.constexpr, HALF: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              FMT: tl.constexpr, GROUP: tl.constexpr, PTX: tl.constexpr):
    """Step it of a range of q/k/v blocks of rotate-half row pairs from blk0: chunk it % KT of
    block it // KT, and that block's epilogue (gemv.qkv_rope_kernel's) after its last chunk."""
    KT: tl.constexpr = (HIDDEN + BLOCK_K - 1) // BLOCK_K
    c = it % KT
    p = (blk0 + it // KT) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < N_PAIRS
    p = tl.minimum(p, N_PAIRS - 1)
    j = p % HALF
    rows_a = (p // HALF) * (2 * HALF) + j
    rows_b = rows_a + HALF
    da, db, x2 = _dots(WQKV, SQKV, ZQKV, H, LN1, rows_a, rows_b, c, HIDDEN, sw, ss_, True, True,
                       FMT, GROUP, BLOCK_K, PTX)
    acc_a += da
    acc_b += db
    ss += x2
    if c == KT - 1:
        _qkv_rope_store(tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(ss, axis=0),
                        p, p_mask, j, rows_a, rows_b, BQKV, COS, SIN, POS, Q, KC, VC, eps,
                        Q_PAIRS, K_PAIRS, cache_head_stride, HIDDEN, HALF, HAS_BIAS)
        acc_a = tl.zeros_like(acc_a)
        acc_b = tl.zeros_like(acc_b)
        ss = tl.zeros_like(ss)
    return acc_a, acc_b, ss


@triton.jit
def _gemv_step(it, blk0, acc_a, acc_b, ss, W, S, Z, sw, ss_, X, NW, R, Y, N: tl.constexpr,
               K: tl.constexpr, eps, NORM: tl.constexpr, GATED: tl.constexpr,
               RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               FMT: tl.constexpr, GROUP: tl.constexpr, PTX: tl.constexpr):
    """As _qkv_step, for a range of row blocks of W: gemv.gemv_kernel's work (no split-K)."""
    KT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    c = it % KT
    rows = (blk0 + it // KT) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    da, db, x2 = _dots(W, S, Z, X, NW, rows, rows + N, c, K, sw, ss_, NORM, GATED, FMT, GROUP,
                       BLOCK_K, PTX)
    acc_a += da
    if GATED:
        acc_b += db
    if NORM:
        ss += x2
    if c == KT - 1:
        a = tl.sum(acc_a, axis=1)
        b = tl.sum(acc_b, axis=1)
        if NORM:
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            a = a * rstd
            b = b * rstd
        if GATED:
            y = a * tl.sigmoid(a) * b
        else:
            y = a
        if RESIDUAL:
            y += tl.load(R + rows, mask=row_mask, other=0.0, cache_modifier='.cg').to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_mask)
        acc_a = tl.zeros_like(acc_a)
        acc_b = tl.zeros_like(acc_b)
        ss = tl.zeros_like(ss)
    return acc_a, acc_b, ss


@triton.jit
def _range(u, BIG: tl.constexpr, RB: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, SUBK: tl.constexpr):
    """Ticket u's first block and step count (blocks [u RB, u RB + RB) for the first BIG, then
    one block each; KT steps a block), and zeroed accumulators: a column for each SUBK
    columns of a chunk (see _dots: 1 dense, 16 int8, 32 int4)."""
    KT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    ACC_K: tl.constexpr = BLOCK_K // SUBK
    blk0 = tl.where(u < BIG, u * RB, BIG * RB + u - BIG)
    steps = tl.where(u < BIG, RB * KT, KT)
    acc = tl.zeros((BLOCK_N, ACC_K), dtype=tl.float32)
    return blk0, steps, acc, acc, tl.zeros((BLOCK_K,), dtype=tl.float32)


@triton.jit
def _qkv_ticket(u, BIG: tl.constexpr, RB: tl.constexpr, WQKV, SQKV, ZQKV, sw, ss_, BQKV, H, LN1,
                COS, SIN, POS, Q, KC, VC, eps, cache_head_stride, HIDDEN: tl.constexpr,
                N_PAIRS: tl.constexpr, Q_PAIRS: tl.constexpr, K_PAIRS: tl.constexpr,
                HALF: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, STAGES: tl.constexpr, WHILE_LOOP: tl.constexpr,
                FMT: tl.constexpr, GROUP: tl.constexpr, SUBK: tl.constexpr, PTX: tl.constexpr):
    """Ticket u of q/k/v (`_range`): one software-pipelined loop over the blocks and K chunks
    (its loads run ahead across blocks)."""
    blk0, steps, acc_a, acc_b, ss = _range(u, BIG, RB, HIDDEN, BLOCK_N, BLOCK_K, SUBK)
    if WHILE_LOOP:  # the CPU interpreter cannot iterate a range with bounds read from memory
        it = 0
        while it < steps:
            acc_a, acc_b, ss = _qkv_step(it, blk0, acc_a, acc_b, ss, WQKV, SQKV, ZQKV, sw, ss_,
                                         BQKV, H, LN1, COS, SIN, POS, Q, KC, VC, eps,
                                         cache_head_stride, HIDDEN, N_PAIRS, Q_PAIRS, K_PAIRS,
                                         HALF, HAS_BIAS, BLOCK_N, BLOCK_K, FMT, GROUP, PTX)
            it += 1
    else:
        for it in tl.range(0, steps, num_stages=STAGES):
            acc_a, acc_b, ss = _qkv_step(it, blk0, acc_a, acc_b, ss, WQKV, SQKV, ZQKV, sw, ss_,
                                         BQKV, H, LN1, COS, SIN, POS, Q, KC, VC, eps,
                                         cache_head_stride, HIDDEN, N_PAIRS, Q_PAIRS, K_PAIRS,
                                         HALF, HAS_BIAS, BLOCK_N, BLOCK_K, FMT, GROUP, PTX)


@triton.jit
def _gemv_ticket(u, BIG: tl.constexpr, RB: tl.constexpr, W, S, Z, sw, ss_, X, NW, R, Y,
                 N: tl.constexpr, K: tl.constexpr, eps, NORM: tl.constexpr, GATED: tl.constexpr,
                 RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr, WHILE_LOOP: tl.constexpr, FMT: tl.constexpr,
                 GROUP: tl.constexpr, SUBK: tl.constexpr, PTX: tl.constexpr):
    """As _qkv_ticket, for a matrix of row blocks."""
    blk0, steps, acc_a, acc_b, ss = _range(u, BIG, RB, K, BLOCK_N, BLOCK_K, SUBK)
    if WHILE_LOOP:
        it = 0
        while it < steps:
            acc_a, acc_b, ss = _gemv_step(it, blk0, acc_a, acc_b, ss, W, S, Z, sw, ss_, X, NW,
                                          R, Y, N, K, eps, NORM, GATED, RESIDUAL, BLOCK_N,
                                          BLOCK_K, FMT, GROUP, PTX)
            it += 1
    else:
        for it in tl.range(0, steps, num_stages=STAGES):
            acc_a, acc_b, ss = _gemv_step(it, blk0, acc_a, acc_b, ss, W, S, Z, sw, ss_, X, NW,
                                          R, Y, N, K, eps, NORM, GATED, RESIDUAL, BLOCK_N,
                                          BLOCK_K, FMT, GROUP, PTX)
