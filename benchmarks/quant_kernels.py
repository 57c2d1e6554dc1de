"""Kernel benchmark for quantised weights: the int8 / int4 fused GEMVs on every study shape.

For each weight shape of the study's models and each format, every candidate launch config is
timed (`triton.testing.do_bench`, L2 flushed before each run, median) and checked against
F.linear on the dequantised matrix; beside them, the bf16 fused GEMV with its tuned config,
cuBLAS bf16 and, for int4, torch's tinygemm kernel (`_weight_int4pack_mm`, group 128) where
this torch has it. Writes `<out>/quant_kernels.json` and the fastest config per shape to
`<out>/quant_configs.json` (rows for `configs.add_rows`, or DECODE_MONITOR_FUSED_CONFIGS).

    python benchmarks/quant_kernels.py --out results/
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from fused_kernels import MODELS, qkv_runner, rel, shapes  # noqa: E402

from decode_monitor.engine.fused import configs  # noqa: E402
from decode_monitor.engine.fused import gemv as G  # noqa: E402
from decode_monitor.engine.fused.quant import quantize  # noqa: E402

# (BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K]): the winners of earlier sweeps and their
# neighbours, then split-K variants (more programs for matrices with few row blocks).
CANDIDATES = {
    'int8': [(4, 512, 4, 1), (4, 1024, 4, 3), (8, 512, 4, 3), (16, 512, 8, 1), (8, 1024, 8, 1),
             (16, 256, 4, 3),
             (4, 512, 4, 1, 2), (4, 1024, 4, 3, 2), (8, 512, 4, 3, 2), (8, 512, 4, 3, 4),
             (16, 512, 4, 3, 7), (16, 256, 4, 3, 7)],
    'int4': [(8, 1024, 4, 3), (16, 512, 4, 3), (16, 1024, 4, 3), (32, 256, 4, 3),
             (32, 512, 4, 3), (64, 256, 4, 3), (64, 256, 8, 3), (32, 1024, 4, 3),
             (8, 2048, 4, 3),
             (16, 512, 4, 3, 7), (16, 256, 4, 3, 7), (32, 256, 4, 3, 7), (64, 256, 4, 3, 2),
             (64, 256, 4, 3, 4), (32, 256, 4, 3, 2), (32, 512, 4, 3, 4), (8, 2048, 4, 3, 2),
             (16, 1024, 4, 3, 4), (64, 256, 4, 3, 7)],
}


def _runner(kind, w, x, g, y, heads, dev, cfg):
    if kind == 'qkv':
        return qkv_runner(w, x, g, heads, dev, cfg)
    if kind == 'gemv':  # o_proj / down_proj, residual added in place
        return lambda: G.gemv(w, x, y, residual=y, config=cfg)
    return lambda: G.gemv(w, x, y, norm_weight=g, gated=kind == 'gated', eps=1e-5, config=cfg,
                          kind=kind)


def _tinygemm_ms(w, x):
    """torch's int4 tinygemm at M=1 (group 128), or None where this torch lacks it."""
    try:
        n, k = w.shape
        qw = quantize(w, 'int4')
        # tinygemm takes [N, K / 2] bytes, element 2j in the high nibble, 2j + 1 in the low
        codes = qw.codes().view(n, k // 2, 2)
        packed = torch.ops.aten._convert_weight_to_int4pack(codes[..., 0] << 4 | codes[..., 1], 8)
        # tinygemm dequantises (q - 8) * s + z: shift the offset by 8 steps
        zeros = qw.offset.float() + 8 * qw.scale.float()
        sz = torch.stack((qw.scale.float(), zeros), -1).transpose(0, 1).contiguous()
        sz = sz.to(torch.bfloat16)
        xb = x[None]
        got = torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz)
        err = rel(got[0], F.linear(x.float(), qw.dequantize(torch.float32)))
        return do_bench(lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz),
                        return_mode='median'), err
    except Exception as exc:  # not in this build, or a different signature
        return None, f'{type(exc).__name__}: {exc}'[:200]


def bench_shape(kind, n, k, heads, dev, formats):
    rows = 2 * n if kind == 'gated' else n
    w = torch.randn(rows, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
    x = torch.randn(k, device=dev, dtype=torch.bfloat16)
    g = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
    out_dtype = torch.float32 if kind == 'head' else torch.bfloat16
    y = torch.zeros(n, device=dev, dtype=out_dtype)
    result = {'kind': kind, 'N': n, 'K': k, 'bf16_bytes': rows * k * 2}
    result['cublas_ms'] = do_bench(lambda: F.linear(x, w), return_mode='median')
    result['bf16_fused_ms'] = do_bench(_runner(kind, w, x, g, y, heads, dev, None),
                                       return_mode='median')
    for fmt in formats:
        qw = quantize(w, fmt)
        deq = qw.dequantize(torch.float32)
        xn = x.float() * torch.rsqrt(x.float().pow(2).mean() + 1e-5) * g.float()
        if kind == 'gated':
            gate, up = F.linear(xn, deq).chunk(2)
            ref = F.silu(gate) * up
        elif kind == 'gemv':
            ref = F.linear(x.float(), deq)
        else:
            ref = F.linear(xn, deq) if kind == 'head' else None
        entry = {'bytes': qw.nbytes, 'configs': []}
        for cfg in CANDIDATES[fmt]:
            try:  # a candidate may not compile or fit; skip it and say why
                fn = _runner(kind, qw, x, g, y, heads, dev, cfg)
                y.zero_()
                fn()
                err = rel(y, ref) if ref is not None else None
                ms = do_bench(fn, return_mode='median')
            except Exception as exc:
                entry['configs'].append({'config': cfg, 'error': f'{type(exc).__name__}: '
                                                                 f'{exc}'[:300]})
                continue
            entry['configs'].append({'config': cfg, 'ms': ms, 'rel_err': err,
                                     'tb_s': qw.nbytes / ms / 1e9})
        ok = [c for c in entry['configs'] if 'ms' in c and (c['rel_err'] or 0) < 1e-2]
        entry['best'] = min(ok, key=lambda c: c['ms']) if ok else None
        if fmt == 'int4' and kind != 'qkv':
            entry['tinygemm_ms'], entry['tinygemm_rel_err'] = _tinygemm_ms(w, x)  # all rows
        result[fmt] = entry
        del qw, deq
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='.')
    ap.add_argument('--models', nargs='+', default=list(MODELS))
    ap.add_argument('--formats', nargs='+', default=['int8', 'int4'])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device('cuda')
    configs.use_builtin(torch.cuda.get_device_name())
    env = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'triton': triton.__version__, 'cuda': torch.version.cuda}
    print(json.dumps(env), flush=True)
    results, tuned, seen = [], [], set()
    t0 = time.time()
    for name in args.models:
        for kind, n, k, heads in shapes(name):
            if (kind, n, k) in seen:
                continue
            seen.add((kind, n, k))
            r = bench_shape(kind, n, k, heads, dev, args.formats)
            r['model'] = name
            results.append(r)
            line = (f"{name:11s} {kind:6s} N={n:6d} K={k:5d} bf16 {r['bf16_fused_ms']*1e3:6.1f}"
                    f" us (cuBLAS {r['cublas_ms']*1e3:6.1f})")
            for fmt in args.formats:
                best = r[fmt]['best']
                if best is None:
                    line += f' | {fmt}: none ran'
                    continue
                tuned.append([f'{kind}.{fmt}', n, k, *best['config']])
                line += (f" | {fmt} {best['ms']*1e3:6.1f} us {best['tb_s']:.2f} TB/s "
                         f"x{r['bf16_fused_ms'] / best['ms']:.2f} {tuple(best['config'])}")
                if r[fmt].get('tinygemm_ms'):
                    line += f" tinygemm {r[fmt]['tinygemm_ms']*1e3:6.1f} us"
            print(line, flush=True)
            with open(os.path.join(args.out, 'quant_configs.json'), 'w') as f:
                json.dump(tuned, f)
            with open(os.path.join(args.out, 'quant_kernels.json'), 'w') as f:
                json.dump({'env': env, 'wall_s': time.time() - t0, 'shapes': results}, f,
                          indent=1)


if __name__ == '__main__':
    main()
