"""In-register dequantisation for the fused GEMVs: int8 and int4 codes -> per-row dot products.

Each `*_dot` walks CHUNKS chunks of K from lo (all of K, or a split-K share) for BLOCK_N rows
(two row sets when PAIR: gate/up, RoPE's row pairs) against x' = x (* g if NORM) and returns
(W x')[rows_a], (W x')[rows_b] and sum(x^2) over that span for the RMSNorm, like the dense loop
in gemv.py. See quant.py for the storage formats.

The two formats take different routes because they measured fastest that way on an H100:
- int8 (codes in weight order, one byte each): each code becomes a float by the exponent trick
  and each group's partial dot is reduced and scaled once per K chunk.
- int4 (codes in lanes of 32-bit words): a code masked in place in its word is already a
  float, a denormal: one AND a weight, no shift, no convert, no bias (see `_int4_lane`).
"""
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
@triton.jit
def _codes_to_float(v):
    """int8 codes as int32 -> exact fp32 via the exponent trick (no int->float convert).

    The bits 0x4B000000 + j read as the float 2^23 + j for 0 <= j < 2^23; the +128 moves the
    codes into that range, and both are subtracted back in floating point.
    """
    return (v + (0x4B000000 + 128)).to(tl.float32, bitcast=True) - (8388608.0 + 128)


@triton.jit
def _int8_rows(W, S, rows, k0, x, K: tl.constexpr, stride_w, stride_s, GROUP: tl.constexpr,
               NG: tl.constexpr, EVEN_K: tl.constexpr):
    """One K chunk of int8 rows: (BLOCK_N, NG) per-group partial dots, scaled."""
    r = rows.to(tl.int64)[:, None, None]
    col = k0 + tl.arange(0, NG)[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
    if EVEN_K:
        codes = tl.load(W + r * stride_w + col).to(tl.int32)
    else:
        codes = tl.load(W + r * stride_w + col, mask=col < K, other=0).to(tl.int32)
    s_off, g_mask = _group_offsets(rows, k0, K, stride_s, GROUP, NG)
    s = tl.load(S + s_off, mask=g_mask, other=0.0).to(tl.float32)
    return tl.sum(_codes_to_float(codes) * x[None, :, :], axis=2) * s


@triton.jit
def int8_dot(W, S, X, NW, rows_a, rows_b, lo, CHUNKS: tl.constexpr, K: tl.constexpr, stride_w,
             stride_s, NORM: tl.constexpr, PAIR: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             STAGES: tl.constexpr):
    """W: int8 codes (N, K), S: scales (N, K / GROUP); w = q s."""
    NG: tl.constexpr = BLOCK_K // GROUP
    acc_a = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    ss = tl.zeros((NG, GROUP), dtype=tl.float32)
    for c in tl.range(0, CHUNKS, num_stages=STAGES):
        k0 = lo + c * BLOCK_K
        x, sq = _x_groups(X, NW, k0, K, NORM, NG, GROUP, GROUP, 0, EVEN_K)
        ss += sq
        acc_a += _int8_rows(W, S, rows_a, k0, x, K, stride_w, stride_s, GROUP, NG, EVEN_K)
        if PAIR:
            acc_b += _int8_rows(W, S, rows_b, k0, x, K, stride_w, stride_s, GROUP, NG, EVEN_K)
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1), tl.sum(tl.sum(ss, axis=1), axis=0)


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
