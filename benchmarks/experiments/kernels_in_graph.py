"""Fused kernels timed the way a decode step runs them: back to back inside one CUDA graph.

A kernel timed alone (`fused_kernels.py`, `quant_kernels.py`: L2 flushed, launched from the
host) pays a launch and an idle GPU around it; inside the graphed step it follows another kernel
and its cost is its duration plus the drain and ramp at its edges. Here each candidate config is
captured 28 times in one graph over 28 distinct weight matrices or KV caches (a 7-8B model's
layers, so nothing is served from L2 that the step would read from HBM), and the graph is
replayed: us per call = median replay time / 28. Prints a table, writes JSON.

    python benchmarks/experiments/kernels_in_graph.py attention gemv --out results/

`sizes` times qwen2.5-7b's gate/up at its own rows and at twice as many, in every format, and
`fit --inputs A.json ...` fits t = t0 + bytes / rate over the shapes of earlier runs' JSON
(no GPU): both split a call's time into a fixed cost per call and a streaming rate.

Tuning moved into the product: `bench tune` times candidates in the model's own graphed
step and writes a kernel-config table; this script keeps the one-off studies.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from decode_monitor.engine.fused import gemv as G  # noqa: E402
from decode_monitor.engine.fused.attention import DecodeAttention  # noqa: E402
from decode_monitor.engine.fused.configs import GemvConfig  # noqa: E402
from decode_monitor.engine.fused.quant import quantize, weight_nbytes  # noqa: E402
from decode_monitor.engine.fused.tables import resolve  # noqa: E402

LAYERS = 28
DEV = 'cuda'

# (q_heads, kv_heads, ctx): qwen2.5-7b, then llama-3-8b / mistral-7b
ATTENTION = {
    (28, 4, 2048): [(128, 16, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3),
                    (16, 128, 4, 2), (64, 32, 8, 2)],
    (32, 8, 2048): [(128, 16, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 16, 4, 2),
                    (16, 128, 4, 2)],
    (28, 4, 16384): [(128, 66, 4, 2), (64, 66, 4, 3), (128, 128, 4, 2), (64, 128, 4, 3),
                     (64, 256, 4, 2), (32, 256, 4, 3)],
    (32, 8, 16384): [(32, 33, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (128, 128, 4, 2),
                     (64, 128, 4, 2), (32, 128, 4, 3)],
}
# (format, kind, N, K): qwen2.5-7b's q/k/v and o_proj, the matrices too small to stream well
GEMV = {
    ('int8', 'qkv', 4608, 3584): [(4, 512, 4, 1), (8, 512, 4, 3), (4, 1024, 4, 3),
                                  (4, 512, 4, 1, 2), (8, 512, 8, 3)],
    ('int8', 'gemv', 3584, 3584): [(4, 512, 4, 1), (8, 512, 4, 3), (4, 1024, 4, 3),
                                   (4, 512, 4, 1, 2), (8, 512, 8, 3)],
    ('bf16', 'qkv', 4608, 3584): [(4, 512, 4, 1), (8, 512, 4, 4), (4, 256, 4, 4),
                                  (4, 512, 4, 3, 2)],
    ('bf16', 'gemv', 3584, 3584): [(4, 512, 4, 1), (8, 512, 4, 4), (4, 256, 4, 4),
                                   (4, 512, 4, 3, 2)],
}


def _staged_sweep(fmt, n, k, shapes, splits, base):
    """`base` (the shipped Triton configs) and staged configs of (rows, chunk, warps) x chunks
    ahead (1, 2) x splits that staged.fits takes for this shape (group 128)."""
    from decode_monitor.engine.fused.configs import GemvConfig
    from decode_monitor.engine.fused.staged import fits
    out = [GemvConfig(*c) for c in base]
    for bn, bk, warps in shapes:
        for ahead in (1, 2):
            for split in splits:
                c = GemvConfig(bn, bk, warps, ahead, split, None, True)
                if fits(c, fmt, n, k, 128, plain=True):
                    out.append(c)
    return out


# (format, kind, N, K): qwen2.5-7b's int8 / int4 o_proj, down_proj and gate/up: the shipped
# Triton config first, then the staged kernel (engine/fused/staged.py) at chunks ahead 1-2
STAGED = {
    ('int8', 'gemv', 3584, 18944): _staged_sweep(
        'int8', 3584, 18944, [(8, 512, 4), (16, 512, 4), (32, 512, 8), (64, 512, 8),
                              (16, 256, 4)], (4, 5, 6, 8), [(4, 1024, 4, 3)]),
    ('int8', 'gemv', 3584, 3584): _staged_sweep(
        'int8', 3584, 3584, [(4, 512, 4), (8, 512, 4), (16, 512, 4), (8, 256, 4)], (1, 2, 3),
        [(8, 512, 4, 2)]),
    ('int4', 'gemv', 3584, 18944): _staged_sweep(
        'int4', 3584, 18944, [(16, 512, 4), (32, 512, 8), (64, 512, 8), (16, 256, 4)],
        (4, 8), [(64, 256, 4, 2, 7)]),
    ('int4', 'gemv', 3584, 3584): _staged_sweep(
        'int4', 3584, 3584, [(16, 512, 4), (32, 512, 4), (16, 256, 4)], (1, 2, 3),
        [(64, 256, 4, 2, 7)]),
    # (the first record of this sweep gave these as plain tuples, which gemv._staged does not
    # take for staged rows: they ran the Triton kernel at those settings)
    ('int8', 'gated', 18944, 3584): [GemvConfig(*c) for c in (
        (16, 512, 4, 2), (16, 512, 8, 1, 1, None, True), (16, 512, 8, 2, 1, None, True),
        (16, 256, 4, 2, 1, None, True), (32, 256, 8, 2, 1, None, True))],
}
# int8 down_proj through the Triton kernel: more rows a program with K split, deeper stages
TRITON_DOWN = {('int8', 'gemv', 3584, 18944): [
    (bn, bk, 4, st, sp) for bn in (4, 8, 16) for bk in (512, 1024) for st in (2, 3, 4)
    for sp in (1, 2, 4)]}

# down_proj (K = 18944 = 37 x 512) in equal shares: 37 splits of one 512-chunk or two 256-chunks,
# so that many short programs, each the same length, fill the waves evenly
_EVEN = [(64, 512, 8, 1, 37), (32, 512, 8, 1, 37), (128, 512, 8, 1, 37), (64, 256, 8, 1, 37),
         (64, 256, 8, 2, 37), (128, 256, 8, 2, 37), (32, 512, 4, 1, 37)]
EVEN_DOWN = {
    ('int8', 'gemv', 3584, 18944): [GemvConfig(*c) for c in (
        (32, 512, 8, 1, 5, None, True), (4, 1024, 4, 3), (16, 512, 4, 1, 37),
        (32, 512, 4, 1, 37), (64, 512, 8, 1, 37), (16, 512, 4, 2, 37))]
    + [GemvConfig(*c, None, True) for c in _EVEN],
    ('int4', 'gemv', 3584, 18944): [GemvConfig(*c) for c in (
        (32, 512, 8, 1, 8, None, True), (64, 256, 4, 2, 7), (32, 512, 4, 1, 37),
        (64, 512, 8, 1, 37))]
    + [GemvConfig(*c, None, True) for c in _EVEN],
}

# int8 down_proj through the staged kernel in two or three long shares (x' of a share 25-37 KB)
FEW_SHARES_DOWN = {('int8', 'gemv', 3584, 18944): [GemvConfig(*c) for c in (
    (32, 512, 8, 1, 5, None, True), (4, 1024, 4, 3))] + [
    GemvConfig(bn, 512, w, ahead, split, None, True)
    for bn, w in ((8, 4), (16, 4), (16, 8), (32, 8)) for ahead in (1, 2) for split in (2, 3)]}

# int8 gate/up (qwen2.5-7b) through the staged kernel at one and two chunks of codes ahead,
# beside the shipped Triton config
GATED_INT8 = {('int8', 'gated', 18944, 3584): [GemvConfig(16, 512, 4, 2)] + [
    GemvConfig(bn, bk, w, ahead, 1, None, True)
    for bn, bk, w in ((8, 512, 4), (16, 512, 4), (16, 512, 8), (32, 512, 8), (8, 256, 4),
                      (16, 256, 4), (16, 256, 8), (32, 256, 8))
    for ahead in (1, 2)]}

# int8 / int4 q/k/v with RoPE (qwen2.5-7b) through staged_qkv.py, beside the shipped Triton rows
STAGED_QKV = {
    ('int8', 'qkv', 4608, 3584): [GemvConfig(4, 512, 4, 2)] + [
        GemvConfig(*c, 1, None, True) for c in (
            (16, 512, 4, 1), (16, 512, 4, 2), (8, 512, 4, 1), (8, 512, 4, 2), (16, 512, 8, 1),
            (16, 256, 4, 1), (8, 256, 4, 2), (32, 256, 8, 1), (4, 512, 4, 1), (4, 512, 4, 2))],
    ('int4', 'qkv', 4608, 3584): [GemvConfig(64, 256, 4, 1, 7)] + [
        GemvConfig(*c, 1, None, True) for c in (
            (16, 512, 8, 1), (16, 512, 4, 1), (32, 512, 4, 1), (8, 512, 4, 1), (16, 256, 4, 1),
            (16, 512, 8, 2), (16, 512, 4, 2), (32, 256, 8, 1))],
}


def graph_us(calls, reps=30):
    """Median us per call of `calls` captured in order into one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def attention_rows(hq, hkv, ctx, configs, d=128):
    kc = torch.randn(LAYERS, hkv, ctx, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(hq * d, device=DEV, dtype=torch.bfloat16)
    pos = torch.tensor([ctx - 1], device=DEV)
    ref = F.scaled_dot_product_attention(
        q.view(1, hq, 1, d), kc[0][None], vc[0][None], enable_gqa=True).flatten().float()
    rows = []
    for config in configs:
        att = DecodeAttention(hq, hkv, d, ctx, DEV, config=config)
        outs = torch.empty(LAYERS, hq * d, device=DEV, dtype=torch.bfloat16)
        us = graph_us([lambda i=i: att(q, kc[i], vc[i], pos, outs[i]) for i in range(LAYERS)])
        err = ((outs[0].float() - ref).norm() / ref.norm()).item()
        kv_bytes = 2 * hkv * ctx * d * 2
        rows.append({'kind': 'attention', 'heads': [hq, hkv], 'ctx': ctx, 'config': config,
                     'us': us, 'tb_s': kv_bytes / us / 1e6, 'rel_err': err})
    return rows


def gemv_rows(fmt, kind, n, k, configs, heads=None, d=128):
    rows_w = 2 * n if kind == 'gated' else n
    weights = []
    for _ in range(LAYERS):
        w = torch.randn(rows_w, k, device=DEV, dtype=torch.bfloat16) * k ** -0.5
        weights.append(w if fmt == 'bf16' else quantize(w, fmt))
    nbytes = weight_nbytes(weights[0])
    x = torch.randn(k, device=DEV, dtype=torch.bfloat16)
    g = torch.rand(k, device=DEV, dtype=torch.bfloat16) + 0.5
    ys = torch.zeros(LAYERS, n, device=DEV, dtype=torch.bfloat16)
    hq, hkv = heads or (28, 4)
    cos, sin = torch.rand(2, 64, d // 2, device=DEV)
    pos = torch.tensor([5], device=DEV)
    q = torch.empty(hq * d, device=DEV, dtype=torch.bfloat16)
    caches = torch.empty(LAYERS, hkv, 64, d, device=DEV, dtype=torch.bfloat16)
    rows = []
    for config in configs:
        if kind == 'qkv':
            calls = [lambda i=i: G.qkv_rope(weights[i], None, x, g, cos, sin, pos, q, caches[i],
                                            caches[i], hq, hkv, 1e-5, config=config)
                     for i in range(LAYERS)]
        elif kind == 'gated':
            calls = [lambda i=i: G.gemv(weights[i], x, ys[i], norm_weight=g, gated=True,
                                        eps=1e-5, config=config) for i in range(LAYERS)]
        elif kind == 'head':
            logits = torch.empty(n, device=DEV, dtype=torch.float32)
            calls = [lambda i=i: G.gemv(weights[i], x, logits, norm_weight=g, eps=1e-5,
                                        config=config, kind='head') for i in range(LAYERS)]
        else:
            calls = [lambda i=i: G.gemv(weights[i], x, ys[i], residual=ys[i], config=config)
                     for i in range(LAYERS)]
        us = graph_us(calls)
        rows.append({'kind': kind, 'fmt': fmt, 'N': n, 'K': k, 'config': config, 'us': us,
                     'tb_s': nbytes / us / 1e6})
    return rows


def size_rows():
    """qwen2.5-7b's gate/up (+ RMSNorm, SiLU) with N and 2N rows, each format at N's config:
    the time per call against the bytes, at equal bytes across formats (bf16 at N, int8 at 2N
    read about as many bytes)."""
    table = resolve(None, DEV)  # this GPU's table, as the decoder finds it
    rows = []
    for fmt in ('bf16', 'int8', 'int4'):
        config = table.gemv('gated', 18944, 3584, fmt)
        for n in (18944, 2 * 18944):
            rows += gemv_rows(fmt, 'gated', n, 3584, [config])
            torch.cuda.empty_cache()
    return rows


def _fastest(paths, formats):
    """{(format, kind, N, K): the fastest GEMV row} over kernels_in_graph.json files."""
    best = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)['rows']:
                key = (r.get('fmt'), r['kind'], r.get('N'), r.get('K'))
                if r.get('fmt') in formats and (key not in best or r['us'] < best[key]['us']):
                    best[key] = r
    return best


def fit_rows(paths):
    """Least-squares t = t0 + bytes / rate over the fastest config of each shape, per format."""
    best = _fastest(paths, ('bf16', 'int8', 'int4'))
    for fmt in ('bf16', 'int8', 'int4'):
        rows = [r for (f, *_), r in best.items() if f == fmt]
        if len(rows) < 3:
            continue
        us = torch.tensor([r['us'] for r in rows], dtype=torch.float64)
        mb = torch.tensor([r['tb_s'] * r['us'] for r in rows], dtype=torch.float64)  # MB
        a = torch.stack([torch.ones_like(mb), mb], dim=1)
        t0, per_mb = torch.linalg.lstsq(a, us[:, None]).solution.flatten().tolist()
        worst = (a @ torch.tensor([t0, per_mb], dtype=torch.float64) - us).abs().max().item()
        print(f'{fmt}: {len(rows)} shapes, fixed {t0:.2f} us a call, {1 / per_mb:.2f} TB/s '
              f'streaming, largest residual {worst:.2f} us')


def main():
    sweeps = {'gemv': GEMV, 'staged': STAGED, 'triton_down': TRITON_DOWN,
              'even_down': EVEN_DOWN, 'few_shares_down': FEW_SHARES_DOWN,
              'gated_int8': GATED_INT8, 'staged_qkv': STAGED_QKV}
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('what', nargs='+', choices=['attention', *sweeps, 'sizes', 'fit'])
    ap.add_argument('--out', default='.')
    ap.add_argument('--inputs', nargs='+', metavar='JSON',
                    help='fit: kernels_in_graph.json files')
    args = ap.parse_args()
    if args.what == ['fit']:
        return fit_rows(args.inputs or ap.error('fit needs --inputs'))
    rows = []
    if 'attention' in args.what:
        for (hq, hkv, ctx), configs in ATTENTION.items():
            rows += attention_rows(hq, hkv, ctx, configs)
            torch.cuda.empty_cache()
    for name, sweep in sweeps.items():  # GEMV shapes: (format, kind, N, K) -> configs
        if name in args.what:
            for (fmt, kind, n, k), configs in sweep.items():
                rows += gemv_rows(fmt, kind, n, k, configs)
                torch.cuda.empty_cache()
    if 'sizes' in args.what:
        rows += size_rows()
    print(f"{'kernel':44s} {'config':22s} {'us':>7s} {'TB/s':>6s}")
    for r in rows:
        name = (f"attention {r['heads'][0]}/{r['heads'][1]} ctx {r['ctx']}"
                if r['kind'] == 'attention' else f"{r['kind']} {r['fmt']} {r['N']}x{r['K']}")
        print(f"{name:44s} {str(tuple(r['config'])):22s} {r['us']:7.2f} {r['tb_s']:6.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'kernels_in_graph.json'), 'w') as f:
        json.dump({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
                   'command': ' '.join(['python3', 'benchmarks/experiments/kernels_in_graph.py']
                                       + sys.argv[1:]),
                   'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
