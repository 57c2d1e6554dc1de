"""One launch per decoder layer (or per part of one): resident programs take tasks from a ticket.

A layer is a chain of tasks: q/k/v row blocks (RMSNorm, bias, RoPE, cache write), attention
partials (one per KV head and split of the prefix), their merge (one per query head), o_proj row
blocks (+ residual), gate/up row blocks (RMSNorm, SiLU * up) and down row blocks (+ residual).
Every program of a launch loops: it takes the next ticket from a counter in global memory,
waits until the tickets it depends on have been counted done, runs it, and counts it done. So
the weights are streamed matrix after matrix with no kernel boundary in between, and a program
that finishes its last o_proj block starts on gate/up while others finish theirs.

A launch runs any of three parts of a layer (DO_QKV, DO_ATT: attention and merge, DO_MLP:
o_proj, gate/up, down), so a layer is one launch, or two around attention (the attention task
needs ~160-190 registers, and a kernel's count is that of its largest branch: the matrices then
stream from a leaner kernel with more programs an SM), or q/k/v and o_proj..down with the
separate attention kernels between them (persistent_launch.py picks the layout).

A ticket of a matrix is a range of R row blocks (fewer atomics, and one software-pipelined loop
over the range's blocks and K chunks, so the loads run ahead across block boundaries); the last
tickets of each matrix are single blocks, so the programs finish the matrix together.

Dependencies, each a counter of done tickets in global memory (released after the task's
stores, acquired before its loads); only on tasks of the same launch (a launch boundary orders
the rest):
- attention (KV head h, any split) needs every q/k/v ticket (the RMSNorm needs the whole input
  vector, so a q/k/v block cannot finish before all of h is read, and all blocks run at once);
- the merge of query head r needs the partials of its own KV head only;
- an o_proj ticket needs every merged head; gate/up needs every o_proj ticket (its RMSNorm reads
  all of h); a down ticket needs every gate/up ticket.

Why it cannot hang: tickets are taken in task order by programs that are already running, and a
task depends only on tasks with smaller numbers. The smallest task not yet done is therefore
held by a running program whose dependencies are all done, so it finishes, whatever number of
programs is resident. With AHEAD a program takes its next ticket before it runs the current one
(the atomic's round trip overlaps the task): the smallest task not done is then either some
program's current task, as before, or the next ticket of a program whose current task is
smaller and therefore done, so that program has moved on to it. A launch larger than what fits
on the GPU only queues idle programs. The naive persistent form (program p owns tasks p, p + P,
...) lacks this and deadlocks when its programs are not all resident. Each wait still gives up
after a bounded number of polls and raises an error flag that the host reads (belt and braces:
a bug in a dependency count, say).

Activations produced inside the launch are read with `.cg` (L2, not the SM's L1, which is not
coherent across SMs): h is read by q/k/v, written by o_proj and read again by gate/up in one
launch. The matrix tasks (persistent_matrices.py) read dense weights, or int8 / int4 codes
dequantised in registers as the fused GEMVs do (dequant.chunk_dots: each chunk loaded and
multiplied in one step of the ticket's loop, which Triton pipelines; the fused GEMV's own
register prefetch is not used here).
"""
import triton
import triton.language as tl

from decode_monitor.engine.fused import pdl
from decode_monitor.engine.fused.attention import _attend_block
from decode_monitor.engine.fused.persistent_matrices import _gemv_ticket, _qkv_ticket

# Counters of one layer (int32): the ticket of a launch that starts at q/k/v, one done-count per
# stage, the ticket of a launch that starts at o_proj, then one done-count per KV head.
# (constexpr: a kernel may read them; the host takes int() of them)
TICKET, QKV_DONE, MERGE_DONE, O_DONE, GU_DONE, TICKET_MLP, ATT_DONE = (
    tl.constexpr(v) for v in (0, 1, 2, 3, 4, 5, 8))
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
def layer_kernel(WQKV, BQKV, WO, WGU, WD, LN1, LN2, H, Q, ATT, ACT, COS, SIN, POS, KC, VC,
                 PART_O, PART_M, PART_L, CNT, ERR, eps, scale_log2, cache_head_stride,
                 SQKV, ZQKV, SO, ZO, SGU, ZGU, SD, ZD, sw_qkv, ss_qkv, sw_o, ss_o, sw_gu, ss_gu,
                 sw_d, ss_d, FMT: tl.constexpr, SUBK: tl.constexpr, G_QKV: tl.constexpr,
                 G_O: tl.constexpr, G_GU: tl.constexpr, G_D: tl.constexpr, PTX: tl.constexpr,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr, Q_HEADS: tl.constexpr,
                 KV_HEADS: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
                 N_SPLITS: tl.constexpr, S_P2: tl.constexpr, S_BLOCK: tl.constexpr,
                 G_P2: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                 IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr,
                 DO_QKV: tl.constexpr, DO_ATT: tl.constexpr, DO_MLP: tl.constexpr,
                 TICKET_AT: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr,
                 R_QKV: tl.constexpr, BIG_QKV: tl.constexpr, R_O: tl.constexpr,
                 BIG_O: tl.constexpr, R_GU: tl.constexpr, BIG_GU: tl.constexpr,
                 R_D: tl.constexpr, BIG_D: tl.constexpr, STAGES: tl.constexpr,
                 AHEAD: tl.constexpr,
                 SPIN: tl.constexpr, PDL: tl.constexpr):
    """The parts DO_* of one decoder layer; any grid. CNT: this layer's counters, zeroed before
    the launch. A matrix of N blocks has BIG tickets of R blocks, then one a block.
    FMT 0: dense matrices; 1 / 2: int8 / int4 codes (int32 words) with scales S*, offsets Z*
    (int4), row strides sw_* (words) and ss_*, groups G_* (quant.py; gemv._weight_args)."""
    G: tl.constexpr = Q_HEADS // KV_HEADS
    D: tl.constexpr = 2 * HALF
    Q_PAIRS: tl.constexpr = Q_HEADS * HALF
    K_PAIRS: tl.constexpr = KV_HEADS * HALF
    N_PAIRS: tl.constexpr = Q_PAIRS + 2 * K_PAIRS
    T_QKV: tl.constexpr = BIG_QKV + (N_PAIRS + BN - 1) // BN - BIG_QKV * R_QKV
    T_O: tl.constexpr = BIG_O + (HIDDEN + BN - 1) // BN - BIG_O * R_O
    T_GU: tl.constexpr = BIG_GU + (INTER + BN - 1) // BN - BIG_GU * R_GU
    T_D: tl.constexpr = BIG_D + (HIDDEN + BN - 1) // BN - BIG_D * R_D
    E_QKV: tl.constexpr = T_QKV * DO_QKV
    E_ATT: tl.constexpr = E_QKV + KV_HEADS * N_SPLITS * DO_ATT
    E_MERGE: tl.constexpr = E_ATT + Q_HEADS * DO_ATT
    E_O: tl.constexpr = E_MERGE + T_O * DO_MLP
    E_GU: tl.constexpr = E_O + T_GU * DO_MLP
    TOTAL: tl.constexpr = E_GU + T_D * DO_MLP
    # PDL: the next launch's programs may become resident as ours exit; ours took their first
    # ticket (every counter of the step was zeroed before its first layer) and wait for the
    # launch before to complete before touching anything it wrote.
    pdl.allow_next_kernel(PDL)
    t = tl.atomic_add(CNT + TICKET_AT, 1, sem='relaxed')
    pdl.wait_for_previous_kernel(PDL)
    while t < TOTAL:
        if AHEAD:
            nt = tl.atomic_add(CNT + TICKET_AT, 1, sem='relaxed')
        if t < E_QKV:
            if DO_QKV:
                _qkv_ticket(t, BIG_QKV, R_QKV, WQKV, SQKV, ZQKV, sw_qkv, ss_qkv, BQKV, H, LN1,
                            COS, SIN, POS, Q, KC, VC, eps, cache_head_stride, HIDDEN, N_PAIRS,
                            Q_PAIRS, K_PAIRS, HALF, HAS_BIAS, BN, BLOCK_K, STAGES, WHILE_LOOP,
                            FMT, G_QKV, SUBK, PTX)
                _done(CNT + QKV_DONE)
        elif t < E_MERGE:
            if DO_ATT:
                if t < E_ATT:
                    a = t - E_QKV
                    if DO_QKV:
                        _wait(CNT + QKV_DONE, T_QKV, ERR, SPIN)
                    _attention_task(a // N_SPLITS, a % N_SPLITS, Q, KC, VC, POS, PART_O,
                                    PART_M, PART_L, cache_head_stride, scale_log2, N_SPLITS,
                                    G, G_P2, G_PAD, D, BLOCK_T, IEEE, WHILE_LOOP)
                    _done(CNT + ATT_DONE + a // N_SPLITS)
                else:
                    qh = t - E_ATT
                    _wait(CNT + ATT_DONE + qh // G, N_SPLITS, ERR, SPIN)
                    _merge_task(qh, PART_O, PART_M, PART_L, ATT, N_SPLITS, S_P2, S_BLOCK, G,
                                G_P2, D)
                    _done(CNT + MERGE_DONE)
        else:
            if DO_MLP:
                if t < E_O:
                    if DO_ATT:
                        _wait(CNT + MERGE_DONE, Q_HEADS, ERR, SPIN)
                    _gemv_ticket(t - E_MERGE, BIG_O, R_O, WO, SO, ZO, sw_o, ss_o, ATT, LN2, H,
                                 H, HIDDEN, Q_HEADS * D, eps, False, False, True, BN, BLOCK_K,
                                 STAGES, WHILE_LOOP, FMT, G_O, SUBK, PTX)
                    _done(CNT + O_DONE)
                elif t < E_GU:
                    _wait(CNT + O_DONE, T_O, ERR, SPIN)
                    _gemv_ticket(t - E_O, BIG_GU, R_GU, WGU, SGU, ZGU, sw_gu, ss_gu, H, LN2, H,
                                 ACT, INTER, HIDDEN, eps, True, True, False, BN, BLOCK_K, STAGES,
                                 WHILE_LOOP, FMT, G_GU, SUBK, PTX)
                    _done(CNT + GU_DONE)
                else:
                    _wait(CNT + GU_DONE, T_GU, ERR, SPIN)
                    _gemv_ticket(t - E_GU, BIG_D, R_D, WD, SD, ZD, sw_d, ss_d, ACT, LN2, H, H,
                                 HIDDEN, INTER, eps, False, False, True, BN, BLOCK_K, STAGES,
                                 WHILE_LOOP, FMT, G_D, SUBK, PTX)
        if AHEAD:
            t = nt
        else:
            t = tl.atomic_add(CNT + TICKET_AT, 1, sem='relaxed')
