"""The prefill's GEMM on int4 weights: x (M, K) @ W.T (+ bias), W read as stored.

A prefill of M tokens multiplies every matrix by M rows. Dequantising W into a dense buffer first
(unpack.py) writes and reads 2 bytes a weight besides the 0.5 of its codes: at a few hundred
tokens that is most of the GEMM's traffic. Here each program loads a tile of codes, dequantises
it in registers with `QuantWeight.dequantize`'s arithmetic (code x scale + offset in float32,
rounded once to the activations' dtype: the dense buffer's values exactly, the right layout's
PTX path aside, below) and feeds it to tl.dot
with a float32 accumulator; the codes are read once per block of tokens and nothing is written
but the output.

Two layouts of the tiles, picked by the config (`weights_right`):
- left (up to 32 tokens): the weight tile is the dot's left operand (acc is (BLOCK_N, BLOCK_M),
  stored transposed): on Hopper the left operand of the tensor-core instruction may come from
  registers, where the dequantised tile is, and its row count is 64, so N (thousands) takes it
  and M (as few as one token) the flexible side. The default (`lanes` 1) follows the stored
  layout (quant.py: nibble i of word c of a group holds weight c + i G / 8): a program loads a
  group's G / 8 words once per row and makes one dot per lane, of the words' nibble i against
  x's columns i G / 8 .. + G / 8 (`lanes` 0 gathers each weight's word instead: any group
  size; 2 reorders the lanes in registers for one dot). Triton waits on each of these dots.
- right (int4, 33 to 128 tokens): the tokens are the left operand (64 or 128 a block) and the
  group's dequantised tile (G, BLOCK_N) the right one, one G-deep dot a group. x's columns are
  put into the codes' lane order once a call, so the tile's row c 8 + i is nibble i of word c
  and needs no shuffle. On the GPU with bf16 weights and activations the tile is made by inline
  PTX in bf16x2 (`_lanes_bf16`): q s + z rounded once, as the float32 path's q s + z rounded to
  float32 and then to bf16 is, except where that double rounding lands on a tie.
When the tiles alone would leave SMs idle (few tokens, a matrix of few rows), K is split over up
to `split` programs; their float32 partials are summed in a fixed order (the same result every
run, which graph-vs-eager token equality needs).

`CONFIGS` picks the layout and blocks by M. The prefill uses this kernel for the two MLP
matrices (gate/up and down, three quarters of a layer's weights) up to MAX_M (128) tokens, and
the buffer path (unpack.py) for everything else: measured on the H200 in a graph of 28 layers,
the left layout is the fastest way at 16-32 tokens and the right one at 64-128, the buffer path
from 256 tokens on (the GEMMs then compute-bound, and the tile's dequantisation repeated for
every block of tokens), and on q/k/v and o_proj, whose dequantisation is cheap, from 16 tokens
on. int8 keeps the buffer path at every M: its byte tiles do not compile to asynchronous copies
in this Triton, so the left kernel loads them unpipelined (for tests and measurement). The
measurements: benchmarks/NOTES.md.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from decode_monitor.engine.fused.gemv import _ptx


class QGemmConfig(NamedTuple):
    block_n: int  # weight rows per program (the dot's M side: 64 or more on Hopper)
    block_m: int  # tokens per program (16 or more)
    block_k: int
    num_warps: int
    num_stages: int
    split: int = 1  # at most this many programs along K (the table's: while SMs are idle)
    lanes: int = 1  # int4 with block_k = the group: 1, a dot per lane; 2, one reordered; 0, gather
    weights_right: bool = False  # int4: tokens on the dot's left side, the weight tile on its
    # right, from shared memory (block_m then 64 or more on Hopper; block_k is the group)


# (largest M, config), by M: the configs the H200's time-to-first-token records ran with (the
# per-matrix sweep beside them finds a little more at 16-64 tokens: benchmarks/NOTES.md); the
# last row serves callers past MAX_M (tests, measurement).
CONFIGS = (
    (16, QGemmConfig(64, 16, 128, 4, 4, 4)),
    (32, QGemmConfig(64, 32, 128, 4, 4, 4)),
    (64, QGemmConfig(128, 64, 128, 8, 3, 4, weights_right=True)),
    (128, QGemmConfig(128, 128, 128, 8, 3, 4, weights_right=True)),
)
MAX_M = 128  # the prefill's range (see above)
# float32 activations (tests, references): products in float32, which take more shared memory
FLOAT32 = QGemmConfig(64, 32, 64, 4, 2)


def config_for(m, dtype=torch.bfloat16):
    if dtype == torch.float32:
        return FLOAT32
    return next((cfg for bound, cfg in CONFIGS if m <= bound), CONFIGS[-1][1])


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _hopper_or_later(index):
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _ptx_tile(x, w):
    """Whether the right layout makes its tile by inline PTX (`_lanes_bf16`): bf16 activations,
    scales and offsets, on a GPU with bf16x2 subtraction (sm_90: the PTX was measured on the
    H200 only; earlier GPUs take the float32 path), not under the interpreter."""
    return (x.is_cuda and _ptx()
            and x.dtype == w.scale.dtype == w.offset.dtype == torch.bfloat16
            and _hopper_or_later(x.device.index or 0))


@triton.jit
def _dot(w, x, acc, F32_DOT: tl.constexpr):
    if F32_DOT:
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision='ieee')
    return tl.dot(w, x, acc)


@triton.jit
def _accumulate(acc, k0, x_rows, Q, S, Z, n64, n_in, m_in, K, stride_q, stride_s,
                GROUP: tl.constexpr, INT4: tl.constexpr, F32_DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                LANES: tl.constexpr):
    """acc + the tile of K from k0: the codes dequantised, times x's rows."""
    L: tl.constexpr = GROUP // 8  # int4: words per group, weights per lane
    k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:  # no K tail: the masks are the rows' and the tokens' alone
        w_in = n_in[:, None]
        x_in = m_in[None, :]
    else:
        w_in = n_in[:, None] & (k < K)[None, :]
        x_in = m_in[None, :] & (k < K)[:, None]
    if BLOCK_K <= GROUP:  # one group per row in this tile
        s_at = n64 * stride_s + k0 // GROUP
        scale = tl.load(S + s_at, mask=n_in, other=0.0).to(tl.float32)[:, None]
        if INT4:
            offset = tl.load(Z + s_at, mask=n_in, other=0.0).to(tl.float32)[:, None]
        else:
            offset = tl.zeros_like(scale)
    else:
        s_at = n64[:, None] * stride_s + (k // GROUP)[None, :]
        s_in = n_in[:, None] & (k < K)[None, :]
        scale = tl.load(S + s_at, mask=s_in, other=0.0).to(tl.float32)
        if INT4:
            offset = tl.load(Z + s_at, mask=s_in, other=0.0).to(tl.float32)
        else:
            offset = tl.zeros_like(scale)
    if LANES > 0:  # int4, BLOCK_K = GROUP: the group's words, loaded once each
        c = tl.arange(0, L)
        words = tl.load(Q + n64[:, None] * stride_q + (k0 // 8 + c)[None, :],
                        mask=n_in[:, None], other=0)  # (BLOCK_N, G / 8)
        if LANES == 1:  # one dot per lane: weights k0 + i G / 8 + c
            for i in tl.static_range(8):
                code = ((words >> (4 * i)) & 15).to(tl.float32)
                w = (code * scale + offset).to(x_rows.dtype.element_ty)
                x = tl.load(x_rows + (k0 + i * L + c)[:, None], mask=m_in[None, :],
                            other=0.0)
                acc = _dot(w, x, acc, F32_DOT)
        else:  # the lanes put in weight order in registers: one dot
            lane = tl.arange(0, 8) * 4
            code = ((words[:, :, None] >> lane[None, None, :]) & 15).to(tl.float32)
            code = tl.reshape(tl.permute(code, (0, 2, 1)), (BLOCK_N, GROUP))
            w = (code * scale + offset).to(x_rows.dtype.element_ty)
            x = tl.load(x_rows + k[:, None], mask=x_in, other=0.0)
            acc = _dot(w, x, acc, F32_DOT)
    else:
        if INT4:  # each weight's word, from its lane: the group's words, cached
            r = k % GROUP
            word = (k // GROUP) * L + r % L
            words = tl.load(Q + n64[:, None] * stride_q + word[None, :], mask=w_in,
                            other=0)
            code = ((words >> ((r // L) * 4)[None, :]) & 15).to(tl.float32)
        else:
            code = tl.load(Q + n64[:, None] * stride_q + k[None, :], mask=w_in,
                           other=0).to(tl.float32)
        w = (code * scale + offset).to(x_rows.dtype.element_ty)  # int8: offset 0
        x = tl.load(x_rows + k[:, None], mask=x_in, other=0.0)  # (BLOCK_K, BLOCK_M)
        acc = _dot(w, x, acc, F32_DOT)
    return acc


@triton.jit
def _tile(M, N, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's weight rows and tokens, their masks, and its share of K."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return n, m, n < N, m < M, tl.program_id(2)


# M and what follows from it are not specialised on: one compile serves every prompt length
@triton.jit(do_not_specialize=['M', 'K_SPLIT', 'stride_p'])
def _qgemm(X, Q, S, Z, B, OUT, M, N, K, K_SPLIT, stride_xm, stride_q, stride_s, stride_om,
           stride_p, GROUP: tl.constexpr, INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
           F32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
           LANES: tl.constexpr, WHILE_LOOP: tl.constexpr):
    n, m, n_in, m_in, part = _tile(M, N, BLOCK_N, BLOCK_M)
    n64 = n.to(tl.int64)
    x_rows = X + m[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if WHILE_LOOP:  # the CPU interpreter cannot iterate a range with a bound passed in
        step = 0
        while step < K_SPLIT:
            k0 = tl.multiple_of(part * K_SPLIT + step, BLOCK_K)  # aligned: vector loads
            acc = _accumulate(acc, k0, x_rows, Q, S, Z, n64, n_in, m_in, K,
                              stride_q, stride_s, GROUP, INT4, F32_DOT, BLOCK_N, BLOCK_K,
                              EVEN_K, LANES)
            step += BLOCK_K
    else:
        for step in range(0, K_SPLIT, BLOCK_K):
            k0 = tl.multiple_of(part * K_SPLIT + step, BLOCK_K)  # aligned: vector loads
            acc = _accumulate(acc, k0, x_rows, Q, S, Z, n64, n_in, m_in, K,
                              stride_q, stride_s, GROUP, INT4, F32_DOT, BLOCK_N, BLOCK_K,
                              EVEN_K, LANES)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_in, other=0.0).to(tl.float32)[:, None]
    at = OUT + part.to(tl.int64) * stride_p + m[None, :].to(tl.int64) * stride_om + n[:, None]
    tl.store(at, acc.to(OUT.dtype.element_ty), mask=n_in[:, None] & m_in[None, :])


def _lanes_bf16_ptx():
    """The PTX of `_lanes_bf16`: $8 the word, $9 / $10 the scale and offset, $0-$7 lanes 0-7."""
    lines = ['.reg .b32 p, t, s2, z2, c;', 'mov.b32 s2, {$9, $9};', 'mov.b32 z2, {$10, $10};',
             'mov.b32 c, 0x43004300;']  # a bf16 pair 128, 128
    for j in range(4):  # lanes j and j + 4: bits 4 j and 16 + 4 j
        lines += [f'shr.u32 t, $8, {4 * j};', 'lop3.b32 p, t, 0x000F000F, c, 0xea;',  # & | c
                  'sub.rn.bf16x2 p, p, c;', 'fma.rn.bf16x2 p, p, s2, z2;',
                  f'mov.b32 {{${j}, ${j + 4}}}, p;']
    return '{\n' + '\n'.join(lines) + '\n}'


LANES_BF16_PTX = tl.constexpr(_lanes_bf16_ptx())


@triton.jit
def _lanes_bf16(words, s, z):
    """The eight weights of each int4 code word in bf16, lane i = q_i s + z rounded once:
    lanes (i, i + 4) masked into a pair of bf16 128 + q (0x4300 | q), 128 subtracted exactly,
    one bf16x2 FMA (sub.bf16x2 needs sm_90). No conversion instructions, whose rate, not the
    tensor cores', bounded the float32 version of this tile."""
    return tl.inline_asm_elementwise(
        asm=LANES_BF16_PTX, constraints='=h,=h,=h,=h,=h,=h,=h,=h,r,h,h', args=[words, s, z],
        dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _group_tile(words, s, z, dtype, PTX: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr):
    """One group of BLOCK_N int4 rows dequantised, transposed: (8 L, BLOCK_N), row c 8 + i
    the weight of nibble i of word c (weight c + i L of the group). words (L, BLOCK_N); s, z
    (BLOCK_N,). PTX: bf16 in inline assembly; else code x scale + offset in float32."""
    if PTX:
        s = tl.broadcast_to(s[None, :], (L, BLOCK_N))
        z = tl.broadcast_to(z[None, :], (L, BLOCK_N))
        l0, l1, l2, l3, l4, l5, l6, l7 = _lanes_bf16(words, s, z)
        # r[c, n, u, v, t] = lane 4 u + 2 v + t: each join adds the innermost dimension
        r = tl.join(tl.join(tl.join(l0, l4), tl.join(l2, l6)),
                    tl.join(tl.join(l1, l5), tl.join(l3, l7)))
        w = tl.permute(tl.reshape(r, (L, BLOCK_N, 8)), (0, 2, 1))
    else:
        lane = (tl.arange(0, 8) * 4)[None, :, None]
        code = ((words[:, None, :] >> lane) & 15).to(tl.float32)  # (L, 8, BLOCK_N)
        w = (code * s.to(tl.float32)[None, None, :] + z.to(tl.float32)[None, None, :])
    return tl.reshape(w.to(dtype), (8 * L, BLOCK_N))


@triton.jit
def _qgemm_right(XL, Q, S, Z, B, OUT, M, N, K_SPLIT: tl.constexpr, stride_xm, stride_q, stride_s,
                 stride_om, stride_p, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 F32_DOT: tl.constexpr, PTX: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, STAGES: tl.constexpr):
    """int4, weights on the right: acc (BLOCK_M tokens, BLOCK_N rows) += x (BLOCK_M, G) @ the
    group's dequantised tile (G, BLOCK_N). XL: x with each group's columns in lane order
    (`_lane_order`), so the tile's rows need no shuffle.

    K_SPLIT is a compile-time constant here (a compile per matrix K and split), unlike in
    _qgemm: compiled with a run-time trip count this loop took all 255 registers and spilled,
    2-3x slower on the H200 (benchmarks/NOTES.md)."""
    n, m, n_in, m_in, part = _tile(M, N, BLOCK_N, BLOCK_M)
    n64 = tl.minimum(n, N - 1).to(tl.int64)  # clamped rows and tokens: loads stay in bounds,
    x_rows = XL + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_xm  # stores are masked
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, K_SPLIT, GROUP, num_stages=STAGES):
        acc = _right_group(acc, part * K_SPLIT + step, x_rows, Q, S, Z, n64, stride_q,
                           stride_s, GROUP, F32_DOT, PTX, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    at = OUT + part.to(tl.int64) * stride_p + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(at, acc.to(OUT.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _right_group(acc, k0, x_rows, Q, S, Z, n64, stride_q, stride_s, GROUP: tl.constexpr,
                 F32_DOT: tl.constexpr, PTX: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.multiple_of(k0, GROUP)
    x = tl.load(x_rows + (k0 + tl.arange(0, GROUP))[None, :])  # (BLOCK_M, G), lane order
    words = tl.load(Q + n64[None, :] * stride_q + (k0 // 8 + tl.arange(0, GROUP // 8))[:, None])
    s = tl.load(S + n64 * stride_s + k0 // GROUP)
    z = tl.load(Z + n64 * stride_s + k0 // GROUP)
    w = _group_tile(words, s, z, x.dtype, PTX, GROUP // 8, BLOCK_N)
    return _dot(x, w, acc, F32_DOT)


def _lane_order(x, group):
    """x (M, K) with each group's columns in the stored codes' order (quant.py): column
    c 8 + i of a group is x's column i G / 8 + c."""
    m, k = x.shape
    return x.view(m, k // group, 8, group // 8).transpose(-1, -2).reshape(m, k)


def qgemm(x, w, bias=None, config=None):
    """x (M, K) @ w.dequantize(x.dtype).T (+ bias) for a QuantWeight `w` -> (M, N) in x's dtype.

    x's rows may be strided (a slice), its columns must be contiguous. Without `config` the
    table's for M, its split halved while the tiles fill the SMs; a given config's split is
    used as is (where it divides K into whole blocks)."""
    m, k = x.shape
    n, wk = w.shape
    if wk != k:
        raise ValueError(f'qgemm: x has K = {k}, the weight {wk}')
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or config_for(m, x.dtype)
    int4 = w.fmt == 'int4'
    right = int4 and cfg.weights_right
    lanes = cfg.lanes if int4 and w.group // 8 >= 16 else 0  # a dot's K is 16 or more
    block_k = w.group if lanes or right else min(cfg.block_k, triton.next_power_of_2(k))
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = cfg.split
    if config is None and x.is_cuda:
        while split > 1 and tiles * split // 2 >= _sm_count(x.device.index or 0):
            split //= 2
    while split > 1 and k % (split * block_k):
        split //= 2
    k_split = k // split if split > 1 else triton.cdiv(k, block_k) * block_k
    q = w.q.view(torch.int32) if int4 else w.q  # int4: the group's words (quant.py)
    out = x.new_empty((m, n)) if split == 1 else torch.empty(
        (split, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None and split == 1
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    # float32 products (exact for bf16 operands), not tf32: float32 activations, and
    # Triton's interpreter (a CPU tensor), whose dot multiplies bf16 bit patterns
    f32_dot = x.dtype == torch.float32 or x.device.type == 'cpu'
    if right:
        xl = _lane_order(x, w.group)
        ptx = _ptx_tile(x, w)
        _qgemm_right[grid](
            xl, q, w.scale, w.offset, bias if has_bias else w.scale, out, m, n, k_split,
            xl.stride(0), q.stride(0), w.scale.stride(0), n, m * n, GROUP=w.group,
            HAS_BIAS=has_bias, F32_DOT=f32_dot, PTX=ptx, BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    else:
        _qgemm[grid](
            x, q, w.scale, w.offset if int4 else w.scale, bias if has_bias else w.scale, out,
            m, n, k, k_split, x.stride(0), q.stride(0), w.scale.stride(0), n, m * n,
            GROUP=w.group, INT4=int4, HAS_BIAS=has_bias, F32_DOT=f32_dot,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=block_k,
            EVEN_K=k % block_k == 0, LANES=lanes, WHILE_LOOP=x.device.type == 'cpu',
            num_warps=cfg.num_warps, num_stages=cfg.num_stages if int4 else 1)  # int8: above
    if split == 1:
        return out
    total = out.sum(0)  # in a fixed order: deterministic
    if bias is not None:
        total += bias.float()
    return total.to(x.dtype)
