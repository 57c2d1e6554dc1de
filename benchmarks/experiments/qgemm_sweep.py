"""Block sizes of the prefill's quantised GEMM (qgemm.py), and where it beats the buffer path.

For qwen2.5-7b's four layer matrices (random weights of the real shapes, quantised here) and
each prompt length M, times with triton.testing.do_bench (median, L2 flushed between runs, so
the codes come from memory as in a prefill): cuBLAS on the dense bf16 matrix (the bf16
prefill's GEMM), the buffer path (unpack.dense_into + cuBLAS: the quantised prefill before
qgemm) and qgemm under each candidate config, every config's output first checked against
F.linear on the dequantised matrix. Writes one JSON file and prints, per M, the best config per
matrix and the model's total over its 28 layers.

    python benchmarks/experiments/qgemm_sweep.py out.json [int4] [int8] [M ...]
"""
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from decode_monitor.engine.fused import qgemm as Q
from decode_monitor.engine.fused import unpack
from decode_monitor.engine.fused.quant import quantize

LAYERS = 28
SHAPES = (('wqkv', 4608, 3584, True), ('wo', 3584, 3584, False),
          ('wgu', 37888, 3584, False), ('wd', 3584, 18944, False))
MS = (16, 64, 128, 256, 512, 1024, 2048, 8000)
C = Q.QGemmConfig
SMALL = [C(64, 16, 128, 4, 4, s) for s in (1, 2, 4)] + [
    C(64, bm, 128, 4, 4, s) for bm in (32, 64) for s in (1, 4)] + [
    C(128, 64, 128, 8, 3, 2), C(64, 64, 128, 4, 4, 4, 2), C(64, 32, 128, 4, 4, 4, 0)]
LARGE = [C(64, 128, 128, 4, 3, s) for s in (1, 4)] + [
    C(128, 128, 128, 8, 3, s) for s in (1, 2)] + [
    C(128, 128, 128, 8, 4), C(128, 256, 128, 8, 3), C(128, 64, 128, 8, 3),
    C(64, 64, 128, 4, 4), C(128, 128, 128, 8, 3, 1, 2), C(128, 128, 64, 8, 4, 1, 0)]
TABLE = 'table'  # qgemm's own choice (config=None): what the prefill runs


def candidates(m):
    return [TABLE] + (SMALL if m <= 64 else LARGE)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn):
    return do_bench(fn, warmup=5, rep=25, return_mode='median')


def sweep(fmt, configs_for, ms):
    rows = []
    gen = torch.Generator(device='cuda').manual_seed(0)
    for name, n, k, has_bias in SHAPES:
        w = quantize(torch.randn(n, k, device='cuda', generator=gen,
                                 dtype=torch.bfloat16) * 0.02, fmt)
        dense = w.dequantize(torch.bfloat16)
        bias = (torch.randn(n, device='cuda', generator=gen, dtype=torch.bfloat16)
                if has_bias else None)
        buf = unpack.buffer_for([w], torch.bfloat16, 'cuda')
        for m in ms:
            x = torch.randn(m, k, device='cuda', generator=gen, dtype=torch.bfloat16)
            ref = F.linear(x, dense, bias)
            row = {'fmt': fmt, 'matrix': name, 'n': n, 'k': k, 'm': m,
                   'cublas_dense_ms': bench(lambda: F.linear(x, dense, bias)),
                   'buffer_ms': bench(lambda: F.linear(x, unpack.dense_into(w, buf), bias)),
                   'configs': []}
            for cfg in configs_for(m):
                given = None if cfg == TABLE else cfg
                label = cfg if cfg == TABLE else list(cfg)
                try:
                    err = rel(Q.qgemm(x, w, bias, given), ref)
                    t = bench(lambda: Q.qgemm(x, w, bias, given)) if err < 1e-2 else None
                    row['configs'].append({'config': label, 'ms': t, 'rel_err': err})
                except Exception as e:  # out of shared memory, say: recorded, not fatal
                    row['configs'].append({'config': label, 'error': repr(e)[:200]})
            ok = [c for c in row['configs'] if c.get('ms')]
            row['best'] = min(ok, key=lambda c: c['ms']) if ok else None
            table = next((c for c in ok if c['config'] == TABLE), None)
            row['table_ms'] = table['ms'] if table else None
            rows.append(row)
            b = row['best']
            print(f"{fmt} {name:5s} M={m:5d} dense {row['cublas_dense_ms']:.4f} buffer "
                  f"{row['buffer_ms']:.4f} qgemm table {row['table_ms'] or float('nan'):.4f} "
                  f"best {b['ms'] if b else float('nan'):.4f} {b['config'] if b else None}",
                  flush=True)
    return rows


def totals(rows, fmt):
    """Per M: the model's 28 layers, with the best config per matrix and with one config for
    all four (the best such: what a table keyed by M alone gives)."""
    out = []
    for m in sorted({r['m'] for r in rows}):
        at = [r for r in rows if r['m'] == m and r['fmt'] == fmt]
        common = None
        for cfg in {str(c['config']) for r in at for c in r['configs'] if c.get('ms')}:
            ts = [next((c['ms'] for c in r['configs'] if str(c['config']) == cfg
                        and c.get('ms')), None) for r in at]
            if None not in ts and (common is None or sum(ts) < common[1]):
                common = (cfg, sum(ts))
        out.append({'fmt': fmt, 'm': m, 'dense_ms': LAYERS * sum(r['cublas_dense_ms'] for r in at),
                    'buffer_ms': LAYERS * sum(r['buffer_ms'] for r in at),
                    'qgemm_best_each_ms': LAYERS * sum(r['best']['ms'] for r in at
                                                       if r['best']),
                    'qgemm_table_ms': LAYERS * sum(r['table_ms'] or float('nan') for r in at),
                    'qgemm_one_config': common[0] if common else None,
                    'qgemm_one_config_ms': LAYERS * common[1] if common else None})
    return out


def main(path, formats=('int4',), ms=MS):
    props = torch.cuda.get_device_properties(0)
    result = {'gpu': props.name, 'torch': torch.__version__, 'rows': [], 'totals': []}
    for fmt in formats:
        if fmt == 'int4':
            rows = sweep(fmt, candidates, ms)
        else:  # int8: the lane layouts do not apply; the gather configs alone
            rows = sweep(fmt, lambda m: [c for c in candidates(m)
                                         if c != TABLE and c.lanes == 0], ms)
        result['rows'] += rows
        result['totals'] += totals(rows, fmt)
        with open(path, 'w') as f:
            json.dump(result, f, indent=1)
    print('| fmt | M | cuBLAS dense x28 ms | buffer x28 ms | qgemm table x28 ms '
          '| qgemm best-each x28 ms | one config | its x28 ms |')
    for t in result['totals']:
        print(f"| {t['fmt']} | {t['m']} | {t['dense_ms']:.2f} | {t['buffer_ms']:.2f} | "
              f"{t['qgemm_table_ms']:.2f} | {t['qgemm_best_each_ms']:.2f} | "
              f"{t['qgemm_one_config']} | "
              f"{t['qgemm_one_config_ms'] or float('nan'):.2f} |")


if __name__ == '__main__':
    args = sys.argv[2:]
    main(sys.argv[1], tuple(a for a in args if not a.isdigit()) or ('int4',),
         tuple(int(a) for a in args if a.isdigit()) or MS)
