"""int8 / int4 GEMVs with x' staged in shared memory and every layout set by hand (Gluon).

The products of gemv.gemv_kernel's quantised cases: gate/up (RMSNorm of x, [gate; up] = W x',
silu(gate) * up) and a plain GEMV, its residual added or its RMSNorm applied (o_proj,
down_proj, lm_head), with the int4 arithmetic of dequant.py for both formats: a code masked in
place in its word is an fp32 denormal, x' is scaled for each lane's place, and a sub-block's
dot is scaled once: s sum q x' + m sum x' (int4), s (sum (q + 128) x' - 128 sum x') (int8,
whose bytes become q + 128 by one XOR a word; the shipped Triton kernel makes each byte a
float by a permute and an exact subtract instead). Organised so that no value moves between
threads inside the K loop:

- Once a program, after the PDL wait, x' (x g with RMSNorm, else x) is computed for the
  program's share of K, scaled for each lane's denormals, and stored in shared memory in the
  order the loop reads it, with each sub-block's sum of x' beside it; sum(x^2) for the norm is
  taken there too. A plain GEMV may split K (down_proj's K is 5x the hidden size: all of its
  x' would not fit), its partial sums combined in split order by the row block's last program.
- The code words are a (BLOCK_N, NSUB, 4) tile, four consecutive words (one 16-byte load, a
  sub-block: 32 int4 or 16 int8 codes) of a row a thread; a thread reads the x' of its own
  sub-block from shared memory (one 16-byte read a lane), the scales and offsets in the layout
  of the sub-block dots, and sums its dots itself. The next one or two chunks' words, scales
  and offsets are loaded before the current chunk is multiplied, the first before the PDL wait
  (the weights are constant).

Written in Triton's language, the loop recomputes x' from global memory in every iteration
and moves it, and the dots, between layouts through shared memory (a dozen barriers a chunk,
benchmarks/NOTES.md); Triton's layout assignment leaves a kernel no way around that. Gluon
takes the layouts as given. It compiles for CUDA only: gemv.gemv runs this kernel where a
config asks for it (`GemvConfig.staged`) on a GPU that has Gluon's targets, and the Triton
kernel everywhere else (CPU, the interpreter, bf16). q/k/v, with its RoPE epilogue, runs the
same loop (`stream`) in staged_qkv.py.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from decode_monitor.engine.fused import pdl

DOT_EXP = gl.constexpr(48)  # dequant.DOT_EXP: products are x q 2^-DOT_EXP


@gluon.jit
def _chunk(W, S, Z, w_off, s_off, k0, INT4: gl.constexpr, GROUP: gl.constexpr):
    """Code words (BLOCK_N, NSUB, 4) of the chunk at k0, its sub-blocks' scales and offsets
    (int8 has none: its scales again, unused)."""
    g = k0 // GROUP
    words = gl.load(W + w_off + k0 // (8 if INT4 else 4))
    scales = gl.load(S + s_off + g)
    offsets = scales
    if INT4:
        offsets = gl.load(Z + s_off + g)
    return words, scales, offsets


@gluon.jit
def _x_cols(c, i, s, t, INT4: gl.constexpr, GROUP: gl.constexpr, BLOCK_K: gl.constexpr):
    """The column of x that lane i of word t of sub-block s of chunk c meets. int4: word w of a
    group holds weights w + i GROUP / 8 (quant.py); int8: byte i of word w is weight 4 w + i."""
    if INT4:
        GW: gl.constexpr = GROUP // 8  # words a group
        return c * BLOCK_K + (s // (GW // 4)) * GROUP + (s % (GW // 4)) * 4 + t + i * GW
    else:
        return c * BLOCK_K + s * 16 + t * 4 + i


@gluon.jit
def _stage_x(X, NW, c0, CHUNKS: gl.constexpr, NORM: gl.constexpr, INT4: gl.constexpr,
             GROUP: gl.constexpr, BLOCK_K: gl.constexpr, CH2: gl.constexpr, NSUB: gl.constexpr,
             WARPS: gl.constexpr):
    """x' for chunks c0 .. c0 + CH2 of K (those from CHUNKS on, past K's end, are zeros) in
    shared memory, (CH2 * LANES, NSUB, 4): [c * LANES + i, s, t] is the x g (NORM; else x) that
    lane i of word t of sub-block s of chunk c0 + c meets, scaled for that lane's denormals
    (2^(149 - DOT_EXP) over the lane's place in its word); each sub-block's sum of x g,
    (CH2, NSUB); and sum(x^2) over those chunks. CH2 a power of 2. Lanes: int4 codes 0-7
    (nibbles; 4-7 shifted down by 16 bits), int8 bytes 0-3 (2 and 3 shifted down by 16)."""
    LANES: gl.constexpr = 8 if INT4 else 4
    SUBW: gl.constexpr = 32 if INT4 else 16  # weights a sub-block
    P3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [4, 8, 1], [WARPS, 1, 1], [2, 1, 0])
    q = gl.expand_dims(gl.expand_dims(
        gl.arange(0, CH2 * LANES, layout=gl.SliceLayout(1, gl.SliceLayout(2, P3))), 1), 2)
    s = gl.expand_dims(gl.expand_dims(
        gl.arange(0, NSUB, layout=gl.SliceLayout(0, gl.SliceLayout(2, P3))), 0), 2)
    t = gl.expand_dims(gl.expand_dims(
        gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, P3))), 0), 1)
    cols = _x_cols(c0 + q // LANES, q % LANES, s, t, INT4, GROUP, BLOCK_K)
    valid = (c0 + q // LANES < CHUNKS) & (s >= 0) & (t >= 0)
    x = gl.load(X + cols, mask=valid, other=0.0).to(gl.float32)
    sum_sq = gl.sum(gl.sum(gl.sum(x * x, axis=2), axis=1), axis=0)
    xg = x
    if NORM:
        xg = x * gl.load(NW + cols, mask=valid, other=0.0).to(gl.float32)
    if INT4:
        place = 4 * (q % 4)  # bit of the nibble's lowest place within its half word
    else:
        place = 8 * (q % 2)
    lane_scale = ((276 - DOT_EXP - place) << 23).to(gl.float32, bitcast=True)  # 127 + 149
    # stored row-major, then viewed as CH2 * LANES tiles of (NSUB, 4), a view `index` can take
    xs = gl.allocate_shared_memory(
        gl.float32, [CH2 * LANES, NSUB, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]),
        xg * lane_scale)._reinterpret(gl.float32, [CH2 * LANES, NSUB, 4],
                                      gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    # each sub-block's sum of x g: (CH2, NSUB, SUBW) summed over its weights
    Q3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [WARPS, 1, 1], [2, 1, 0])
    c2 = gl.expand_dims(gl.expand_dims(
        gl.arange(0, CH2, layout=gl.SliceLayout(1, gl.SliceLayout(2, Q3))), 1), 2)
    s2 = gl.expand_dims(gl.expand_dims(
        gl.arange(0, NSUB, layout=gl.SliceLayout(0, gl.SliceLayout(2, Q3))), 0), 2)
    p2 = gl.expand_dims(gl.expand_dims(
        gl.arange(0, SUBW, layout=gl.SliceLayout(0, gl.SliceLayout(1, Q3))), 0), 1)
    cols2 = _x_cols(c0 + c2, p2 // 4, s2, p2 % 4, INT4, GROUP, BLOCK_K)
    valid2 = (c0 + c2 < CHUNKS) & (s2 >= 0) & (p2 >= 0)
    xg2 = gl.load(X + cols2, mask=valid2, other=0.0).to(gl.float32)
    if NORM:
        xg2 = xg2 * gl.load(NW + cols2, mask=valid2, other=0.0).to(gl.float32)
    sums = gl.allocate_shared_memory(
        gl.float32, [CH2, NSUB], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        gl.sum(xg2, axis=2))._reinterpret(gl.float32, [CH2, NSUB],
                                          gl.SwizzledSharedLayout(1, 1, 1, [0]))
    gl.thread_barrier()
    return xs, sums, sum_sq


@gluon.jit
def _lane(words, high, i: gl.constexpr, INT4: gl.constexpr):
    """Lane i of the code words as an fp32 denormal, masked in place (in `high`, the words
    shifted down by 16 bits, for the upper half)."""
    if INT4:
        if i < 4:
            v = words & (15 << (4 * i))
        else:
            v = high & (15 << (4 * (i - 4)))
    else:
        if i < 2:
            v = words & (255 << (8 * i))
        else:
            v = high & (255 << (8 * (i - 2)))
    return v.to(gl.float32, bitcast=True)


@gluon.jit
def _dots(words, xs, c, INT4: gl.constexpr, L3: gl.constexpr, LX: gl.constexpr):
    """(BLOCK_N, NSUB) sums over each sub-block of code x x' (x' from shared memory), the
    codes as denormals: int4 q, int8 q + 128 (a XOR of each byte's sign bit)."""
    LANES: gl.constexpr = 8 if INT4 else 4
    if not INT4:
        words = words ^ -2139062144  # 0x80808080: q + 128 in every byte
    high = words.to(gl.uint32, bitcast=True) >> 16
    p = gl.zeros(words.shape, gl.float32, L3)
    for i in gl.static_range(LANES):
        p += _lane(words, high, i, INT4) * gl.expand_dims(xs.index(c * LANES + i).load(LX), 0)
    return gl.sum(p, axis=2)


@gluon.jit
def _accumulate(acc, words, scales, offsets, xs, sums, c, INT4: gl.constexpr, L3: gl.constexpr,
                LX: gl.constexpr, LD: gl.constexpr):
    """acc (BLOCK_N, NSUB) plus chunk c's scaled sub-block dots."""
    d = _dots(words, xs, c, INT4, L3, LX)
    x_sum = gl.expand_dims(sums.index(c).load(gl.SliceLayout(0, LD)), 0)
    scale: gl.constexpr = 2.0 ** DOT_EXP
    if INT4:  # s sum q x' + m sum x'
        acc += d * (scales.to(gl.float32) * scale) + offsets.to(gl.float32) * x_sum
    else:  # s (sum (q + 128) x' - 128 sum x')
        acc += scales.to(gl.float32) * (d * scale - 128.0 * x_sum)
    return acc


@gluon.jit
def stream(W, S, Z, X, NW, wa_off, wb_off, sa_off, sb_off, c0, mine, CHUNKS: gl.constexpr,
           PAIR: gl.constexpr, NORM: gl.constexpr, INT4: gl.constexpr, GROUP: gl.constexpr,
           BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, CH2: gl.constexpr,
           NSUB: gl.constexpr, AHEAD: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr,
           L3: gl.constexpr, LX: gl.constexpr, LD: gl.constexpr):
    """A program's pass over `mine` chunks of K from chunk c0: the first AHEAD chunks of codes
    requested before the PDL wait, x' staged after it, then the loop; allows the next kernel's
    launch at its end. Returns the sub-block dots (BLOCK_N, NSUB) of the rows at wa_off and (if
    PAIR) wb_off, and sum(x^2) over the share."""
    wa, sa, ma = _chunk(W, S, Z, wa_off, sa_off, c0 * BLOCK_K, INT4, GROUP)
    wb, sb, mb = wa, sa, ma
    if PAIR:
        wb, sb, mb = _chunk(W, S, Z, wb_off, sb_off, c0 * BLOCK_K, INT4, GROUP)
    if AHEAD == 2:  # the second chunk requested before the wait too
        second = (c0 + gl.minimum(1, mine - 1)) * BLOCK_K
        wa2, sa2, ma2 = _chunk(W, S, Z, wa_off, sa_off, second, INT4, GROUP)
        wb2, sb2, mb2 = wa2, sa2, ma2
        if PAIR:
            wb2, sb2, mb2 = _chunk(W, S, Z, wb_off, sb_off, second, INT4, GROUP)
    pdl.wait_for_previous_kernel(PDL)
    xs, sums, sum_sq = _stage_x(X, NW, c0, CHUNKS, NORM, INT4, GROUP, BLOCK_K, CH2, NSUB,
                                WARPS)
    acc_a = gl.zeros([BLOCK_N, NSUB], gl.float32, LD)
    acc_b = gl.zeros([BLOCK_N, NSUB], gl.float32, LD)
    for c in range(mine):
        # AHEAD chunks past this one are requested before it is multiplied; past the share's
        # end the last chunk reloads itself
        nxt = (c0 + gl.minimum(c + AHEAD, mine - 1)) * BLOCK_K
        na, nsa, nma = _chunk(W, S, Z, wa_off, sa_off, nxt, INT4, GROUP)
        if PAIR:
            nb, nsb, nmb = _chunk(W, S, Z, wb_off, sb_off, nxt, INT4, GROUP)
        acc_a = _accumulate(acc_a, wa, sa, ma, xs, sums, c, INT4, L3, LX, LD)
        if PAIR:
            acc_b = _accumulate(acc_b, wb, sb, mb, xs, sums, c, INT4, L3, LX, LD)
        if AHEAD == 2:
            wa, sa, ma, wb, sb, mb = wa2, sa2, ma2, wb2, sb2, mb2
            wa2, sa2, ma2 = na, nsa, nma
            if PAIR:
                wb2, sb2, mb2 = nb, nsb, nmb
        else:
            wa, sa, ma = na, nsa, nma
            if PAIR:
                wb, sb, mb = nb, nsb, nmb
    pdl.allow_next_kernel(PDL)
    return acc_a, acc_b, sum_sq


@gluon.jit
def _combine(ACC, CNT, rows, row_mask, y, N, SPLIT: gl.constexpr):
    """Split-K: store this program's partial sums; the last of the row block's SPLIT programs
    to arrive (a ticket) adds all SPLIT partials in split order (gemv._combine_splits' rule:
    the same bits every run) and resets the ticket. Returns (y, whether this program stores)."""
    block = gl.program_id(0)
    gl.store(ACC + gl.program_id(1) * N + rows, y, mask=row_mask)
    gl.thread_barrier()  # every thread's partial is stored before the ticket is taken
    last = gl.atomic_add(CNT + block, 1, sem='acq_rel') == SPLIT - 1
    if last:
        y = gl.load(ACC + rows, mask=row_mask, other=0.0, cache_modifier='.cg')
        for i in gl.static_range(1, SPLIT):
            y += gl.load(ACC + i * N + rows, mask=row_mask, other=0.0, cache_modifier='.cg')
        gl.atomic_xchg(CNT + block, 0)
    return y, row_mask & last


@gluon.jit
def staged_kernel(W, S, Z, X, NW, R, Y, ACC, CNT, N, K: gl.constexpr, stride_w, stride_s, eps,
                  GATED: gl.constexpr, NORM: gl.constexpr, RESIDUAL: gl.constexpr,
                  INT4: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, CH2: gl.constexpr, SPLIT: gl.constexpr,
                  AHEAD: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr):
    """Y = W rmsnorm(x) (NORM; else W x) (+ R); GATED: W is [gate; up], Y = silu(g) * u. W code
    words (N or 2N, K / 8 or K / 4), S the scales and (int4) Z the offsets, (N or 2N, K / GROUP).
    Grid (row blocks, SPLIT): program (b, j) takes chunks j P .. j P + P - 1 of K, P = CHUNKS /
    SPLIT rounded up (the last share may be shorter); SPLIT > 1 only without NORM (its sum of
    squares is over all of K), partials combined through ACC and CNT (_combine). Threads:
    32 / NSUB on the rows of a warp, NSUB on the sub-blocks; BLOCK_N / (that times WARPS) rows a
    thread. AHEAD (1 or 2): chunks of codes in registers ahead of the one multiplied. Y may
    alias R: a row is written only by its row block's program, with SPLIT > 1 the last of them
    (the others' reads of R, maybe after that write, go into sums they do not store)."""
    NSUB: gl.constexpr = BLOCK_K // (32 if INT4 else 16)
    TR: gl.constexpr = 32 // NSUB
    RT: gl.constexpr = BLOCK_N // (TR * WARPS)
    SPG: gl.constexpr = GROUP // (32 if INT4 else 16)  # sub-blocks a group
    CHUNKS: gl.constexpr = K // BLOCK_K
    PER: gl.constexpr = (CHUNKS + SPLIT - 1) // SPLIT
    L3: gl.constexpr = gl.BlockedLayout([RT, 1, 4], [TR, NSUB, 1], [WARPS, 1, 1], [2, 1, 0])
    LD: gl.constexpr = gl.SliceLayout(2, L3)  # (BLOCK_N, NSUB): dots, scales, accumulators
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # (NSUB, 4): one lane's x' of a chunk
    pid = gl.program_id(0)
    c0 = gl.program_id(1) * PER  # this program's first chunk
    rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD))
    row_mask = rows < N
    rows = gl.minimum(rows, N - 1)  # tail rows load valid memory; their store is masked
    subs = gl.arange(0, NSUB, layout=gl.SliceLayout(0, LD))
    r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2).to(gl.int64)
    st = (gl.expand_dims(gl.expand_dims(gl.arange(0, NSUB, layout=gl.SliceLayout(1, LX)), 1), 0)
          * 4 + gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LX)),
                                              0), 0))
    wa_off = r3 * stride_w + st
    wb_off = (r3 + N) * stride_w + st
    r2 = gl.expand_dims(rows, 1).to(gl.int64)
    sa_off = r2 * stride_s + gl.expand_dims(subs // SPG, 0)
    sb_off = (r2 + N) * stride_s + gl.expand_dims(subs // SPG, 0)
    if SPLIT == 1:
        mine = CHUNKS
    else:
        mine = gl.minimum(CHUNKS - c0, PER)
    acc_a, acc_b, sum_sq = stream(W, S, Z, X, NW, wa_off, wb_off, sa_off, sb_off, c0, mine,
                                  CHUNKS, GATED, NORM, INT4, GROUP, BLOCK_N, BLOCK_K, CH2, NSUB,
                                  AHEAD, WARPS, PDL, L3, LX, LD)
    rstd = gl.rsqrt(sum_sq / K + eps)
    y = gl.sum(acc_a, axis=1)
    store = row_mask
    if SPLIT > 1:
        y, store = _combine(ACC, CNT, rows, row_mask, y, N, SPLIT)
    if NORM:
        y = y * rstd
    if GATED:
        u = gl.sum(acc_b, axis=1)
        if NORM:
            u = u * rstd
        y = y / (1.0 + gl.exp(-y)) * u
    if RESIDUAL:
        y += gl.load(R + rows, mask=row_mask, other=0.0).to(gl.float32)
    gl.store(Y + rows, y.to(Y.dtype.element_ty), mask=store)


def fits(config, fmt, n, k, group, plain=False):
    """Whether this kernel runs a GEMV of N rows (each, for gate/up) and K columns at `config`:
    whole chunks of K starting on group boundaries, a power-of-2 thread layout, every split's
    share of K non-empty, split K only for a plain GEMV (no RMSNorm, whose sum of squares is
    over all of K, and no gate), and x' of a share within 64 KB of shared memory (its
    sub-block sums take 1/16 of that again for int8, 1/32 for int4)."""
    nsub = config.block_k // (32 if fmt == 'int4' else 16)
    if config.block_k % group or group % 32 or k % config.block_k or not 1 <= nsub <= 32 \
            or config.block_n % ((32 // nsub) * config.num_warps):
        return False
    chunks, split = k // config.block_k, config.split_k
    per = -(-chunks // split)
    return (split == 1 or plain) and (split - 1) * per < chunks \
        and triton.next_power_of_2(per) * config.block_k * 4 <= 65536


def ahead(config):
    """Chunks of codes a program keeps requested ahead: the config's num_stages, 1 or 2."""
    return min(max(config.num_stages, 1), 2)


def gemv(w, x, out, norm_weight, residual, gated, eps, config, acc=None, cnt=None):
    """out (N,) = W rmsnorm(x) (or W x without norm_weight) [+ residual], or gated: silu(g) * u,
    [g; u] = W (2N, K) rmsnorm(x); w an int8 or int4 QuantWeight. acc, cnt: split-K scratch
    (config.split_k x N fp32 slots, a zeroed ticket a row block; gemv._split_scratch)."""
    codes = w.q.view(torch.int32)
    n, k = out.shape[0], x.shape[0]
    split = config.split_k
    per = -(-(k // config.block_k) // split)
    staged_kernel[(triton.cdiv(n, config.block_n), split)](
        codes, w.scale, w.offset if w.offset is not None else w.scale, x,
        norm_weight if norm_weight is not None else x,
        residual if residual is not None else out, out, acc if acc is not None else out,
        cnt if cnt is not None else out, n, k, codes.stride(0), w.scale.stride(0), eps,
        GATED=gated, NORM=norm_weight is not None, RESIDUAL=residual is not None,
        INT4=w.fmt == 'int4', GROUP=w.group, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        CH2=triton.next_power_of_2(per), SPLIT=split, AHEAD=ahead(config),
        WARPS=config.num_warps, num_warps=config.num_warps, **pdl.launch_args(x.device))
    return out
