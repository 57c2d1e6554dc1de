"""Dense matrices from quantised codes, on the GPU, for the prefill's GEMMs.

A prefill of M > 1 tokens multiplies every matrix by M rows: cuBLAS does that best on a dense
bf16 matrix, and the codes are read once per prefill either way. So the prefill dequantises one
matrix at a time into one reused buffer (the size of the largest matrix of a layer), runs the
GEMM, and goes on: no dense copy of the model is kept (int4's memory cut stays) and nothing is
allocated per request. A dequantise-in-GEMM kernel would skip the buffer's write and read (a few
ms for a 7B model, against a prefill of tens of ms); this one is an element-wise kernel that
runs at memory speed, where dequantising with torch ops (`QuantWeight.dequantize`: unpacking,
repeat_interleave, float32 temporaries) took about a hundred ms a prefill for a 7B model.

int8: each program writes BLOCK consecutive weights of a row from as many bytes. int4: each
program writes ROWS x GROUPS whole groups from their 32-bit words, read once each (quant.py:
nibble i of word c of a group holds weight c + i G / 8, so taking lane i of the group's G / 8
words, for i in order, gives the group's weights in order, as whole runs of G / 8). Gathering
each weight's byte instead, as int8 does, made the dequantisation half again as slow
(benchmarks/NOTES.md). The arithmetic is `dequantize`'s: code x scale (+ offset) in float32,
rounded once to the output dtype.
"""
from typing import NamedTuple


import torch
import triton
import triton.language as tl

BLOCK = 1024  # int8: weights a program


class Int4Blocks(NamedTuple):
    rows: int = 4
    groups: int = 4
    num_warps: int = 4


INT4_BLOCKS = Int4Blocks()


@triton.jit
def _unpack_int8(Q, S, OUT, K: tl.constexpr, stride_q, stride_s, GROUP: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = k < K
    scale = tl.load(S + row * stride_s + k // GROUP, mask=inside, other=0.0).to(tl.float32)
    code = tl.load(Q + row * stride_q + k, mask=inside, other=0).to(tl.float32)
    tl.store(OUT + row * K + k, (code * scale).to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _unpack_int4(Q, S, Z, OUT, N, K: tl.constexpr, stride_q, stride_s, GROUP: tl.constexpr,
                 ROWS: tl.constexpr, GROUPS: tl.constexpr):
    L: tl.constexpr = GROUP // 8  # words a group
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, 8)[None, None, :, None]
    c = tl.arange(0, L)[None, None, None, :]
    inside = (r < N)[:, None, None, None] & (g < K // GROUP)[None, :, None, None]
    r64 = r.to(tl.int64)[:, None, None, None]
    g4 = g[None, :, None, None]
    words = tl.load(Q + r64 * stride_q + g4 * L + c, mask=inside, other=0)  # (R, G, 1, L)
    scale = tl.load(S + r64 * stride_s + g4, mask=inside, other=0.0).to(tl.float32)
    offset = tl.load(Z + r64 * stride_s + g4, mask=inside, other=0.0).to(tl.float32)
    code = ((words >> (4 * lane)) & 15).to(tl.float32)  # (R, G, 8, L): weights in order
    value = code * scale + offset
    tl.store(OUT + r64 * K + g4 * GROUP + lane * L + c, value.to(OUT.dtype.element_ty),
             mask=inside)


def dense_into(w, buffer, blocks=INT4_BLOCKS):
    """The dense (N, K) matrix of QuantWeight `w`, written into the front of `buffer` (a flat
    tensor of the output dtype, at least N x K long); returns that (N, K) view."""
    n, k = w.shape
    if buffer.numel() < n * k:
        raise ValueError(f'buffer of {buffer.numel()} values is too small for a {n}x{k} matrix')
    out = buffer[:n * k].view(n, k)
    if w.fmt == 'int4':
        q = w.q.view(torch.int32)  # the groups' words
        _unpack_int4[(triton.cdiv(n, blocks.rows), triton.cdiv(k, w.group * blocks.groups))](
            q, w.scale, w.offset, out, n, k, q.stride(0), w.scale.stride(0), GROUP=w.group,
            ROWS=blocks.rows, GROUPS=blocks.groups, num_warps=blocks.num_warps)
    else:
        _unpack_int8[(n, triton.cdiv(k, BLOCK))](
            w.q, w.scale, out, k, w.q.stride(0), w.scale.stride(0), GROUP=w.group,
            BLOCK=BLOCK)
    return out


def buffer_for(matrices, dtype, device):
    """One flat buffer that holds the largest of `matrices` dense."""
    return torch.empty(max(m.shape[0] * m.shape[1] for m in matrices), dtype=dtype,
                       device=device)
