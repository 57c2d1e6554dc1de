"""The prefill in torch ops (and the CPU's decode step): the fused backend's torch path.

Both paths of the backend share the packed (or quantised) weights and the static K/V cache.
Here the matrices go through cuBLAS (or the CPU's GEMM); on the Triton path the element-wise
work between them runs as one-pass kernels (prefill_ops.py), int4 MLP matrices of prompts up to
qgemm.MAX_M tokens go through a GEMM that reads their codes (qgemm.py), and other quantised
matrices are dequantised one at a time into a reused buffer (unpack.py); the short prefills of
graph mode replay this function captured (prefill_graphs.py).
"""
from functools import partial

import torch
import torch.nn.functional as F

from decode_monitor.engine.fused.quant import dense, QuantWeight


def rms_norm(x, weight, eps):
    """transformers' RMSNorm: statistics in fp32, scaled by the weight in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x, y, weight, eps):
    """The residual sum x + y and its rms_norm."""
    total = x + y
    return total, rms_norm(total, weight, eps)


def apply_rope(x, cos, sin):
    """x: (T, heads, D); cos, sin: (T, D / 2) fp32, rotate-half convention."""
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def torch_forward(backend, ids, start, last_only=True, last=None, keys=None, attend=None):
    """The prefill (and the CPU's step) in torch ops. `start` is a position, or a device
    tensor holding one (a captured prefill: prefill_graphs.py), with `keys` the keys to
    attend (masked by position). A device index `last` picks the token whose logits come
    back: tokens padded after it only write K/V that nothing reads before it is rewritten.
    `attend(q, k, v, scale)` (each (1, heads, T, D)), when given, replaces SDPA's own
    causal attention of a fresh prefill (prefill_shapes.attention); one with `rows` attends at
    that many rows (queries token-major, so that the output is too, as cuDNN allocates it like
    the queries; keys the cache's first `rows`, zeroed past the prompt's end, which its queries
    do not see) and keeps the first T."""
    n = ids.shape[1]
    fresh = not isinstance(start, torch.Tensor) and start == 0
    if isinstance(start, torch.Tensor):
        positions, end = start + torch.arange(n, device=backend.device), keys
    else:
        end = start + n
        if end > backend.max_context:
            raise ValueError(f'positions up to {end - 1} exceed max_context '
                             f'{backend.max_context}')
        positions = torch.arange(start, end, device=backend.device)
    cos, sin = backend.cos[positions], backend.sin[positions]  # (T, D / 2)
    # From position 0 the keys are the queries: SDPA's own causal mask (which admits a
    # flash kernel, GQA included); after a cached prefix, the mask of what each query sees.
    mask = None if fresh else (
        positions[:, None] >= torch.arange(end, device=backend.device)[None, :])  # (T, end)
    qd, kd = backend.q_heads * backend.head_dim, backend.kv_heads * backend.head_dim
    linear = partial(quant_linear, backend)  # quantised: dequantised into the buffer
    mlp = partial(quant_linear, backend, mlp=True)  # int4, short prompts: the codes in the GEMM
    ops = backend._prefill_ops  # one-pass Triton element-wise kernels (prefill_ops.py)
    norm = ops.rms_norm if ops else rms_norm
    add_norm = ops.add_rms_norm if ops else add_rms_norm
    layers = backend._dense_layers if backend._keep_dense else backend.layers
    # attention at a bucket of rows (prefill_shapes.Bucket): the queries written token-major
    # into its first n rows (the rest are never read by a real query); the cache's rows past
    # the prompt zeroed, as a non-finite value left there would reach real rows through the
    # masked products (0 x inf)
    rows = getattr(attend, 'rows', None)
    bucket = None
    if rows is not None:
        bucket = backend.embed.new_empty((rows, backend.q_heads, backend.head_dim))
        backend.k_cache[:, :, end:rows].zero_()
        backend.v_cache[:, :, end:rows].zero_()
    h = F.embedding(ids[0], backend.embed)  # (T, H)
    normed = norm(h, layers[0].ln1, backend.eps)
    for i, layer in enumerate(layers):
        qkv = linear(normed, layer.wqkv, layer.bqkv)
        q, k, v = qkv.split([qd, kd, kd], dim=-1)
        # a start known here: rope writes k into the cache's positions itself
        k_at = None if isinstance(start, torch.Tensor) else (
            backend.k_cache[i].transpose(0, 1)[start:end])
        if ops:
            q = ops.apply_rope(q, cos, sin, backend.q_heads, out=bucket)[:n]
            k = ops.apply_rope(k, cos, sin, backend.kv_heads, out=k_at)
        else:
            q = apply_rope(q.view(n, backend.q_heads, backend.head_dim), cos, sin)
            if bucket is not None:
                q = bucket[:n].copy_(q)
            k, k_at = apply_rope(k.view(n, backend.kv_heads, backend.head_dim), cos, sin), None
        if k_at is None:
            backend.k_cache[i].index_copy_(1, positions, k.transpose(0, 1))
        v = v.view(n, backend.kv_heads, -1)
        backend.v_cache[i].index_copy_(1, positions, v.transpose(0, 1))
        if attend is None:
            att = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], backend.k_cache[i, None, :, :end],
                backend.v_cache[i, None, :, :end], attn_mask=mask, is_causal=mask is None,
                scale=backend.scale, enable_gqa=True)  # (1, Hq, T, D)
        elif bucket is None:
            att = attend(q.transpose(0, 1)[None], backend.k_cache[i, None, :, :end],
                         backend.v_cache[i, None, :, :end], backend.scale)
        else:  # the bucket's rows: queries past n unwritten, keys past n zero, all causal
            att = attend(bucket.transpose(0, 1)[None], backend.k_cache[i, None, :, :rows],
                         backend.v_cache[i, None, :, :rows], backend.scale)[:, :, :n]
        h, normed = add_norm(h, linear(att[0].transpose(0, 1).reshape(n, qd), layer.wo),
                             layer.ln2, backend.eps)
        gate_up = mlp(normed, layer.wgu)
        if ops:
            act = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        if i + 1 < len(layers):  # the residual sum and the next layer's first norm
            h, normed = add_norm(h, mlp(act, layer.wd), layers[i + 1].ln1, backend.eps)
        else:
            h = h + mlp(act, layer.wd)
    if last_only:
        h = h[-1:] if last is None else h.index_select(0, last)
    if last_only and backend.use_triton and isinstance(backend.lm_head, QuantWeight):
        backend.h.copy_(h)  # the decode step's head kernel reads the codes directly
        backend._gemv.gemv(backend.lm_head, backend.h.view(-1), backend.logits[0],
                           norm_weight=backend.norm, eps=backend.eps, kind='head',
                           config=backend.launch_configs['lm_head'])
        return backend.logits
    head = backend._dense_head if backend._keep_dense else dense(backend.lm_head, backend.dtype)
    return F.linear(norm(h, backend.norm, backend.eps), head).float()


def reads_codes(backend, weight, m, mlp):
    """Whether the GEMM of `m` tokens reads `weight`'s codes (qgemm.py) rather than the buffer:
    int4 MLP matrices up to qgemm.MAX_M tokens, on the Triton path (where it is faster)."""
    if not (mlp and backend.use_triton and isinstance(weight, QuantWeight)
            and weight.fmt == 'int4'):
        return False
    from decode_monitor.engine.fused import qgemm  # Triton: the GPU path only
    return m <= qgemm.MAX_M


def quant_linear(backend, x, weight, bias=None, mlp=False):
    """F.linear(x, weight, bias) of a layer matrix as stored: through qgemm where
    `reads_codes`, else cuBLAS on the matrix dequantised into the shared buffer."""
    if reads_codes(backend, weight, x.shape[0], mlp):
        from decode_monitor.engine.fused import qgemm
        return qgemm.qgemm(x, weight, bias)
    return F.linear(x, dense_matrix(backend, weight), bias)


def dense_matrix(backend, weight):
    """A layer matrix for the torch path's GEMMs: itself when dense; else dequantised
    into the one buffer every quantised matrix shares (unpack.py), valid until the next."""
    if not isinstance(weight, QuantWeight):
        return weight
    from decode_monitor.engine.fused import unpack  # Triton: the GPU path only
    from decode_monitor.engine.fused.model import MATRICES
    if backend._unpack_buffer is None:
        backend._unpack_buffer = unpack.buffer_for(
            [getattr(backend.layers[0], name) for name in MATRICES], backend.dtype,
            backend.device)
    return unpack.dense_into(weight, backend._unpack_buffer)
