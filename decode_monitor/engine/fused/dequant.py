"""In-register dequantisation for the fused GEMVs: int8 and int4 codes -> per-row dot products.

`quant_dot` walks CHUNKS chunks of K from lo (all of K, or a split-K share) for BLOCK_N rows
(two row sets when PAIR: gate/up, RoPE's row pairs) against x' = x (* g if NORM) and returns
(W x')[rows_a], (W x')[rows_b] and sum(x^2) over that span for the RMSNorm, like the dense loop
in gemv.py. See quant.py for the storage formats.

Both formats are read the same way: as 32-bit words, four a thread (one 16-byte load, a warp
reading one run of a row), each thread's sub-block dot summed in the thread and scaled once, no
shuffles in the K loop. They differ in how a code becomes a float:
- int8 (four codes a word, in weight order): one byte permute and one exact subtract
  (`_word_codes`).
- int4 (eight codes a word, in lanes): a code masked in place in its word is already a float,
  a denormal: one AND a weight, no shift, no convert, no bias (`_int4_lane`).
"""
import triton
import triton.language as tl

from decode_monitor.engine.fused import pdl


@triton.jit
def _x_at(X, NW, cols, K: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr,
          CACHE: tl.constexpr):
    """x' = x (* g if NORM) in fp32 at the columns `cols` (a tile of any shape), and the squares
    of x (before the norm). CACHE: x's load cache modifier ('.cg' where another program of the
    same launch wrote x: the persistent kernel)."""
    if EVEN_K:
        x = tl.load(X + cols, cache_modifier=CACHE).to(tl.float32)
    else:
        x = tl.load(X + cols, mask=cols < K, other=0.0, cache_modifier=CACHE).to(tl.float32)
    sq = x * x
    if NORM:
        if EVEN_K:
            x = x * tl.load(NW + cols).to(tl.float32)
        else:
            x = x * tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
    return x, sq


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


@triton.jit
def _word_codes(words, PTX: tl.constexpr):
    """int32 words of four int8 codes -> four fp32 tensors shaped like `words`: byte 0 .. 3.
    PTX False (Triton's CPU interpreter, which runs no PTX): the same floats by arithmetic."""
    if PTX:
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
def _chunk(W, S, Z, rows, k0, K: tl.constexpr, stride_w, stride_s, INT4: tl.constexpr,
           GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, valid=True):
    """Code words (BLOCK_N, NSUB, 4), and the scales and offsets (BLOCK_N, NSUB) of each
    sub-block's group, of one K chunk; nothing is read unless `valid` (all are then 0).
    int8 has no offsets: its scales are returned in their place, and never used."""
    PER_WORD: tl.constexpr = 8 if INT4 else 4  # codes a word
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    NSUB: tl.constexpr = WORDS // 4
    word = k0 // PER_WORD + tl.arange(0, WORDS)[None, :]
    ptrs = W + rows.to(tl.int64)[:, None] * stride_w + word
    if EVEN_K:
        words = tl.load(ptrs, mask=valid)
    else:
        words = tl.load(ptrs, mask=(word < K // PER_WORD) & valid, other=0)
    words = tl.reshape(words, (words.shape[0], NSUB, 4))
    g = (k0 + tl.arange(0, NSUB) * (4 * PER_WORD)) // GROUP  # (NSUB,) each sub-block's group
    s_off = rows.to(tl.int64)[:, None] * stride_s + g[None, :]
    s_mask = (g < K // GROUP)[None, :] & valid
    s = tl.load(S + s_off, mask=s_mask, other=0.0)
    m = s
    if INT4:
        m = tl.load(Z + s_off, mask=s_mask, other=0.0)
    return words, s, m


@triton.jit
def _chunks(W, S, Z, rows_a, rows_b, k0, valid, K: tl.constexpr, stride_w, stride_s,
            INT4: tl.constexpr, GROUP: tl.constexpr, PAIR: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr):
    """`_chunk` of rows_a and, if PAIR, of rows_b (else rows_a's again, unread)."""
    wa, sa, ma = _chunk(W, S, Z, rows_a, k0, K, stride_w, stride_s, INT4, GROUP, BLOCK_K,
                        EVEN_K, valid)
    wb, sb, mb = wa, sa, ma
    if PAIR:
        wb, sb, mb = _chunk(W, S, Z, rows_b, k0, K, stride_w, stride_s, INT4, GROUP, BLOCK_K,
                            EVEN_K, valid)
    return wa, sa, ma, wb, sb, mb


@triton.jit
def _int8_x(X, NW, k0, K: tl.constexpr, NORM: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr, CACHE: tl.constexpr):
    """x' of one chunk as four (NSUB, 4) tiles, xj[i, w] = x'[k0 + 16 i + 4 w + j]: the x that
    byte j of word w of sub-block i meets; and the chunk's squares of x."""
    x, sq = _x_at(X, NW, k0 + tl.arange(0, BLOCK_K), K, NORM, EVEN_K, CACHE)
    # j = 2 a + b: split off b (j even / odd), then a
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // SUB, 4, 2, 2)))
    x0, x2 = tl.split(x_even)
    x1, x3 = tl.split(x_odd)
    return (x0, x1, x2, x3), sq


@triton.jit
def _int8_rows(words, s, m, xs, PTX: tl.constexpr):
    """(BLOCK_N, NSUB) scaled sub-block dots s sum q x' of one chunk (m: unused)."""
    f0, f1, f2, f3 = _word_codes(words, PTX)
    p = f0 * xs[0][None] + f1 * xs[1][None] + f2 * xs[2][None] + f3 * xs[3][None]
    return tl.sum(p, axis=2) * s.to(tl.float32)


# -- int4 ---------------------------------------------------------------------------------------
# A code masked in place at bits 4j..4j+3 of a word (j < 4; lanes 4-7 come from the word shifted
# down by 16) reads as the fp32 denormal q 2^(4j - 149). The x it meets is scaled by
# 2^(149 - 4j - DOT_EXP), so every product is x q 2^-DOT_EXP, a normal float for |x| in
# [2^-78, 2^26]; the sub-block's dot is scaled back by 2^DOT_EXP with the group scale. FFMA keeps
# denormal inputs: Triton compiles fp32 arithmetic without flush-to-zero. Two instructions a
# weight with the FMA. Words are read as for int8: four (32 codes) a thread, one 16-byte load.
DOT_EXP = tl.constexpr(48)


@triton.jit
def _pow2(E):
    """2^E as fp32, exact (-126 <= E <= 127); E an integer tensor or constant."""
    bits = tl.zeros((1,), tl.int32) + ((127 + E) << 23)  # a tensor also for a constant E
    return bits.to(tl.float32, bitcast=True)


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
def _int4_x(X, NW, k0, K: tl.constexpr, NORM: tl.constexpr, GROUP: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, CACHE: tl.constexpr):
    """x' of one chunk as eight (NSUB, 4) tiles, xi[s, t] the x' that lane i of word t of
    sub-block s meets, scaled for lane i's denormal; then the sub-blocks' sums of x' (NSUB,)
    for the offsets; and the chunk's squares of x."""
    NSUB: tl.constexpr = BLOCK_K // 32
    GW: tl.constexpr = GROUP // 8  # words a group; a sub-block is 4 of them
    sub = tl.arange(0, NSUB)[:, None, None]
    lane = tl.arange(0, 8)[None, None, :]
    # word c of a group holds weights c + i GW (quant.py): (NSUB, 4 words, 8 lanes)
    cols = (k0 + (sub // (GW // 4)) * GROUP + (sub % (GW // 4)) * 4
            + tl.arange(0, 4)[None, :, None] + lane * GW)
    x, sq = _x_at(X, NW, cols, K, NORM, EVEN_K, CACHE)
    x_sum = tl.sum(tl.sum(x, axis=2), axis=1)
    x = x * _pow2(149 - DOT_EXP - 4 * (lane % 4))
    # lane i = 4 a + 2 b + c: split off c, then b, then a
    x_c0, x_c1 = tl.split(tl.reshape(x, (NSUB, 4, 2, 2, 2)))
    x_00, x_01 = tl.split(x_c0)
    x_10, x_11 = tl.split(x_c1)
    x0, x4 = tl.split(x_00)
    x2, x6 = tl.split(x_01)
    x1, x5 = tl.split(x_10)
    x3, x7 = tl.split(x_11)
    return (x0, x1, x2, x3, x4, x5, x6, x7, x_sum), tl.reshape(sq, (BLOCK_K,), can_reorder=True)


@triton.jit
def _int4_rows(words, s, m, xs):
    """(BLOCK_N, NSUB) sub-block dots s sum q x' + m sum x' of one chunk."""
    high = words >> 16
    p = _int4_lane(words, high, 0) * xs[0][None]
    for i in tl.static_range(1, 8):
        p += _int4_lane(words, high, i) * xs[i][None]
    scale = s.to(tl.float32) * _pow2(DOT_EXP)
    return tl.sum(p, axis=2) * scale + m.to(tl.float32) * xs[8][None]


# -- both ---------------------------------------------------------------------------------------
@triton.jit
def quant_dot(W, S, Z, X, NW, rows_a, rows_b, lo, CHUNKS: tl.constexpr, K: tl.constexpr,
              stride_w, stride_s, NORM: tl.constexpr, PAIR: tl.constexpr, INT4: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
              PTX: tl.constexpr):
    """W: code words (N, K / 4 or K / 8, int32: int8 or int4 codes, quant.py), S scales and,
    int4 only, Z offsets (N, K / GROUP); w = q s (+ m).

    STAGES 1: each chunk is loaded at the end of the iteration before. STAGES 2: one chunk
    further ahead, in registers, so a program keeps two chunks in flight; it was the fastest
    int8 config on 8 of the 11 study shapes in a graph of 28 on an H100
    (benchmarks/results/h100/int8_words/tune/). STAGES >= 3: Triton's pipeline through shared
    memory (the words need no unpacking there). The load past the last chunk is masked off:
    reloading the last chunk instead, from cache, made int8 gate/up 2-3 % slower.

    The first chunk's codes and scales are requested before waiting for the previous kernel
    (PDL): they are constant, and their latency then overlaps that kernel's drain (x, the
    previous kernel's output, is read only after the wait). int4 steps 1.2-1.7 % faster on an
    H100, int8 0-1.2 % (benchmarks/NOTES.md, row 27).
    """
    NSUB: tl.constexpr = BLOCK_K // (32 if INT4 else SUB)
    PREFETCH: tl.constexpr = STAGES == 2
    acc_a = tl.zeros((BLOCK_N, NSUB), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, NSUB), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    wa, sa, ma, wb, sb, mb = _chunks(W, S, Z, rows_a, rows_b, lo, True, K, stride_w, stride_s,
                                     INT4, GROUP, PAIR, BLOCK_K, EVEN_K)
    pdl.wait_for_previous_kernel(PDL)
    for c in tl.range(0, CHUNKS, num_stages=1 if STAGES < 3 else STAGES):
        k0 = lo + c * BLOCK_K
        more = c + 1 < CHUNKS
        if PREFETCH:
            nxt = _chunks(W, S, Z, rows_a, rows_b, k0 + BLOCK_K, more, K, stride_w, stride_s,
                          INT4, GROUP, PAIR, BLOCK_K, EVEN_K)
        if INT4:
            xs, sq = _int4_x(X, NW, k0, K, NORM, GROUP, BLOCK_K, EVEN_K, '')
            acc_a += _int4_rows(wa, sa, ma, xs)
            if PAIR:
                acc_b += _int4_rows(wb, sb, mb, xs)
        else:
            xs, sq = _int8_x(X, NW, k0, K, NORM, BLOCK_K, EVEN_K, '')
            acc_a += _int8_rows(wa, sa, ma, xs, PTX)
            if PAIR:
                acc_b += _int8_rows(wb, sb, mb, xs, PTX)
        ss += sq
        if PREFETCH:
            wa, sa, ma, wb, sb, mb = nxt
        else:
            wa, sa, ma, wb, sb, mb = _chunks(W, S, Z, rows_a, rows_b, k0 + BLOCK_K, more, K,
                                             stride_w, stride_s, INT4, GROUP, PAIR, BLOCK_K,
                                             EVEN_K)
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(ss, axis=0)


@triton.jit
def chunk_dots(W, S, Z, X, NW, rows_a, rows_b, k0, K: tl.constexpr, stride_w, stride_s,
               NORM: tl.constexpr, PAIR: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PTX: tl.constexpr,
               CACHE: tl.constexpr):
    """One chunk of K from k0, loaded and multiplied at once: the scaled sub-block dots
    (BLOCK_N, NSUB) of rows_a and of rows_b (rows_a's again unless PAIR), and the chunk's
    squares of x. For a caller that pipelines across its own loop (the persistent kernel)."""
    wa, sa, ma, wb, sb, mb = _chunks(W, S, Z, rows_a, rows_b, k0, True, K, stride_w, stride_s,
                                     INT4, GROUP, PAIR, BLOCK_K, EVEN_K)
    if INT4:
        xs, sq = _int4_x(X, NW, k0, K, NORM, GROUP, BLOCK_K, EVEN_K, CACHE)
        da = _int4_rows(wa, sa, ma, xs)
        db = da
        if PAIR:
            db = _int4_rows(wb, sb, mb, xs)
    else:
        xs, sq = _int8_x(X, NW, k0, K, NORM, BLOCK_K, EVEN_K, CACHE)
        da = _int8_rows(wa, sa, ma, xs, PTX)
        db = da
        if PAIR:
            db = _int8_rows(wb, sb, mb, xs, PTX)
    return da, db, sq
