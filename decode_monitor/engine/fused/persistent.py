"""One launch per decoder layer: resident programs take the layer's tasks in order from a ticket.

A layer is a chain of tasks: q/k/v row blocks (RMSNorm, bias, RoPE, cache write), attention
partials (one per KV head and split of the prefix), their merge (one per query head), o_proj row
blocks (+ residual), gate/up row blocks (RMSNorm, SiLU * up) and down row blocks (+ residual).
Every program of the launch loops: it takes the next task number from a ticket counter in global
memory, waits until the tasks it depends on have been counted done, runs it, and counts it done.
So the weights are streamed matrix after matrix with no kernel boundary in between, and a
program that finishes its last o_proj block starts on gate/up while others finish theirs.

Dependencies, each a counter in global memory (released after the task's stores, acquired
before its loads):
- attention (KV head h, any split) needs every q/k/v block (the RMSNorm needs the whole input
  vector, so a q/k/v block cannot finish before all of h is read, and all blocks run at once);
- the merge of query head r needs the partials of its own KV head only;
- an o_proj block needs every merged head; gate/up needs every o_proj block (its RMSNorm reads
  all of h); a down block needs every gate/up block.

Why it cannot hang: tickets are taken in task order by programs that are already running, and a
task depends only on tasks with smaller numbers. The smallest task not yet done is therefore
held by a running program whose dependencies are all done, so it finishes, whatever number of
programs is resident. A launch larger than what fits on the GPU only queues idle programs. The
naive persistent form (program p owns tasks p, p + P, ...) lacks this and deadlocks when its
programs are not all resident. Each wait still gives up after a bounded number of polls and
raises an error flag that the host reads (belt and braces: a bug in a dependency count, say).

Activations produced inside the launch are read with `.cg` (L2, not the SM's L1, which is not
coherent across SMs): h is read by q/k/v, written by o_proj and read again by gate/up in one
launch. bf16 (dense) weights only.
"""
import triton
import triton.language as tl

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.attention import _attend_block
from decode_monitor.engine.fused.gemv import _qkv_rope_store

# Counters of one layer (int32): the ticket, then one done-count per stage, then one per KV head.
TICKET, QKV_DONE, MERGE_DONE, O_DONE, GU_DONE, ATT_DONE = 0, 1, 2, 3, 4, 8
SPIN_LIMIT = 1 << 20  # polls of a counter (an L2 round trip each) before a wait gives up


@triton.jit
def _wait(C, need, ERR, LIMIT: tl.constexpr):
    """Poll counter C (volatile loads: L2, not L1) until it reaches `need`; then acquire it."""
    n = 0
    while (tl.load(C, volatile=True) < need) & (n < LIMIT):
        n += 1
    # the acquire; its result is used, or the compiler drops an atomic add of 0
    if tl.atomic_add(C, 0, sem='acquire') < need:
        tl.atomic_xchg(ERR, 1)  # gave up: the host reads the flag after the step
    tl.debug_barrier()  # every thread's loads after the acquire


@triton.jit
def _done(C):
    tl.debug_barrier()  # every thread's stores are issued before one thread releases them
    tl.atomic_add(C, 1, sem='release')


@triton.jit
def _l2_prefetch(ptrs):
    """Ask L2 for the 128-byte lines at ptrs; nothing comes back to registers."""
    tl.inline_asm_elementwise('prefetch.global.L2 [$1]; mov.u32 $0, 0;', '=r,l', [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_lines(W, rows, K: tl.constexpr, LINES: tl.constexpr):
    """The first LINES 128-byte lines (64 bf16 weights each) of each of rows, into L2."""
    cols = tl.minimum(tl.arange(0, LINES) * 64, K - 1)
    _l2_prefetch(W + rows.to(tl.int64)[:, None] * K + cols[None, :])


@triton.jit
def _prefetch_rows(W, blk, C, need, N: tl.constexpr, K: tl.constexpr, PAIR: tl.constexpr,
                   BLOCK_N: tl.constexpr, LINES: tl.constexpr):
    """While this task's inputs are not ready (C below need), bring the start of its weight
    rows (and of rows + N, PAIR) into L2: the weights never depend on the wait, so HBM keeps
    streaming through a dependency stall."""
    if tl.load(C, volatile=True) < need:
        rows = tl.minimum(blk * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
        _prefetch_lines(W, rows, K, LINES)
        if PAIR:
            _prefetch_lines(W, rows + N, K, LINES)


@triton.jit
def _rows_dot(W, X, NW, rows_a, rows_b, K: tl.constexpr, NORM: tl.constexpr,
              PAIR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(W x')[rows_a], (W x')[rows_b] (PAIR), sum x^2; x' = g * x if NORM. x read through L2."""
    acc_a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    wa_rows = W + rows_a.to(tl.int64)[:, None] * K
    wb_rows = W + rows_b.to(tl.int64)[:, None] * K
    for k0 in tl.range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        x = tl.load(X + cols, mask=kmask, other=0.0, cache_modifier='.cg').to(tl.float32)
        wa = tl.load(wa_rows + cols[None, :], mask=kmask[None, :], other=0.0)
        if PAIR:
            wb = tl.load(wb_rows + cols[None, :], mask=kmask[None, :], other=0.0)
        if NORM:
            ss += x * x
            x = x * tl.load(NW + cols, mask=kmask, other=0.0).to(tl.float32)
        acc_a += wa.to(tl.float32) * x[None, :]
        if PAIR:
            acc_b += wb.to(tl.float32) * x[None, :]
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(ss, axis=0)


@triton.jit
def _qkv_task(blk, WQKV, BQKV, H, LN1, COS, SIN, POS, Q, KC, VC, eps, cache_head_stride,
              HIDDEN: tl.constexpr, N_PAIRS: tl.constexpr, Q_PAIRS: tl.constexpr,
              K_PAIRS: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gemv.qkv_rope_kernel's work for one block of rotate-half row pairs."""
    p = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < N_PAIRS
    p = tl.minimum(p, N_PAIRS - 1)
    j = p % HALF
    rows_a = (p // HALF) * (2 * HALF) + j
    rows_b = rows_a + HALF
    a, b, ss = _rows_dot(WQKV, H, LN1, rows_a, rows_b, HIDDEN, True, True, BLOCK_N, BLOCK_K)
    _qkv_rope_store(a, b, ss, p, p_mask, j, rows_a, rows_b, BQKV, COS, SIN, POS, Q, KC, VC, eps,
                    Q_PAIRS, K_PAIRS, cache_head_stride, HIDDEN, HALF, HAS_BIAS)


@triton.jit
def _attention_task(h, sid, Q, KC, VC, POS, PART_O, PART_M, PART_L, cache_head_stride,
                    scale_log2, N_SPLITS: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
                    G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                    IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """attention.attention_split_kernel's work for KV head h, split sid; q read through L2."""
    length = tl.load(POS).to(tl.int32) + 1
    chunk = tl.cdiv(tl.cdiv(length, N_SPLITS), BLOCK_T) * BLOCK_T
    start = sid * chunk
    end = tl.minimum(start + chunk, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + (h * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0,
                cache_modifier='.cg')
    k_head = KC + h * cache_head_stride
    v_head = VC + h * cache_head_stride
    m = tl.full((G_PAD,), float('-inf'), dtype=tl.float32)
    l_sum = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    if WHILE_LOOP:  # the CPU interpreter cannot iterate a range with bounds read from memory
        t0 = start
        while t0 < end:
            m, l_sum, acc = _attend_block(q, k_head, v_head, t0, end, m, l_sum, acc,
                                          scale_log2, D, BLOCK_T, IEEE)
            t0 += BLOCK_T
    else:
        for t0 in tl.range(start, end, BLOCK_T):
            m, l_sum, acc = _attend_block(q, k_head, v_head, t0, end, m, l_sum, acc,
                                          scale_log2, D, BLOCK_T, IEEE)
    part = h * N_SPLITS + sid
    keep = g < G_P2
    tl.store(PART_O + (part * G_P2 + g)[:, None] * D + d[None, :], acc, mask=keep[:, None])
    tl.store(PART_M + part * G_P2 + g, m, mask=keep)
    tl.store(PART_L + part * G_P2 + g, l_sum, mask=keep)


@triton.jit
def _merge_task(qh, PART_O, PART_M, PART_L, ATT, N_SPLITS: tl.constexpr, S_P2: tl.constexpr,
                S_BLOCK: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr):
    """attention.attention_merge_kernel's work for query head qh; partials read through L2."""
    first = (qh // G) * N_SPLITS
    r = qh % G
    d = tl.arange(0, D)
    s = tl.arange(0, S_P2)
    s_mask = s < N_SPLITS
    m_s = tl.load(PART_M + (first + s) * G_P2 + r, mask=s_mask, other=float('-inf'),
                  cache_modifier='.cg')
    l_s = tl.load(PART_L + (first + s) * G_P2 + r, mask=s_mask, other=0.0, cache_modifier='.cg')
    m_all = tl.max(m_s, axis=0)
    den = tl.sum(tl.exp2(m_s - m_all) * l_s, axis=0)
    out = tl.zeros((D,), dtype=tl.float32)
    for s0 in tl.static_range(0, S_P2, S_BLOCK):  # S_BLOCK rows of D at a time in registers
        sb = s0 + tl.arange(0, S_BLOCK)
        sb_mask = sb < N_SPLITS
        w = tl.exp2(tl.load(PART_M + (first + sb) * G_P2 + r, mask=sb_mask,
                            other=float('-inf'), cache_modifier='.cg') - m_all)
        o = tl.load(PART_O + ((first + sb) * G_P2 + r)[:, None] * D + d[None, :],
                    mask=sb_mask[:, None], other=0.0, cache_modifier='.cg')
        out += tl.sum(w[:, None] * o, axis=0)
    tl.store(ATT + qh * D + d, (out / den).to(ATT.dtype.element_ty))


@triton.jit
def _gemv_task(blk, W, X, NW, R, Y, N: tl.constexpr, K: tl.constexpr, eps,
               NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gemv.gemv_kernel's work for one row block (no split-K)."""
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    a, b, ss = _rows_dot(W, X, NW, rows, rows + N, K, NORM, GATED, BLOCK_N, BLOCK_K)
    if NORM:
        rstd = tl.rsqrt(ss / K + eps)
        a = a * rstd
        b = b * rstd
    if GATED:
        y = a * tl.sigmoid(a) * b
    else:
        y = a
    if RESIDUAL:
        y += tl.load(R + rows, mask=row_mask, other=0.0, cache_modifier='.cg').to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_mask)


@triton.jit
def layer_kernel(WQKV, BQKV, WO, WGU, WD, LN1, LN2, H, Q, ATT, ACT, COS, SIN, POS, KC, VC,
                 PART_O, PART_M, PART_L, CNT, ERR, eps, scale_log2, cache_head_stride,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr, Q_HEADS: tl.constexpr,
                 KV_HEADS: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
                 N_SPLITS: tl.constexpr, S_P2: tl.constexpr, S_BLOCK: tl.constexpr,
                 G_P2: tl.constexpr,
                 G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
                 WHILE_LOOP: tl.constexpr, BN_QKV: tl.constexpr, BN_O: tl.constexpr,
                 BN_GU: tl.constexpr, BN_D: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREFETCH: tl.constexpr, SPIN: tl.constexpr, PDL: tl.constexpr):
    """One decoder layer; any grid. CNT: this layer's counters, zeroed before the launch."""
    G: tl.constexpr = Q_HEADS // KV_HEADS
    D: tl.constexpr = 2 * HALF
    Q_PAIRS: tl.constexpr = Q_HEADS * HALF
    K_PAIRS: tl.constexpr = KV_HEADS * HALF
    N_PAIRS: tl.constexpr = Q_PAIRS + 2 * K_PAIRS
    N_QKV: tl.constexpr = (N_PAIRS + BN_QKV - 1) // BN_QKV
    N_O: tl.constexpr = (HIDDEN + BN_O - 1) // BN_O
    N_GU: tl.constexpr = (INTER + BN_GU - 1) // BN_GU
    N_D: tl.constexpr = (HIDDEN + BN_D - 1) // BN_D
    E_QKV: tl.constexpr = N_QKV
    E_ATT: tl.constexpr = E_QKV + KV_HEADS * N_SPLITS
    E_MERGE: tl.constexpr = E_ATT + Q_HEADS
    E_O: tl.constexpr = E_MERGE + N_O
    E_GU: tl.constexpr = E_O + N_GU
    TOTAL: tl.constexpr = E_GU + N_D
    # PDL: the next layer's programs may become resident as ours exit; ours took their first
    # ticket (this layer's counters were zeroed before the step's first layer) and wait for the
    # last layer to complete before touching h, prefetching their q/k/v rows meanwhile.
    pdl.allow_next_kernel(PDL)
    t = tl.atomic_add(CNT + 0, 1, sem='relaxed')
    if PDL:
        if PREFETCH > 0:
            if t < E_QKV:
                p = tl.minimum(t * BN_QKV + tl.arange(0, BN_QKV), N_PAIRS - 1)
                rows = (p // HALF) * D + p % HALF
                _prefetch_lines(WQKV, rows, HIDDEN, PREFETCH)
                _prefetch_lines(WQKV, rows + HALF, HIDDEN, PREFETCH)
        pdl.wait_for_previous_kernel(PDL)
    while t < TOTAL:
        if t < E_QKV:
            _qkv_task(t, WQKV, BQKV, H, LN1, COS, SIN, POS, Q, KC, VC, eps, cache_head_stride,
                      HIDDEN, N_PAIRS, Q_PAIRS, K_PAIRS, HALF, HAS_BIAS, BN_QKV, BLOCK_K)
            _done(CNT + 1)
        elif t < E_ATT:
            a = t - E_QKV
            _wait(CNT + 1, N_QKV, ERR, SPIN)
            _attention_task(a // N_SPLITS, a % N_SPLITS, Q, KC, VC, POS, PART_O, PART_M,
                            PART_L, cache_head_stride, scale_log2, N_SPLITS, G, G_P2, G_PAD,
                            D, BLOCK_T, IEEE, WHILE_LOOP)
            _done(CNT + 8 + a // N_SPLITS)
        elif t < E_MERGE:
            qh = t - E_ATT
            _wait(CNT + 8 + qh // G, N_SPLITS, ERR, SPIN)
            _merge_task(qh, PART_O, PART_M, PART_L, ATT, N_SPLITS, S_P2, S_BLOCK, G, G_P2, D)
            _done(CNT + 2)
        elif t < E_O:
            if PREFETCH > 0:
                _prefetch_rows(WO, t - E_MERGE, CNT + 2, Q_HEADS, HIDDEN, Q_HEADS * D, False,
                               BN_O, PREFETCH)
            _wait(CNT + 2, Q_HEADS, ERR, SPIN)
            _gemv_task(t - E_MERGE, WO, ATT, LN2, H, H, HIDDEN, Q_HEADS * D, eps,
                       False, False, True, BN_O, BLOCK_K)
            _done(CNT + 3)
        elif t < E_GU:
            if PREFETCH > 0:
                _prefetch_rows(WGU, t - E_O, CNT + 3, N_O, INTER, HIDDEN, True, BN_GU, PREFETCH)
            _wait(CNT + 3, N_O, ERR, SPIN)
            _gemv_task(t - E_O, WGU, H, LN2, H, ACT, INTER, HIDDEN, eps,
                       True, True, False, BN_GU, BLOCK_K)
            _done(CNT + 4)
        else:
            if PREFETCH > 0:
                _prefetch_rows(WD, t - E_GU, CNT + 4, N_GU, HIDDEN, INTER, False, BN_D,
                               PREFETCH)
            _wait(CNT + 4, N_GU, ERR, SPIN)
            _gemv_task(t - E_GU, WD, ACT, LN2, H, H, HIDDEN, INTER, eps,
                       False, False, True, BN_D, BLOCK_K)
        t = tl.atomic_add(CNT + 0, 1, sem='relaxed')
