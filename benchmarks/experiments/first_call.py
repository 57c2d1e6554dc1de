"""What the first prefill at a new prompt length pays, and why (qwen2.5-7b preset, one GPU).

In a fresh process: build the decoder as the bench does (graph mode, so its start-up warming
runs), then time generate() to the first token twice at each length (first, then again), in
the order given. With --probe, also split a never-run length M into its parts, each timed on
its first and second call (host clock around a synchronised call): the activations'
allocation, the four layer GEMMs, SDPA's causal attention and the element-wise kernels; then
profile the first and second prefill at one more new length (CUDA runtime calls by total host
time); then sweep the four layer GEMMs over M = 16, 32, .. max and list each M whose first call
took more than 1 ms over its second (a kernel loaded, or a cuBLAS choice set up, on first use).

    python benchmarks/experiments/first_call.py --backend fused --weights bf16 --probe \
        --out first_call.json
"""
import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from decode_monitor.bench.ttft import first_token_ms
from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sources import load_model
from decode_monitor.engine.sampling import SamplingParams


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def twice(fn):
    return [round(timed(fn), 3), round(timed(fn), 3)]


def device_allocs():
    return torch.cuda.memory_stats().get('num_device_alloc') if torch.cuda.is_available() else 0


def reserved():
    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


def lengths_pass(decoder, vocab, lengths, rng):
    rows = []
    for n in lengths:
        ids = [rng.randrange(vocab) for _ in range(n)]
        allocs, before = device_allocs(), reserved()
        first = first_token_ms(decoder, ids)
        grown = reserved() - before
        new_allocs = None if allocs is None else device_allocs() - allocs
        later = [first_token_ms(decoder, ids) for _ in range(2)]
        rows.append(dict(prompt_tokens=n, first_ms=round(first, 3),
                         later_ms=[round(t, 3) for t in later], reserved_growth=grown,
                         device_allocs=new_allocs))
        print(f'  {n:5d} tokens: first {first:8.2f} ms, later {later[0]:8.2f} {later[1]:8.2f}'
              f' ms; reserved +{grown / 2**20:.0f} MiB in {new_allocs} device allocations',
              flush=True)
    return rows


def parts(backend, m):
    """First and second call of each part of a prefill at M = m tokens (fused backend)."""
    layer, dtype, dev = backend.layers[0], backend.dtype, backend.device
    hidden = backend.embed.shape[1]
    qd, kd = backend.q_heads * backend.head_dim, backend.kv_heads * backend.head_dim
    inter = layer.wd.shape[1]
    out = {}

    def alloc():
        return [torch.empty((m, n), dtype=dtype, device=dev)
                for n in (hidden, hidden, qd + 2 * kd, qd, kd, qd, hidden, 2 * inter, inter)]
    out['allocate activations'] = twice(alloc)
    x = torch.randn(m, hidden, dtype=dtype, device=dev)
    a = torch.randn(m, qd, dtype=dtype, device=dev)
    g = torch.randn(m, inter, dtype=dtype, device=dev)
    out['gemm qkv'] = twice(lambda: F.linear(x, layer.wqkv, layer.bqkv))
    out['gemm o'] = twice(lambda: F.linear(a, layer.wo))
    out['gemm gate_up'] = twice(lambda: F.linear(x, layer.wgu))
    out['gemm down'] = twice(lambda: F.linear(g, layer.wd))
    q = torch.randn(1, backend.q_heads, m, backend.head_dim, dtype=dtype, device=dev)
    k = torch.randn(1, backend.kv_heads, m, backend.head_dim, dtype=dtype, device=dev)
    out['sdpa causal'] = twice(lambda: F.scaled_dot_product_attention(
        q, k, k, is_causal=True, scale=backend.scale, enable_gqa=True))
    ops = backend._prefill_ops
    if ops is not None:
        qkv = torch.randn(m, qd + 2 * kd, dtype=dtype, device=dev)
        gu = torch.randn(m, 2 * inter, dtype=dtype, device=dev)
        cos, sin = backend.cos[:m], backend.sin[:m]
        out['rms_norm'] = twice(lambda: ops.rms_norm(x, layer.ln1, backend.eps))
        out['rope'] = twice(lambda: ops.apply_rope(qkv[:, :qd], cos, sin, backend.q_heads))
        out['silu_mul'] = twice(lambda: ops.silu_mul(gu))
    for name, (first, second) in out.items():
        print(f'  M={m} {name:22s} first {first:8.2f} ms, second {second:8.2f} ms', flush=True)
    return out


def profiled(decoder, ids):
    """CUDA runtime / driver calls of one generate() to the first token, by host time."""
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first_token_ms(decoder, ids)
    rows = []
    for e in prof.key_averages():
        if e.key.startswith(('cuda', 'cu', 'cublas')) and not e.key.startswith('cudnn'):
            rows.append((e.key, round(e.cpu_time_total / 1e3, 3), e.count))
    rows.sort(key=lambda r: -r[1])
    return rows[:12]


def sweep(backend, top):
    layer, dtype, dev = backend.layers[0], backend.dtype, backend.device
    hidden, inter = backend.embed.shape[1], layer.wd.shape[1]
    qd = backend.q_heads * backend.head_dim
    x = torch.randn(top, hidden, dtype=dtype, device=dev)
    a = torch.randn(top, qd, dtype=dtype, device=dev)
    g = torch.randn(top, inter, dtype=dtype, device=dev)
    shapes = {'qkv': (x, layer.wqkv), 'o': (a, layer.wo), 'gate_up': (x, layer.wgu),
              'down': (g, layer.wd)}
    slow = []
    for m in range(16, top + 1, 16):
        for name, (inp, w) in shapes.items():
            first, second = twice(lambda: F.linear(inp[:m], w))
            if first - second > 1.0:
                slow.append((name, m, round(first, 3), round(second, 3)))
    print(f'  GEMM sweep M=16..{top} step 16: {len(slow)} first calls over 1 ms slower: {slow}',
          flush=True)
    return slow


def after_prefix(decoder, vocab, cached, new, rng):
    ids = [rng.randrange(vocab) for _ in range(cached + new)]
    first = first_token_ms(decoder, ids, ids[:cached])
    later = [first_token_ms(decoder, ids, ids[:cached]) for _ in range(2)]
    print(f'  {cached} cached + {new} new: first {first:8.2f} ms, later {later[0]:8.2f} '
          f'{later[1]:8.2f} ms', flush=True)
    return dict(cached_tokens=cached, new_tokens=new, first_ms=round(first, 3),
                later_ms=[round(t, 3) for t in later])


def sdpa_probe(backend, fresh_lengths, steady_lengths):
    """SDPA as the prefill calls it (q from (T, Hq, D), keys a slice of the cache), each
    backend forced: first and second call at a length new to it, and the median of 5 calls
    (ms) at the steady lengths. 'default' is SDPA's own choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    choices = {'cudnn': [SDPBackend.CUDNN_ATTENTION], 'flash': [SDPBackend.FLASH_ATTENTION],
               'efficient': [SDPBackend.EFFICIENT_ATTENTION], 'default': None}
    dtype, dev = backend.dtype, backend.device
    out = {}
    for (name, chosen), fresh in zip(choices.items(), fresh_lengths):
        def call(t):
            q = torch.randn(t, backend.q_heads, backend.head_dim, dtype=dtype, device=dev)
            ctx = sdpa_kernel(chosen) if chosen else torch.no_grad()
            with ctx:
                return timed(lambda: F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], backend.k_cache[0, None, :, :t],
                    backend.v_cache[0, None, :, :t], is_causal=True, scale=backend.scale,
                    enable_gqa=True))
        try:
            row = {'first_ms': round(call(fresh), 3), 'second_ms': round(call(fresh), 3)}
            for t in steady_lengths:
                call(t)
                times = sorted(call(t) for _ in range(5))
                row[f'median_ms_{t}'] = round(times[2], 3)
        except RuntimeError as exc:
            row = {'error': str(exc).splitlines()[0][:200]}
        out[name] = row
        print(f'  sdpa {name:9s} at new length {fresh}: {row}', flush=True)
    return out


def pad_check(decoder, vocab, n, rng, count=8):
    """Greedy tokens and first logits at n tokens with the rows padded and not."""
    ids = [rng.randrange(vocab) for _ in range(n)]
    got = {}
    for pad in (True, False):
        decoder.backend.pad_rows = pad
        decoder.clear_prompt_cache()
        with torch.no_grad():
            logits = decoder.backend.prefill(torch.tensor([ids], device=decoder.device), 0).clone()
        decoder.clear_prompt_cache()
        got[pad] = (logits, [s.token for s in decoder.generate(ids, max_new_tokens=count)])
    decoder.backend.pad_rows = True
    (a, ta), (b, tb) = got[True], got[False]
    rel = ((a - b).norm() / b.norm()).item()
    print(f'  pad check at {n}: tokens equal {ta == tb}, first logits rel diff {rel:.2e}',
          flush=True)
    return dict(prompt_tokens=n, tokens_equal=ta == tb, padded_tokens=ta, unpadded_tokens=tb,
                logits_rel_diff=rel)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='qwen2.5-7b')
    parser.add_argument('--backend', default='fused')
    parser.add_argument('--weights', default='bf16')
    parser.add_argument('--max-context', type=int, default=8256)
    parser.add_argument('--lengths', type=int, nargs='+',
                        default=[256, 600, 2000, 2048, 3000, 5000, 8000])
    parser.add_argument('--between', type=int, nargs='*', default=[2500, 4500, 7000],
                        help='lengths between those already run, run after them')
    parser.add_argument('--probe', action='store_true')
    parser.add_argument('--probe-lengths', type=int, nargs=2, default=[6000, 3500],
                        help='new lengths: split into parts; profiled')
    parser.add_argument('--device', default='cuda', help='cpu: a dry run of the script')
    parser.add_argument('--after-prefix', type=int, nargs=2, metavar=('CACHED', 'NEW'))
    parser.add_argument('--sdpa-probe', action='store_true')
    parser.add_argument('--pad-check', type=int, metavar='TOKENS')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=torch.bfloat16)
    sync()
    built = time.perf_counter()
    decoder = Decoder(loaded, mode='graph', backend=args.backend, max_context=args.max_context,
                      weights=args.weights)
    sync()
    ready = time.perf_counter()
    result = dict(model=args.model, backend=args.backend, weights=args.weights,
                  max_context=args.max_context, mode=decoder.mode,
                  prefill_fallback=decoder.prefill_fallback_reason,
                  module_loading=os.environ.get('CUDA_MODULE_LOADING', '(default: lazy)'),
                  model_build_s=round(built - t0, 2), decoder_build_s=round(ready - built, 2),
                  warm_s=getattr(decoder, 'warm_s', None),
                  device=torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu',
                  torch=torch.__version__)
    print(f'{args.backend} {args.weights} module loading {result["module_loading"]}: model '
          f'{result["model_build_s"]} s, decoder {result["decoder_build_s"]} s (warming '
          f'{result["warm_s"]} s)', flush=True)
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    ids = [rng.randrange(vocab) for _ in range(128)]

    def sampled():
        steps = decoder.generate(ids, SamplingParams(temperature=0.8, top_p=0.9),
                                 max_new_tokens=2)
        next(steps)
        steps.close()
    result['sampled_128_ms'] = twice(sampled)
    print(f'  128 tokens sampled: first/second {result["sampled_128_ms"]} ms', flush=True)
    result['lengths'] = lengths_pass(decoder, vocab, args.lengths, rng)
    result['between'] = lengths_pass(decoder, vocab, args.between, rng)
    if args.after_prefix:
        result['after_prefix'] = after_prefix(decoder, vocab, *args.after_prefix, rng)
    if args.sdpa_probe:
        result['sdpa'] = sdpa_probe(decoder.backend, [4321, 4322, 4323, 4324], [2048, 8000])
    if args.pad_check:
        result['pad_check'] = pad_check(decoder, vocab, args.pad_check, rng)
    if args.probe and args.backend == 'fused':
        m = args.probe_lengths[0]
        result['parts'] = dict(m=m, parts=parts(decoder.backend, m))
        result['after_parts'] = lengths_pass(decoder, vocab, [m, m + 1], rng)
        profiled(decoder, [rng.randrange(vocab) for _ in range(args.lengths[-1])])  # warms it
        new = [rng.randrange(vocab) for _ in range(args.probe_lengths[1])]
        result['profile_first'] = profiled(decoder, new)
        result['profile_second'] = profiled(decoder, new)
        for key in ('profile_first', 'profile_second'):
            print(f'  {key}: {result[key]}', flush=True)
        result['gemm_sweep_slow'] = sweep(decoder.backend, args.max_context - 64)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
