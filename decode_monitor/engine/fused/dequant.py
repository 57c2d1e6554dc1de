"""In-register dequantisation for the fused GEMVs: int8 and int4 codes -> per-row dot products.

Each `*_dot` walks CHUNKS chunks of K from lo (all of K, or a split-K share) for BLOCK_N rows
(two row sets when PAIR: gate/up, RoPE's row pairs) against x' = x (* g if NORM) and returns
(W x')[rows_a], (W x')[rows_b] and sum(x^2) over that span for the RMSNorm, like the dense loop
in gemv.py. See quant.py for the storage formats.

The two formats take different routes because they measured fastest that way on an H100:
- int8 (codes in weight order, one byte each, read four to a 32-bit word): each code becomes a
  float by one byte permute and one exact subtract, and each thread's 16-code partial dot is
  scaled once (`_int8_rows`).
- int4 (codes in lanes of 32-bit words): a code masked in place in its word is already a
  float, a denormal: one AND a weight, no shift, no convert, no bias (see `_int4_lane`).
"""
import os

import triton
import triton.language as tl


@triton.jit
def _x_groups(X, NW, k0, K: tl.constexpr, NORM: tl.constexpr, NG: tl.constexpr,
              GW: tl.constexpr, STRIDE: tl.constexpr, OFF: tl.constexpr, EVEN_K: tl.constexpr):
    """x'[k0 + STRIDE * g + OFF + j] as an (NG, GW) tile (g < NG, j < GW), and the squares
    of x (before the norm)."""
    cols = k0 + tl.arange(0, NG)[:, None] * STRIDE + OFF + tl.arange(0, GW)[None, :]
    if EVEN_K:
        x = tl.load(X + cols).to(tl.float32)
    else:
        x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
    ss = x * x
    if NORM:
        if EVEN_K:
            x = x * tl.load(NW + cols).to(tl.float32)
        else:
            x = x * tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
    return x, ss


@triton.jit
def _group_offsets(rows, k0, K: tl.constexpr, stride_s, GROUP: tl.constexpr,
                   NG: tl.constexpr):
    """(BLOCK_N, NG) offsets into the per-group tensors of this chunk, and their mask."""
    g = k0 // GROUP + tl.arange(0, NG)[None, :]  # (1, NG) group index
    return rows.to(tl.int64)[:, None] * stride_s + g, g < K // GROUP


# -- int8 ---------------------------------------------------------------------------------------
# The codes are read as 32-bit words, four codes each, SUB codes (one 16-byte load) of a row per
# thread: (BLOCK_N, BLOCK_K) codes are (BLOCK_N, NSUB, 4) words, a warp reading a row's bytes in
# one run, and a sub-block's dot needs no other thread. Byte j of a word becomes the float
# 2^15 + 128 + q, bits 0x47000000 | (q + 128) << 8: one byte permute (PRMT) of the word and the
# constant, after one XOR has added 128 to all four codes; subtracting 2^15 + 128 is exact. Three
# instructions a weight with the FMA. Words, not bytes, are carried from one iteration to the
# next: a byte tensor lives a byte a register, and packing it back for the permute costs more
# than the dequantisation.
SUB = tl.constexpr(16)
INT8_BIAS = tl.constexpr(32768.0 + 128.0)
# The CPU interpreter runs no PTX: it builds the same floats with arithmetic.
BYTE_PERMUTE = tl.constexpr(not os.environ.get('TRITON_INTERPRET'))


@triton.jit
def _word_codes(words):
    """int32 words of four int8 codes -> four fp32 tensors shaped like `words`: byte 0 .. 3."""
    if BYTE_PERMUTE:
        f0, f1, f2, f3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 u, c;
            xor.b32 u, $4, 0x80808080;
            mov.b32 c, 0x47000000;
            prmt.b32 $0, u, c, 0x7604;
            prmt.b32 $1, u, c, 0x7614;
            prmt.b32 $2, u, c, 0x7624;
            prmt.b32 $3, u, c, 0x7634;
            }""",
            constraints='=r,=r,=r,=r,r', args=[words], dtype=(tl.float32,) * 4, is_pure=True,
            pack=1)
    else:
        u = words ^ -2139062144  # 0x80808080: q + 128 in every byte
        f0 = ((u & 255) + 32768).to(tl.float32)
        f1 = (((u >> 8) & 255) + 32768).to(tl.float32)
        f2 = (((u >> 16) & 255) + 32768).to(tl.float32)
        f3 = (((u >> 24) & 255) + 32768).to(tl.float32)
    return f0 - INT8_BIAS, f1 - INT8_BIAS, f2 - INT8_BIAS, f3 - INT8_BIAS


@triton.jit
def _int8_chunk(W, S, rows, k0, K: tl.constexpr, stride_w, stride_s, GROUP: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, valid=True):
    """Code words (BLOCK_N, NSUB, 4) and sub-block scales (BLOCK_N, NSUB) of one K chunk;
    nothing is read unless `valid` (words and scales are then 0)."""
    NSUB: tl.constexpr = BLOCK_K // SUB
    word = k0 // 4 + tl.arange(0, BLOCK_K // 4)[None, :]
    ptrs = W.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (stride_w // 4) + word
    if EVEN_K:
        words = tl.load(ptrs, mask=valid)
    else:
        words = tl.load(ptrs, mask=(word < K // 4) & valid, other=0)
    words = tl.reshape(words, (words.shape[0], NSUB, 4))
    g = (k0 + tl.arange(0, NSUB) * SUB) // GROUP  # (NSUB,) the group of each sub-block
    s_off = rows.to(tl.int64)[:, None] * stride_s + g[None, :]
    s = tl.load(S + s_off, mask=(g < K // GROUP)[None, :] & valid, other=0.0)
    return words, s


@triton.jit
def _int8_chunks(W, S, rows_a, rows_b, k0, valid, K: tl.constexpr, stride_w, stride_s,
                 GROUP: tl.constexpr, PAIR: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """`_int8_chunk` of rows_a and, if PAIR, of rows_b (else rows_a's again, unread)."""
    wa, sa = _int8_chunk(W, S, rows_a, k0, K, stride_w, stride_s, GROUP, BLOCK_K, EVEN_K, valid)
    wb, sb = wa, sa
    if PAIR:
        wb, sb = _int8_chunk(W, S, rows_b, k0, K, stride_w, stride_s, GROUP, BLOCK_K, EVEN_K,
                             valid)
    return wa, sa, wb, sb


@triton.jit
def _int8_rows(words, s, x0, x1, x2, x3):
    """(BLOCK_N, NSUB) scaled sub-block dots s sum q x' of one chunk; xj (NSUB, 4) meets byte j
    of each word."""
    f0, f1, f2, f3 = _word_codes(words)
    p = f0 * x0[None] + f1 * x1[None] + f2 * x2[None] + f3 * x3[None]
    return tl.sum(p, axis=2) * s.to(tl.float32)


@triton.jit
def int8_dot(W, S, X, NW, rows_a, rows_b, lo, CHUNKS: tl.constexpr, K: tl.constexpr, stride_w,
             stride_s, NORM: tl.constexpr, PAIR: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             STAGES: tl.constexpr):
    """W: int8 codes (N, K), S: scales (N, K / GROUP); w = q s.

    STAGES 1: each chunk is loaded at the end of the iteration before. STAGES 2: one chunk
    further ahead, in registers, so a program keeps two chunks in flight; it was the fastest on
    8 of the 11 study shapes in a graph of 28 on an H100 (`benchmarks/kernels_in_graph.py
    tune-int8`). STAGES >= 3: Triton's pipeline through shared memory (the words need no
    unpacking there). The load past the last chunk is masked off: reloading the last chunk
    instead, from cache, made gate/up 2-3 % slower.
    """
    NSUB: tl.constexpr = BLOCK_K // SUB
    PREFETCH: tl.constexpr = STAGES == 2
    acc_a = tl.zeros((BLOCK_N, NSUB), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, NSUB), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    wa, sa, wb, sb = _int8_chunks(W, S, rows_a, rows_b, lo, True, K, stride_w, stride_s, GROUP,
                                  PAIR, BLOCK_K, EVEN_K)
    for c in tl.range(0, CHUNKS, num_stages=1 if STAGES < 3 else STAGES):
        k0 = lo + c * BLOCK_K
        more = c + 1 < CHUNKS
        if PREFETCH:
            nxt = _int8_chunks(W, S, rows_a, rows_b, k0 + BLOCK_K, more, K, stride_w, stride_s,
                               GROUP, PAIR, BLOCK_K, EVEN_K)
        x, sq = _x_groups(X, NW, k0, K, NORM, 1, BLOCK_K, 0, 0, EVEN_K)
        ss += tl.reshape(sq, (BLOCK_K,))
        # x[16 i + 4 w + j] -> xj[i, w]: the x that byte j of word w of sub-block i meets;
        # j = 2 a + b: split off b (j even / odd), then a
        x_even, x_odd = tl.split(tl.reshape(x, (NSUB, 4, 2, 2)))
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        acc_a += _int8_rows(wa, sa, x0, x1, x2, x3)
        if PAIR:
            acc_b += _int8_rows(wb, sb, x0, x1, x2, x3)
        if PREFETCH:
            wa, sa, wb, sb = nxt
        else:
            wa, sa, wb, sb = _int8_chunks(W, S, rows_a, rows_b, k0 + BLOCK_K, more, K, stride_w,
                                          stride_s, GROUP, PAIR, BLOCK_K, EVEN_K)
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(ss, axis=0)


# -- int4 ---------------------------------------------------------------------------------------
# A code masked in place at bits 4j..4j+3 of a word (j < 4; lanes 4-7 come from the word shifted
# down by 16) reads as the fp32 denormal q 2^(4j - 149). The x it meets is scaled by
# 2^(149 - 4j - DOT_EXP), so every product is x q 2^-DOT_EXP, a normal float for |x| in
# [2^-78, 2^26]; the chunk's dots are scaled back by 2^DOT_EXP with the group scale. FFMA keeps
# denormal inputs: Triton compiles fp32 arithmetic without flush-to-zero.
DOT_EXP = tl.constexpr(48)


@triton.jit
def _pow2(E: tl.constexpr):
    """2^E as an fp32 scalar, exact (-126 <= E <= 127)."""
    return tl.full((1,), (127 + E) << 23, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _int4_words(W, rows, k0, K: tl.constexpr, stride_w, GROUP: tl.constexpr, NG: tl.constexpr,
                GW: tl.constexpr, EVEN_K: tl.constexpr):
    """The (BLOCK_N, NG, GW) code words of one K chunk, and the same shifted down by 16 bits."""
    word = k0 // 8 + tl.arange(0, NG)[None, :, None] * GW + tl.arange(0, GW)[None, None, :]
    ptrs = W + rows.to(tl.int64)[:, None, None] * stride_w + word
    if EVEN_K:
        words = tl.load(ptrs)
    else:
        words = tl.load(ptrs, mask=word < K // 8, other=0)
    words = words.to(tl.uint32, bitcast=True)
    return words, words >> 16


@triton.jit
def _int4_lane(low, high, LANE: tl.constexpr):
    """Lane LANE (0-7) of the code words as the fp32 denormal q 2^(4 (LANE % 4) - 149)."""
    MASK: tl.constexpr = 15 << (4 * (LANE % 4))
    if LANE < 4:
        v = low & MASK
    else:
        v = high & MASK
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _int4_scaled(S, Z, rows, k0, p, xs, K: tl.constexpr, stride_s, GROUP: tl.constexpr,
                 NG: tl.constexpr):
    """Word-slot partial dots p = sum over lanes of x q 2^-DOT_EXP, (BLOCK_N, NG, GW) -> the
    same for the weights q s + m: s sum(x q) + m sum(x), with xs the slots' sums of x.

    Kept per slot, not reduced: the reduction across threads happens once, after the K loop.
    """
    s_off, g_mask = _group_offsets(rows, k0, K, stride_s, GROUP, NG)
    s = tl.load(S + s_off, mask=g_mask, other=0.0).to(tl.float32) * _pow2(DOT_EXP)
    m = tl.load(Z + s_off, mask=g_mask, other=0.0).to(tl.float32)
    return p * s[:, :, None] + m[:, :, None] * xs[None, :, :]


@triton.jit
def int4_dot(W, S, Z, X, NW, rows_a, rows_b, lo, CHUNKS: tl.constexpr, K: tl.constexpr,
             stride_w, stride_s, NORM: tl.constexpr, PAIR: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             STAGES: tl.constexpr):
    """W: int4 code words (N, K / 8, int32, lanes: quant.py), S scales and Z offsets
    (N, K / GROUP); w = q s + m."""
    NG: tl.constexpr = BLOCK_K // GROUP
    GW: tl.constexpr = GROUP // 8  # words a group
    acc_a = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    ss = tl.zeros((NG, GW), dtype=tl.float32)
    for c in tl.range(0, CHUNKS, num_stages=STAGES):
        k0 = lo + c * BLOCK_K
        lo_a, hi_a = _int4_words(W, rows_a, k0, K, stride_w, GROUP, NG, GW, EVEN_K)
        if PAIR:
            lo_b, hi_b = _int4_words(W, rows_b, k0, K, stride_w, GROUP, NG, GW, EVEN_K)
        pa = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
        pb = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
        xs = tl.zeros((NG, GW), dtype=tl.float32)
        for i in tl.static_range(8):  # lane i meets x[k0 + G g + i GW + (0..GW)]
            x, sq = _x_groups(X, NW, k0, K, NORM, NG, GW, GROUP, i * GW, EVEN_K)
            ss += sq
            xs += x
            x = x * _pow2(149 - DOT_EXP - 4 * (i % 4))
            pa += _int4_lane(lo_a, hi_a, i) * x[None, :, :]
            if PAIR:
                pb += _int4_lane(lo_b, hi_b, i) * x[None, :, :]
        acc_a += _int4_scaled(S, Z, rows_a, k0, pa, xs, K, stride_s, GROUP, NG)
        if PAIR:
            acc_b += _int4_scaled(S, Z, rows_b, k0, pb, xs, K, stride_s, GROUP, NG)
    return (tl.sum(tl.sum(acc_a, axis=2), axis=1), tl.sum(tl.sum(acc_b, axis=2), axis=1),
            tl.sum(tl.sum(ss, axis=1), axis=0))
