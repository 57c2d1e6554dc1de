"""Where a long prefill's time goes: device time per kernel, grouped (qwen2.5-7b preset, one GPU).

In one process, for each weight format: build the decoder as the bench does (fused, graph), time
generate() to the first token at each length (median of 5 after a warm-up), then profile one
more call at each length and sum the device time of its kernels by group (GEMM, dequantise,
qgemm, attention, norms, RoPE, SiLU, copies, other). Prints a table and writes JSON.

    python benchmarks/experiments/prefill_anatomy.py --weights bf16 int4 --lengths 2048 \
        --out anatomy.json
"""
import argparse
import json
import random
import statistics
import time

import torch

from decode_monitor.bench.ttft import first_token_ms
from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sources import load_model

GROUPS = (('dequantise', ('_unpack',)), ('qgemm', ('_qgemm',)),
          ('attention', ('flash', 'fmha', 'attention', 'sdpa', 'cudnn')),
          ('rms_norm', ('_rms_norm',)), ('rope', ('_rope',)), ('silu_mul', ('_silu_mul',)),
          ('gemm', ('gemm', 'sm90_xmma', 'cutlass', 'nvjet', 'ampere', 'sm80')),
          ('copy', ('copy', 'memcpy', 'memset', 'fill', 'index', 'cat')))


def group_of(name):
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return 'other'


def gaps(prof, wall_ms):
    """The kernels' span and the idle time between them (device clock), the longest gaps with
    the kernels either side."""
    from torch.autograd import DeviceType
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    busy = sum(end - start for start, end, _ in ks) / 1e3
    span = (ks[-1][1] - ks[0][0]) / 1e3
    holes = sorted(((b[0] - a[1]) / 1e3, a[2][:40], b[2][:40]) for a, b in zip(ks, ks[1:]))
    attn = [i for i, k in enumerate(ks) if group_of(k[2]) == 'attention']
    cut = attn[1] if len(attn) > 1 else len(ks)  # layer 0 ends before layer 1's attention
    first = sum(max(0, b[0] - a[1]) for a, b in zip(ks[:cut], ks[1:cut])) / 1e3
    return dict(wall_ms=round(wall_ms, 3), span_ms=round(span, 3), busy_ms=round(busy, 3),
                kernels=len(ks), idle_ms=round(span - busy, 3),
                idle_to_layer1_attention_ms=round(first, 3),
                longest_gaps=[(round(t, 3), x, y) for t, x, y in holes[::-1][:8]])


def timeline(prof, count=70):
    """The first `count` top-level host ops and kernels of a profile, in order, with their start
    (us from the first host op) and duration: where the host keeps the GPU waiting."""
    from torch.autograd import DeviceType
    events = list(prof.events())
    host = sorted((e.time_range.start, e.time_range.elapsed_us(), 'host', e.name) for e in events
                  if e.device_type == DeviceType.CPU and e.cpu_parent is None)
    kern = sorted((e.time_range.start, e.time_range.elapsed_us(), 'gpu', e.name) for e in events
                  if e.device_type == DeviceType.CUDA)
    t0 = host[0][0] if host else 0
    rows = sorted(host[:count] + kern[:count])[:2 * count]
    return [(round(t - t0, 1), round(d, 1), who, name[:60]) for t, d, who, name in rows]


def profile(decoder, ids, show_timeline=False):
    from torch.profiler import profile as prof_ctx, ProfilerActivity
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = first_token_ms(decoder, ids)
    groups, kernels = {}, {}
    for e in prof.key_averages():
        t = e.self_device_time_total / 1e3
        if t <= 0:
            continue
        g = group_of(e.key)
        groups[g] = groups.get(g, 0.0) + t
        kernels[e.key[:90]] = (round(t, 3), e.count)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    if show_timeline:
        for row in timeline(prof):
            print('    timeline', *row, flush=True)
    return ({k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}, top,
            gaps(prof, wall))


def sdpa_times(lengths, heads=28, kv_heads=4, dim=128):
    """Causal GQA SDPA at each length, flash and cuDNN forced: the first call (a plan, for
    cuDNN) and the median of 20 (CUDA events), ms."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    out = {}
    for t in lengths:
        q = torch.randn(1, heads, t, dim, dtype=torch.bfloat16, device='cuda')
        k = torch.randn(1, kv_heads, t, dim, dtype=torch.bfloat16, device='cuda')
        for name, chosen in (('flash', SDPBackend.FLASH_ATTENTION),
                             ('cudnn', SDPBackend.CUDNN_ATTENTION)):
            def call():
                with sdpa_kernel([chosen]):
                    return F.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                          enable_gqa=True)
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                call()
                torch.cuda.synchronize()
                first = (time.perf_counter() - t0) * 1e3
                times = []
                for _ in range(20):
                    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
                    a.record()
                    call()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                out[f'{name} {t}'] = dict(first_ms=round(first, 3),
                                          median_ms=round(statistics.median(times), 4))
            except RuntimeError as exc:
                out[f'{name} {t}'] = dict(error=str(exc).splitlines()[0][:160])
            print(f'  sdpa {name} {t}: {out[f"{name} {t}"]}', flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='qwen2.5-7b')
    parser.add_argument('--weights', nargs='+', default=['bf16', 'int4'])
    parser.add_argument('--lengths', type=int, nargs='+', default=[2048])
    parser.add_argument('--max-context', type=int, default=4096)
    parser.add_argument('--sdpa', type=int, nargs='*', default=[],
                        help='also time causal SDPA, flash and cuDNN, at these lengths')
    parser.add_argument('--timeline', action='store_true',
                        help='print the first host ops and kernels of each profile in order')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, device='cuda', dtype=torch.bfloat16)
    vocab = loaded.config.vocab_size
    rng = random.Random(0)
    rows = []
    sdpa = sdpa_times(args.sdpa)
    for weights in args.weights:
        decoder = Decoder(loaded, mode='graph', backend='fused', max_context=args.max_context,
                          weights=weights)
        for n in args.lengths:
            ids = [rng.randrange(vocab) for _ in range(n)]
            first_token_ms(decoder, ids)
            times = [first_token_ms(decoder, ids) for _ in range(5)]
            groups, top, holes = profile(decoder, ids, args.timeline)
            row = dict(weights=weights, prompt_tokens=n, ttft_ms=round(statistics.median(times),
                       3), times=[round(t, 3) for t in times], device_ms=groups,
                       device_total_ms=round(sum(groups.values()), 3), top_kernels=top,
                       gaps=holes)
            rows.append(row)
            print(f'{weights} {n}: ttft {row["ttft_ms"]} ms, device {row["device_total_ms"]} '
                  f'ms: {groups}', flush=True)
            print(f'    gaps: {holes}', flush=True)
            for name, (t, count) in top:
                print(f'    {t:9.3f} ms {count:5d}x {name}', flush=True)
        del decoder
        torch.cuda.empty_cache()
    with open(args.out, 'w') as f:
        json.dump(dict(model=args.model, device=torch.cuda.get_device_name(),
                       torch=torch.__version__, sdpa=sdpa, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
