"""Dense matrices from quantised codes, on the GPU, for the prefill's GEMMs.

A prefill of M > 1 tokens multiplies every matrix by M rows: cuBLAS does that best on a dense
bf16 matrix, and the codes are read once per prefill either way. So the prefill dequantises one
matrix at a time into one reused buffer (the size of the largest matrix of a layer), runs the
GEMM, and goes on: no dense copy of the model is kept (int4's memory cut stays) and nothing is
allocated per request. A dequantise-in-GEMM kernel would skip the buffer's write and read (a few
ms for a 7B model, against a prefill of tens of ms); this one is an element-wise kernel that
runs at memory speed, where dequantising with torch ops (`QuantWeight.dequantize`: unpacking,
repeat_interleave, float32 temporaries) took about a hundred ms a prefill for a 7B model.

Each program writes BLOCK consecutive weights of a row; int4 weights are gathered from their
lane (see quant.py: nibble i of word c of a group holds weight c + i G / 8) within the group's
G / 2 bytes, which the program reads anyway. The arithmetic is `dequantize`'s: code x scale
(+ offset) in float32, rounded once to the output dtype.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _unpack(Q, S, Z, OUT, K: tl.constexpr, stride_q, stride_s, GROUP: tl.constexpr,
            INT4: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = k < K
    g = k // GROUP
    scale = tl.load(S + row * stride_s + g, mask=inside, other=0.0).to(tl.float32)
    if INT4:
        r = k % GROUP
        lane = r // (GROUP // 8)
        stored = g * GROUP + (r % (GROUP // 8)) * 8 + lane  # position in the stored order
        byte = tl.load(Q + row * stride_q + stored // 2, mask=inside, other=0).to(tl.int32)
        code = ((byte >> ((stored % 2) * 4)) & 15).to(tl.float32)
        offset = tl.load(Z + row * stride_s + g, mask=inside, other=0.0).to(tl.float32)
        value = code * scale + offset
    else:
        code = tl.load(Q + row * stride_q + k, mask=inside, other=0).to(tl.float32)
        value = code * scale
    tl.store(OUT + row * K + k, value.to(OUT.dtype.element_ty), mask=inside)


def dense_into(w, buffer):
    """The dense (N, K) matrix of QuantWeight `w`, written into the front of `buffer` (a flat
    tensor of the output dtype, at least N x K long); returns that (N, K) view."""
    n, k = w.shape
    if buffer.numel() < n * k:
        raise ValueError(f'buffer of {buffer.numel()} values is too small for a {n}x{k} matrix')
    out = buffer[:n * k].view(n, k)
    offset = w.offset if w.offset is not None else w.scale  # unread for int8
    _unpack[(n, triton.cdiv(k, BLOCK))](
        w.q, w.scale, offset, out, k, w.q.stride(0), w.scale.stride(0), GROUP=w.group,
        INT4=w.fmt == 'int4', BLOCK=BLOCK)
    return out


def buffer_for(matrices, dtype, device):
    """One flat buffer that holds the largest of `matrices` dense."""
    return torch.empty(max(m.shape[0] * m.shape[1] for m in matrices), dtype=dtype,
                       device=device)
