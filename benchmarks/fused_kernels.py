"""Kernel benchmark for backend `fused`: each Triton kernel against what torch would run instead.

For every weight shape of the study's models, the fused GEMVs (every candidate block config) are
timed against cuBLAS `F.linear` at M=1, and the split-K attention against SDPA over repeated K/V
heads (what the `hf` backend runs) and SDPA with `enable_gqa`. Times are medians from
`triton.testing.do_bench`, which flushes L2 before every run, so weights come from HBM as in a
real decode step. Writes `<out>/fused_kernels.json` and the fastest config per shape to
`<out>/fused_configs.json` (load it with DECODE_MONITOR_FUSED_CONFIGS=<path>).

    python benchmarks/fused_kernels.py --out results/
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from decode_monitor.engine.floor import measure_copy_bandwidth
from decode_monitor.engine.fused import gemv as G
from decode_monitor.engine.fused.attention import DecodeAttention, default_splits
from decode_monitor.engine.presets import PRESETS

MODELS = ('qwen2.5-7b', 'llama-3-8b', 'mistral-7b')
# (BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K]) per GEMV kind; stages > 1 pipelines
# weight loads, split-K puts more programs on matrices with few row blocks.
CANDIDATES = {
    'gemv': [(4, 512, 4, 1), (4, 512, 4, 3), (4, 512, 4, 5), (8, 512, 4, 4), (4, 1024, 4, 3),
             (2, 1024, 4, 4), (4, 512, 4, 3, 2), (8, 512, 4, 4, 2), (8, 512, 4, 3, 7)],
    'gated': [(4, 512, 4, 1), (8, 512, 4, 1), (2, 512, 4, 3), (4, 512, 4, 3), (4, 256, 4, 4),
              (8, 512, 4, 3, 2)],
    'qkv': [(4, 512, 4, 1), (2, 512, 4, 3), (4, 512, 4, 3), (4, 256, 4, 4), (4, 512, 4, 3, 2),
            (8, 512, 4, 3, 7), (8, 256, 4, 4, 7)],
    'head': [(8, 512, 4, 1), (32, 1024, 8, 1), (16, 512, 4, 3), (32, 512, 8, 3)],
}
# Attention: (BLOCK_T, splits as a multiple of the default, num_warps, num_stages).
ATTENTION_CANDIDATES = [(64, 1, 4, 1), (64, 1, 4, 3), (32, 1, 4, 3), (128, 1, 4, 2),
                        (128, 1, 4, 3)]


def shapes(name):
    """(kind, N, K, heads) of one layer's GEMVs and the lm_head; heads = (q, kv) for qkv."""
    p = PRESETS[name]
    hidden, inter, hq, hkv = (p['hidden_size'], p['intermediate_size'],
                              p['num_attention_heads'], p['num_key_value_heads'])
    d = hidden // hq
    return [('qkv', (hq + 2 * hkv) * d, hidden, (hq, hkv)), ('gemv', hidden, hq * d, None),
            ('gated', inter, hidden, None), ('gemv', hidden, inter, None),
            ('head', p['vocab_size'], hidden, None)]


def qkv_runner(w, x, g, heads, dev, cfg):
    """A call of the q/k/v kernel (RoPE and cache write at position 5) on scratch outputs."""
    hq, hkv = heads
    d = 128
    cos = torch.rand(64, d // 2, device=dev)
    sin = torch.rand(64, d // 2, device=dev)
    pos = torch.tensor([5], device=dev)
    q = torch.empty(hq * d, device=dev, dtype=torch.bfloat16)
    kc = torch.empty(hkv, 64, d, device=dev, dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    return lambda: G.qkv_rope(w, None, x, g, cos, sin, pos, q, kc, vc, hq, hkv, 1e-5, config=cfg)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_gemv(kind, n, k, heads, dev):
    rows = 2 * n if kind == 'gated' else n
    w = torch.randn(rows, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
    x = torch.randn(k, device=dev, dtype=torch.bfloat16)
    g = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
    nbytes = rows * k * 2
    out = {'kind': kind, 'N': n, 'K': k, 'weight_bytes': nbytes}
    out['cublas_ms'] = do_bench(lambda: F.linear(x, w), return_mode='median')
    xn = (x.float() * torch.rsqrt(x.float().pow(2).mean() + 1e-5) * g.float())
    if kind == 'gated':
        gate, up = F.linear(xn, w.float()).chunk(2)
        ref = F.silu(gate) * up
    elif kind == 'qkv':
        ref = None  # checked end to end against the hf backend instead
    else:
        ref = F.linear(xn if kind == 'head' else x.float(), w.float())
    res = torch.randn(n, device=dev, dtype=torch.bfloat16)
    if kind == 'qkv':
        def make(cfg):
            return qkv_runner(w, x, g, heads, dev, cfg)
    else:
        y = torch.empty(n, device=dev, dtype=torch.float32 if kind == 'head' else torch.bfloat16)

        def make(cfg):
            if kind == 'gemv':  # o_proj / down_proj: residual added in place
                return lambda: G.gemv(w, x, y, residual=y, config=cfg)
            return lambda: G.gemv(w, x, y, norm_weight=g, gated=kind == 'gated', eps=1e-5,
                                  config=cfg)
    out['configs'] = []
    for cfg in CANDIDATES[kind]:
        t0 = time.perf_counter()
        fn = make(cfg)
        err = None
        try:  # a candidate may not compile or fit (shared memory); skip it, say why
            if ref is not None:
                if kind == 'gemv':
                    y.copy_(res)
                fn()
                got = y.float() - res.float() if kind == 'gemv' else y
                err = rel(got, ref)
            ms = do_bench(fn, return_mode='median')
        except Exception as exc:
            out['configs'].append({'config': cfg, 'error': f'{type(exc).__name__}: {exc}'[:300]})
            continue
        out['configs'].append({'config': cfg, 'ms': ms, 'rel_err': err,
                               'compile_and_bench_s': time.perf_counter() - t0})
    ok = [c for c in out['configs'] if 'ms' in c and (c['rel_err'] or 0) < 2e-2]
    best = min(ok, key=lambda c: c['ms']) if ok else {'config': None, 'ms': float('nan')}
    out['best'] = best
    out['cublas_tb_s'] = nbytes / out['cublas_ms'] / 1e9
    out['best_tb_s'] = nbytes / best['ms'] / 1e9
    return out


def bench_attention(name, ctx, dev):
    p = PRESETS[name]
    hq, hkv = p['num_attention_heads'], p['num_key_value_heads']
    d = p['hidden_size'] // hq
    kc = torch.randn(hkv, ctx, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(hq * d, device=dev, dtype=torch.bfloat16)
    pos = torch.tensor([ctx - 1], device=dev)
    nbytes = 2 * kc.numel() * 2
    ref = F.scaled_dot_product_attention(q.view(1, hq, 1, d), kc[None], vc[None],
                                         enable_gqa=True).flatten()
    row = {'model': name, 'ctx': ctx, 'kv_bytes': nbytes}
    kr = kc[None].repeat_interleave(hq // hkv, dim=1)
    vr = vc[None].repeat_interleave(hq // hkv, dim=1)
    row['sdpa_repeat_kv_ms'] = do_bench(
        lambda: F.scaled_dot_product_attention(
            q.view(1, hq, 1, d), kc[None].repeat_interleave(hq // hkv, dim=1),
            vc[None].repeat_interleave(hq // hkv, dim=1)), return_mode='median')
    row['sdpa_pre_repeated_ms'] = do_bench(
        lambda: F.scaled_dot_product_attention(q.view(1, hq, 1, d), kr, vr),
        return_mode='median')
    row['sdpa_gqa_ms'] = do_bench(
        lambda: F.scaled_dot_product_attention(q.view(1, hq, 1, d), kc[None], vc[None],
                                               enable_gqa=True), return_mode='median')
    row['fused'] = []
    for block_t, mult, warps, stages in ATTENTION_CANDIDATES:
        splits = default_splits(hkv, ctx, block_t, dev) * mult
        att = DecodeAttention(hq, hkv, d, ctx, dev, config=(block_t, splits, warps, stages))
        out = torch.full_like(q, float('nan'))
        try:
            att(q, kc, vc, pos, out)
            err = rel(out, ref)
            ms = do_bench(lambda: att(q, kc, vc, pos, out), return_mode='median')
        except Exception as exc:
            row['fused'].append({'config': (block_t, splits, warps, stages),
                                 'error': f'{type(exc).__name__}: {exc}'[:300]})
            continue
        row['fused'].append({'config': (block_t, splits, warps, stages), 'ms': ms,
                             'tb_s': nbytes / ms / 1e9, 'rel_err': err})
    ok = [c for c in row['fused'] if 'ms' in c and c['rel_err'] < 2e-2]
    row['best'] = min(ok, key=lambda c: c['ms']) if ok else None
    row['heads'] = (hkv, hq // hkv)
    return row


def _write_tuned(out, gemvs, attn, env=None):
    """The fastest correct config per shape (and all timings), rewritten as results come in."""
    tuned = [[r['kind'], r['N'], r['K'], *r['best']['config']] for r in gemvs
             if r['best']['config']]
    tuned += [['attention', *r['heads'], r['ctx'], *r['best']['config']] for r in attn
              if r['best']]
    with open(os.path.join(out, 'fused_configs.json'), 'w') as f:
        json.dump(tuned, f)
    with open(os.path.join(out, 'fused_kernels.json'), 'w') as f:
        json.dump({'env': env, 'gemv': gemvs, 'attention': attn}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='.')
    ap.add_argument('--models', nargs='+', default=list(MODELS))
    ap.add_argument('--ctx', nargs='+', type=int, default=[2048, 16384])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device('cuda')
    env = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'triton': triton.__version__, 'cuda': torch.version.cuda,
           'copy_bandwidth_tb_s': measure_copy_bandwidth(dev, 2048) / 1e12}
    print(json.dumps(env), flush=True)
    attn, gemvs = [], []
    for name in args.models:
        if name == 'mistral-7b':  # the same attention shape as llama-3-8b
            continue
        for ctx in args.ctx:
            r = bench_attention(name, ctx, dev)
            attn.append(r)
            _write_tuned(args.out, gemvs, attn, env)
            best = r['best']
            if best is None:
                print(f'{name} attn ctx={ctx}: no candidate ran correctly: {r["fused"]}')
                continue
            print(f"{name:11s} attn ctx={ctx:5d} sdpa+repeat {r['sdpa_repeat_kv_ms']*1e3:7.1f} us"
                  f" sdpa-gqa {r['sdpa_gqa_ms']*1e3:7.1f} us | fused {best['ms']*1e3:6.1f} us "
                  f"{best['tb_s']:.2f} TB/s {best['config']} err={best['rel_err']:.1e}",
                  flush=True)
    seen = set()
    for name in args.models:
        for kind, n, k, heads in shapes(name):
            if (kind, n, k) in seen:
                continue
            seen.add((kind, n, k))
            r = bench_gemv(kind, n, k, heads, dev)
            r['model'] = name
            gemvs.append(r)
            _write_tuned(args.out, gemvs, attn, env)
            print(f"{name:11s} {kind:6s} N={n:6d} K={k:5d} cuBLAS {r['cublas_ms']*1e3:7.1f} us "
                  f"{r['cublas_tb_s']:.2f} TB/s | fused {r['best']['ms']*1e3:7.1f} us "
                  f"{r['best_tb_s']:.2f} TB/s {r['best']['config']}", flush=True)


if __name__ == '__main__':
    main()
