"""bitsandbytes nf4 beside our formats: the quantised path a robot builder would reach for first.

Each session is a fresh process: it builds a preset on the GPU, times transformers' forward
(backend `hf`, StaticCache) and our fused backend in bf16 and int4, then swaps every linear
layer but lm_head for `bitsandbytes.nn.Linear4bit` (nf4, bf16 compute; what transformers'
`load_in_4bit` does) and times `hf` again, eager and graph (capture may fail: then eager, and
the reason is recorded). Step times are CUDA events over `--steps` steps at ctx - 1.

    python benchmarks/experiments/bnb_nf4.py --model qwen2.5-7b --ctx 2048 --sessions 5 \
        --out results/
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def _nf4_bytes(module):
    """Bytes one step reads from a Linear4bit: packed codes, block scales (nested or not)."""
    weight = module.weight
    total = weight.numel() * weight.element_size()
    state = weight.quant_state
    total += state.absmax.numel() * state.absmax.element_size()
    if getattr(state, 'nested', False):
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    if module.bias is not None:
        total += module.bias.numel() * module.bias.element_size()
    return total


def to_nf4(model):
    """Replace every nn.Linear except lm_head with an nf4 Linear4bit; (dense bytes, nf4 bytes)."""
    import bitsandbytes as bnb
    import torch
    dense = nf4 = 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear) and child is not model.lm_head]
    for parent, name, child in targets:
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                  bias=child.bias is not None, compute_dtype=torch.bfloat16,
                                  quant_type='nf4', device='meta')
        layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                         quant_type='nf4').to('cuda')
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        dense += sum(p.numel() * p.element_size() for p in child.parameters())
        setattr(parent, name, layer)
        nf4 += _nf4_bytes(layer)
    torch.cuda.empty_cache()
    return dense, nf4


def _session(args):
    import torch
    from decode_monitor.engine import fused  # noqa: F401  (registers the backend)
    from decode_monitor.engine.decoder import Decoder
    from decode_monitor.engine.sources import load_model
    from decode_monitor.telemetry.gpu import GpuTelemetry
    loaded = load_model(args.model, device='cuda', dtype=torch.bfloat16)
    peak = GpuTelemetry().peak_bandwidth or 3.352e12
    pos = args.ctx - args.warmup - args.steps
    mean_pos = pos + args.warmup + (args.steps - 1) / 2
    cells = []

    def cell(label, backend, mode, weights='bf16', floor_bytes=None):
        dec = Decoder(loaded, mode=mode, backend=backend, max_context=args.ctx, weights=weights)
        times = dec.time_steps(pos, args.steps, warmup=args.warmup)
        nbytes = floor_bytes if floor_bytes is not None else dec.floor.bytes_per_step(mean_pos)
        ms = statistics.median(times)
        cells.append({'label': label, 'backend': backend, 'mode': dec.mode,
                      'mode_requested': mode, 'fallback': dec.fallback_reason,
                      'weights': weights, 'median_ms': ms, 'bytes_per_step': nbytes,
                      'floor_fraction': nbytes / peak * 1e3 / ms})
        del dec
        torch.cuda.empty_cache()
        return nbytes

    bf16_bytes = cell('hf bf16', 'hf', 'graph')
    cell('fused bf16', 'fused', 'graph')
    cell('fused int4', 'fused', 'graph', 'int4')
    loaded.model.__dict__.pop('_fused_quantised', None)  # free our int4 copy
    torch.cuda.empty_cache()
    dense, nf4 = to_nf4(loaded.model)
    nf4_bytes = bf16_bytes - dense + nf4
    for mode in ('eager', 'graph'):
        try:
            cell(f'hf bnb-nf4 {mode}', 'hf', mode, floor_bytes=nf4_bytes)
        except Exception as exc:  # record, keep the session's other cells
            error = f'{type(exc).__name__}: {exc}'[:400]
            cells.append({'label': f'hf bnb-nf4 {mode}', 'error': error})
    import bitsandbytes
    print('RESULT ' + json.dumps({'session': args.index, 'model': args.model, 'ctx': args.ctx,
                                  'bitsandbytes': bitsandbytes.__version__,
                                  'torch': torch.__version__, 'gpu': torch.cuda.get_device_name(),
                                  'peak_bandwidth': peak, 'cells': cells}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='qwen2.5-7b')
    ap.add_argument('--ctx', type=int, default=2048)
    ap.add_argument('--sessions', type=int, default=5)
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--out', default='.')
    ap.add_argument('--session', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--index', type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.session:
        return _session(args)
    sessions, failures = [], []
    for i in range(args.sessions):
        cmd = [sys.executable, os.path.abspath(__file__), '--session', '--index', str(i),
               '--model', args.model, '--ctx', str(args.ctx), '--steps', str(args.steps),
               '--warmup', str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
        if proc.returncode or not lines:
            failures.append({'session': i, 'rc': proc.returncode, 'stderr': proc.stderr[-3000:]})
            print(f'session {i} failed:\n{proc.stderr[-3000:]}', flush=True)
            continue
        sessions.append(json.loads(lines[-1][len('RESULT '):]))
    rows = {}
    for s in sessions:
        for c in s['cells']:
            if 'median_ms' in c:
                rows.setdefault(c['label'], []).append(c)
    summary = []
    base = statistics.median(c['median_ms'] for c in rows.get('hf bf16', [{'median_ms': 0}]))
    print(f"{'cell':22s} {'mode':6s} {'ms/step':>8s} {'% floor':>8s} {'vs hf bf16':>10s} N")
    for label, cs in rows.items():
        ms = statistics.median(c['median_ms'] for c in cs)
        frac = statistics.median(c['floor_fraction'] for c in cs)
        summary.append({'cell': label, 'mode': cs[0]['mode'], 'fallback': cs[0]['fallback'],
                        'ms_per_step': ms, 'floor_fraction': frac,
                        'bytes_per_step': cs[0]['bytes_per_step'],
                        'speedup_vs_hf_bf16': base / ms if base else None,
                        'session_medians_ms': [c['median_ms'] for c in cs]})
        print(f"{label:22s} {cs[0]['mode']:6s} {ms:8.3f} {100 * frac:7.1f}% "
              f"{base / ms:9.2f}x {len(cs)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'bnb_nf4.json'), 'w') as f:
        json.dump({'command': ' '.join(['python'] + sys.argv), 'summary': summary,
                   'sessions': sessions, 'failures': failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
