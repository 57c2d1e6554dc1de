"""o_proj's weights requested into L2 while attention runs: a graphed step with and without it.

Attention (split kernel + merge, ~8 us a layer at ctx 2048) reads a few MB, so HBM idles while it
runs, and o_proj then starts its stream cold. Row 45 requested down_proj's bytes into L2 while
gate/up ran, and lost: gate/up's own stream evicted them. During attention nothing else streams.
Here a small kernel between q/k/v and attention requests the layer's o_proj codes and scales
(and optionally the first MB of gate/up's) with `cp.async.bulk.prefetch.L2` (l2_prefetch_probe's
kernel: it lets attention launch at once and waits for q/k/v before it ends, so the chain of
PDL waits stays intact). Variants, each a graph of the model's real step (bench tune's Timer),
timed in alternating rounds; every variant's logits must equal the shipped step's bit for bit.

    python benchmarks/experiments/attention_l2_probe.py --weights bf16 int8 int4 --out l2.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, os.path.dirname(__file__))
from decode_monitor.bench.tune import Timer  # noqa: E402
from decode_monitor.engine.fused import pdl, tables  # noqa: E402
from decode_monitor.engine.fused.quant import QuantWeight  # noqa: E402
from early_launch_probe import backends, labelled  # noqa: E402
from l2_prefetch_probe import SLICE, prefetch_kernel  # noqa: E402

MB = 1 << 20


def regions(w, fraction=1.0):
    """Byte views of the first `fraction` of a weight's rows: codes, scales, offsets."""
    ts = [w.q, w.scale] + ([w.offset] if w.offset is not None else []) \
        if isinstance(w, QuantWeight) else [w]
    out = []
    for t in ts:
        flat = t.reshape(-1).view(torch.uint8)
        out.append(flat[:int(flat.numel() * fraction) & -16])
    return out + [out[0][:0]] * (3 - len(out))


class Prefetching:
    """The backend's attention, preceded by a prefetch of the layer's next weights."""

    def __init__(self, inner, layers, wo, gu_mb, evict_last, grid):
        self.inner, self.layers, self.calls = inner, layers, 0
        self.wo, self.gu_mb, self.evict_last, self.grid = wo, gu_mb, evict_last, grid

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _request(self, r):
        prefetch_kernel[(self.grid,)](r[0], r[0].numel(), r[1], r[1].numel(), r[2],
                                      r[2].numel(), SLICE=SLICE, EVICT_LAST=self.evict_last,
                                      num_warps=1, **pdl.launch_args(r[0].device))

    def __call__(self, *args):
        layer = self.layers[self.calls % len(self.layers)]
        self.calls += 1
        if self.wo:
            self._request(regions(layer.wo))
        if self.gu_mb:
            gu = layer.wgu
            total = sum(t.numel() for t in regions(gu))
            self._request(regions(gu, min(1.0, self.gu_mb * MB / total)))
        return self.inner(*args)


VARIANTS = {  # name -> (o_proj, MB of gate/up, evict_last)
    'shipped': None,
    'o_proj': (True, 0, False),
    'o_proj evict_last': (True, 0, True),
    'o_proj + 8 MB gate/up': (True, 8, False),
    'o_proj + 16 MB gate/up': (True, 16, False),
    '16 MB gate/up': (False, 16, False),
}


def probe(backend, rounds, grid):
    timer = Timer(backend, torch)
    plain = backend.attention
    runs, names, checks, reference = [], [], {}, None
    for name, plan in VARIANTS.items():
        backend.attention = plain if plan is None else Prefetching(plain, backend.layers, *plan,
                                                                   grid=grid)
        run = timer.prepare()
        run()
        torch.cuda.synchronize()
        logits = backend.logits.clone()
        reference = logits if reference is None else reference
        checks[name] = bool(torch.equal(logits, reference))
        runs.append(run)
        names.append(name)
    backend.attention = plain
    times = timer.median_ms(runs, rounds)
    return [{'variant': n, 'ms': round(t, 5), 'bit_equal': checks[n]}
            for n, t in zip(names, times)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['qwen2.5-7b'])
    p.add_argument('--weights', nargs='+', default=['bf16', 'int8', 'int4'])
    p.add_argument('--context', type=int, default=2048)
    p.add_argument('--rounds', type=int, default=8)
    p.add_argument('--grid', type=int, default=132, help='programs of the prefetch kernel')
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    table = tables.resolve(None, 'cuda')
    result = {'table': table.source, 'gpu': torch.cuda.get_device_name(), 'rows': []}
    for name, fmt, backend in backends(args.models, args.weights, args.context, table):
        for r in labelled(probe(backend, args.rounds, args.grid), name, fmt):
            print(f"{name:12s} {fmt:5s} {r['variant']:26s} {r['ms']:.4f} ms "
                  f"{r['vs_shipped']:.4f} bit_equal={r['bit_equal']}", flush=True)
            result['rows'].append(r)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
