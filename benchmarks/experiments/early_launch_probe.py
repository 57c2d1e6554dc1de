"""o_proj's weights streamed while attention runs: a graphed step with and without it.

Attention (split kernel + merge) reads a few MB a layer and leaves most SMs idle; o_proj then
streams its matrix only after the merge. Launched with PDL, o_proj's programs can become
resident as soon as the merge kernel allows it; a quantised GEMV requests its first chunk of
codes before its PDL wait, so an o_proj config whose programs hold all of their share in one
chunk would have its weights in registers by the time attention ends. Variants, each a graph of
the model's real step (bench tune's Timer), timed in alternating rounds:

- `shipped`: the table as shipped (attention and merge wait, then allow the next launch);
- `early`: attention and merge allow the next launch before their wait;
- `early <config>`: early, and o_proj at `config`.

Each variant's logits are compared with `shipped`'s (early alone must be bit for bit).
The early launch was a constexpr `EARLY` of the two attention kernels, set from
`DecodeAttention.early`; it lost (benchmarks/NOTES.md, row 55) and was removed: run this at
commit 4808543, which has it.

    python benchmarks/experiments/early_launch_probe.py --models qwen2.5-7b \
        --weights int8 int4 --out early.json
"""
import argparse
import json

import torch

from decode_monitor.bench.tune import Timer
from decode_monitor.bench.tune_check import agrees
from decode_monitor.engine.fused import tables
from decode_monitor.engine.fused.configs import GemvConfig as G
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.sources import load_model

# o_proj configs whose programs hold their whole share of K in one chunk (K = 3584 or 4096)
O_PROJ = {
    'int8': [G(16, 512, 4, 1, 7), G(8, 512, 4, 1, 7), G(32, 512, 8, 1, 7), G(16, 1024, 4, 1, 4),
             G(8, 1024, 4, 1, 4), G(8, 4096, 4, 1, 1), G(16, 4096, 8, 1, 1),
             G(16, 2048, 8, 1, 2), G(16, 512, 4, 1, 7, None, True),
             G(32, 512, 8, 1, 7, None, True)],
    'int4': [G(64, 512, 4, 1, 7), G(32, 512, 4, 1, 7), G(32, 1024, 4, 1, 4),
             G(16, 4096, 4, 1, 1), G(32, 4096, 8, 1, 1), G(32, 2048, 8, 1, 2),
             G(32, 512, 8, 1, 7, None, True), G(64, 512, 8, 1, 7, None, True)],
    'bf16': [],
}


def variants(backend, table, fmt):
    key = backend.gemv_keys()['wo']
    out = [('shipped', False, table), ('early', True, table)]
    out += [(f'early {tuple(c)}', True, table.with_gemv(key, c)) for c in O_PROJ[fmt]]
    out += [(f'late {tuple(c)}', False, table.with_gemv(key, c)) for c in O_PROJ[fmt][:2]]
    return out


def probe(backend, table, fmt, rounds):
    timer = Timer(backend, torch)
    runs, names, checks = [], [], {}
    reference = None
    for name, early, configs in variants(backend, table, fmt):
        backend.set_kernel_configs(configs)
        backend.attention.early = early
        try:
            run = timer.prepare()
        except Exception as exc:  # a config this GPU cannot run
            print(f'  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}')
            continue
        run()
        torch.cuda.synchronize()
        logits = backend.logits.clone()
        if reference is None:
            reference = logits
        same = bool(torch.equal(logits, reference))
        ok, err = agrees(logits, reference)
        checks[name] = {'bit_equal': same, 'agrees': ok, 'rel_err': err}
        runs.append(run)
        names.append(name)
    times = timer.median_ms(runs, rounds)
    return [{'variant': n, 'ms': round(t, 5), **checks[n]} for n, t in zip(names, times)]


def backends(models, weights, context, table):
    """(model name, weight format, the fused backend on `table` with a random cache) for each
    model and format; each freed before the next is built."""
    for model in models:
        loaded = load_model(model, device='cuda', dtype=torch.bfloat16)
        for fmt in weights:
            backend = FusedBackend(loaded.model, context, use_triton=True, weights=fmt,
                                   kernel_configs=table)
            backend.randomize_cache()
            yield loaded.name, fmt, backend
            del backend
            loaded.model.__dict__.get('_fused_quantised', {}).pop(fmt, None)
            torch.cuda.empty_cache()
        del loaded
        torch.cuda.empty_cache()


def labelled(rows, name, fmt):
    """rows with their model, format and time against the first row's (the shipped step)."""
    base = rows[0]['ms']
    for r in rows:
        r.update(model=name, weights=fmt, vs_shipped=round(r['ms'] / base, 4))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['qwen2.5-7b'])
    p.add_argument('--weights', nargs='+', default=['int8', 'int4'])
    p.add_argument('--context', type=int, default=2048)
    p.add_argument('--rounds', type=int, default=8)
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    table = tables.resolve(None, 'cuda')
    result = {'table': table.source, 'gpu': torch.cuda.get_device_name(), 'rows': []}
    for name, fmt, backend in backends(args.models, args.weights, args.context, table):
        for r in labelled(probe(backend, table, fmt, args.rounds), name, fmt):
            print(f"{name:12s} {fmt:5s} {r['variant']:40s} {r['ms']:.4f} ms "
                  f"{r['vs_shipped']:.4f} bit_equal={r['bit_equal']} "
                  f"err={r['rel_err']:.1e}", flush=True)
            result['rows'].append(r)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
