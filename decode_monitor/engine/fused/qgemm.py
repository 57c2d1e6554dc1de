"""The prefill's GEMM on int4 weights: x (M, K) @ W.T (+ bias), W read as stored.

A prefill of M tokens multiplies every matrix by M rows. Dequantising W into a dense buffer first
(unpack.py) writes and reads 2 bytes a weight besides the 0.5 of its codes: at a few hundred
tokens that is most of the GEMM's traffic. Here each program loads a tile of codes, dequantises
it in registers with `QuantWeight.dequantize`'s arithmetic (code x scale + offset in float32,
rounded once to the activations' dtype: the dense buffer's values exactly) and feeds it to tl.dot
with a float32 accumulator; the codes are read once per block of tokens and nothing is written
but the output.

The weight tile is the dot's left operand (acc is (BLOCK_N, BLOCK_M), stored transposed): on
Hopper the left operand of the tensor-core instruction may come from registers, where the
dequantised tile is, and its row count is 64, so N (thousands) takes it and M (as few as one
token) the flexible side. The default layout (`lanes` 1) follows the stored one (quant.py: nibble
i of word c of a group holds weight c + i G / 8): a program loads a group's G / 8 words once per
row and makes one dot per lane, of the words' nibble i against x's columns i G / 8 .. + G / 8,
so the words go from shared memory straight into the dot's register layout (`lanes` 0 gathers
each weight's word instead: any group size; 2 reorders the lanes in registers for one dot).
When the tiles alone would leave SMs idle (few tokens, a matrix of few rows), K is split over up
to `split` programs; their float32 partials are summed in a fixed order (the same result every
run, which graph-vs-eager token equality needs).

`CONFIGS` picks the blocks by M. The prefill uses this kernel for the two MLP matrices (gate/up
and down, three quarters of a layer's weights) up to MAX_M (64) tokens, and the buffer path
(unpack.py) for everything else: measured on the H200 in a graph of 28 layers, this kernel's time
grows with M much faster than cuBLAS's (the compiled loop waits on each of a K step's eight small
dots in turn: latency, it seems, not bandwidth or tensor rate, sets its pace), so at 128 tokens
the two paths tie on the MLP matrices, and on q/k/v and o_proj, whose dequantisation is cheap,
the buffer path is faster from 16 tokens on. int8 keeps the buffer path at every M: its byte
tiles do not compile to asynchronous copies in this Triton, so the kernel loads them
unpipelined (for tests and measurement). The measurements: benchmarks/NOTES.md.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class QGemmConfig(NamedTuple):
    block_n: int  # weight rows per program (the dot's M side: 64 or more on Hopper)
    block_m: int  # tokens per program (16 or more)
    block_k: int
    num_warps: int
    num_stages: int
    split: int = 1  # at most this many programs along K (the table's: while SMs are idle)
    lanes: int = 1  # int4 with block_k = the group: 1, a dot per lane; 2, one reordered; 0, gather


# (largest M, config), by M: the configs the H200's time-to-first-token records ran with (the
# per-matrix sweep beside them finds a little more at 16-64 tokens: benchmarks/NOTES.md); the
# last row serves callers past MAX_M (tests, measurement).
CONFIGS = (
    (16, QGemmConfig(64, 16, 128, 4, 4, 4)),
    (32, QGemmConfig(64, 32, 128, 4, 4, 4)),
    (64, QGemmConfig(64, 64, 128, 4, 4, 4)),
    (128, QGemmConfig(64, 128, 128, 4, 3, 4)),
)
MAX_M = 64  # the prefill's range (see above)
# float32 activations (tests, references): products in float32, which take more shared memory
FLOAT32 = QGemmConfig(64, 32, 64, 4, 2)


def config_for(m, dtype=torch.bfloat16):
    if dtype == torch.float32:
        return FLOAT32
    return next((cfg for bound, cfg in CONFIGS if m <= bound), CONFIGS[-1][1])


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


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


# M and what follows from it are not specialised on: one compile serves every prompt length
@triton.jit(do_not_specialize=['M', 'K_SPLIT', 'stride_p'])
def _qgemm(X, Q, S, Z, B, OUT, M, N, K, K_SPLIT, stride_xm, stride_q, stride_s, stride_om,
           stride_p, GROUP: tl.constexpr, INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
           F32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
           LANES: tl.constexpr, WHILE_LOOP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    part = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_in, m_in = n < N, m < M
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
    lanes = cfg.lanes if int4 and w.group // 8 >= 16 else 0  # a dot's K is 16 or more
    block_k = w.group if lanes else min(cfg.block_k, triton.next_power_of_2(k))
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
    _qgemm[(triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)](
        x, q, w.scale, w.offset if int4 else w.scale, bias if has_bias else w.scale, out,
        m, n, k, k_split, x.stride(0), q.stride(0), w.scale.stride(0), n, m * n,
        GROUP=w.group, INT4=int4, HAS_BIAS=has_bias,
        # float32 products (exact for bf16 operands), not tf32: float32 activations, and
        # Triton's interpreter (a CPU tensor), whose dot multiplies bf16 bit patterns
        F32_DOT=x.dtype == torch.float32 or x.device.type == 'cpu',
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, LANES=lanes, WHILE_LOOP=x.device.type == 'cpu',
        num_warps=cfg.num_warps, num_stages=cfg.num_stages if int4 else 1)  # int8: see above
    if split == 1:
        return out
    total = out.sum(0)  # in a fixed order: deterministic
    if bias is not None:
        total += bias.float()
    return total.to(x.dtype)
