"""A candidate config's kernel against the default config's, on the step's own weights.

Logits of a whole step cannot tell a wrong kernel from a reordered sum: through 28 layers of a
random-weight model, the rounding of another summation order grows past any tolerance that would
still catch a fault. One kernel's output can: the same inputs (the first layer's weights, random
activations drawn from a fixed seed), outputs poisoned with NaN first, fp32 accumulation, so
two correct configs agree to the output dtype's rounding.
"""
import torch

REL_TOL = 2e-2  # bf16 outputs round to ~4e-3 an element


def kernel_output(backend, kind, key, config):
    """The output of the kernel that `key` names, launched with `config`."""
    dev, dtype = backend.device, backend.dtype
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    if kind == 'attention':
        from decode_monitor.engine.fused.attention import DecodeAttention
        att = DecodeAttention(backend.q_heads, backend.kv_heads, backend.head_dim,
                              backend.max_context, dev, scale=backend.scale, config=config)
        q = rand(backend.q_heads * backend.head_dim)
        out = torch.full_like(q, float('nan'))
        pos = torch.tensor([backend.max_context - 1], device=dev)
        att(q, backend.k_cache[0], backend.v_cache[0], pos, out)
        return out
    gemv = backend._gemv
    name = next(n for n, k in backend.gemv_keys().items() if k == key)
    w = backend.lm_head if name == 'lm_head' else getattr(backend.layers[0], name)
    x, g = rand(key.k), rand(key.k).abs() + 0.5
    if key.kind == 'qkv':
        q = torch.full((backend.q_heads * backend.head_dim,), float('nan'), device=dev,
                       dtype=dtype)
        kc, vc = (torch.full((backend.kv_heads, 1, backend.head_dim), float('nan'), device=dev,
                             dtype=dtype) for _ in range(2))
        gemv.qkv_rope(w, backend.layers[0].bqkv, x, g, backend.cos, backend.sin,
                      torch.zeros(1, dtype=torch.long, device=dev), q, kc, vc, backend.q_heads,
                      backend.kv_heads, backend.eps, config=config)
        return torch.cat([q, kc.flatten(), vc.flatten()])
    head = key.kind == 'head'
    out = torch.full((key.n,), float('nan'), device=dev,
                     dtype=torch.float32 if head else dtype)
    if key.kind == 'gated':
        gemv.gemv(w, x, out, norm_weight=g, gated=True, eps=backend.eps, config=config)
    elif head:
        gemv.gemv(w, x, out, norm_weight=g, eps=backend.eps, kind='head', config=config)
    else:
        gemv.gemv(w, x, out, residual=rand(key.n), config=config)
    return out


def agrees(out, reference):
    """Every element written (no NaN left) and the relative error within REL_TOL."""
    err = (out.float() - reference.float()).norm() / reference.float().norm()
    return bool(torch.isfinite(err)) and float(err) < REL_TOL, float(err)
