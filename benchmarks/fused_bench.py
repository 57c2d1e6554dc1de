"""Step time of backend `fused` against `hf`, eager and graph, over fresh sessions.

Each session is a fresh process (fresh CUDA context) that loads one model and measures, in a
shuffled order, every (ctx, backend, mode) cell with `Decoder.time_steps` (CUDA events, random
K/V cache, the last `--steps` positions before ctx). The table reports, per cell, the median
over sessions of each session's median step time, and the achieved fraction of the analytic
floor (bytes per step / peak bandwidth, see decode_monitor.engine.floor). The first session of
a model also times start-up (process start -> first token) and checks bf16 logits against `hf`.

    python benchmarks/fused_bench.py --sessions 5 --out benchmarks/results/h100
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

MODELS = ('qwen2.5-7b', 'llama-3-8b', 'mistral-7b')
PEAK_FALLBACK = 3.352e12  # H100 SXM5 HBM3: 2619 MHz x 5120 bit x 2 / 8


def _session(args):
    t_spawn = float(os.environ.get('FUSED_BENCH_SPAWN', time.time()))
    import torch
    import triton
    from decode_monitor.engine import fused  # noqa: F401  (registers the backend)
    from decode_monitor.engine.decoder import Decoder
    from decode_monitor.engine.floor import FloorModel, measure_copy_bandwidth
    from decode_monitor.engine.sources import load_model
    from decode_monitor.telemetry.gpu import GpuTelemetry
    t_import = time.time()
    gpu = GpuTelemetry()
    dev = args.device
    cuda = dev.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {'model': args.model, 'session': args.index,
           'gpu': torch.cuda.get_device_name() if cuda else 'cpu',
           'driver': gpu.driver, 'torch': torch.__version__, 'triton': triton.__version__,
           'peak_bandwidth': gpu.peak_bandwidth or PEAK_FALLBACK,
           'copy_bandwidth': measure_copy_bandwidth(dev, 1024), 'cells': []}
    t0 = time.time()
    loaded = load_model(args.model, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    sync()
    t_load = time.time()
    out['startup'] = {'process_to_import_s': t_import - t_spawn, 'load_s': t_load - t0}
    floor = FloorModel.for_model(loaded.model)
    prompt = list(range(1, 17))
    cache_dir = os.environ.get('TRITON_CACHE_DIR') or os.path.expanduser('~/.triton/cache')
    out['startup']['triton_cache_entries_before'] = (
        len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0)
    if args.startup:
        for backend in args.backends:  # the first backend built also pays for packing
            t = time.time()
            dec = Decoder(loaded, mode='graph', backend=backend, max_context=args.ctx[0])
            sync()
            t_ready = time.time()
            steps = dec.generate(prompt, max_new_tokens=2)
            next(steps)
            t_first = time.time()
            next(steps)
            out['startup'][backend] = {
                'build_and_capture_s': t_ready - t, 'prefill_token_s': t_first - t_ready,
                'first_graph_step_s': time.time() - t_first, 'mode': dec.mode,
                'process_start_to_first_token_s': t_load - t_spawn + t_first - t}
            del dec, steps
    if args.check:
        try:
            out['check'] = _check(loaded, torch, dev, args.ctx[0])
        except Exception as exc:
            out['check'] = {'error': f'{type(exc).__name__}: {exc}'}
    modes = args.modes if args.full else [m for m in args.modes if m == 'graph']
    cells = [(c, b, m, w) for c in args.ctx for b in args.backends for m in modes
             for w in (args.weights if b == 'fused' else ['bf16'])]
    random.Random(args.index).shuffle(cells)
    out['quantise_s'] = {}
    for ctx, backend, mode, weights in cells:
        t = time.time()
        dec = Decoder(loaded, mode=mode, backend=backend, max_context=ctx, weights=weights)
        if weights != 'bf16':  # the first build of a format quantises; later ones reuse it
            out['quantise_s'].setdefault(weights, time.time() - t)
        pos = ctx - args.warmup - args.steps
        times = dec.time_steps(pos, args.steps, warmup=args.warmup)
        mean_pos = pos + args.warmup + (args.steps - 1) / 2
        out['cells'].append({'ctx': ctx, 'backend': backend, 'mode': dec.mode,
                             'mode_requested': mode, 'fallback': dec.fallback_reason,
                             'weights': weights, 'median_ms': statistics.median(times),
                             'times_ms': times, 'floor_bytes': dec.floor.bytes_per_step(mean_pos),
                             'model_floor_bytes': floor.bytes_per_step(mean_pos)})
        if args.profile and cuda and backend == 'fused' and mode == 'graph' and ctx == args.ctx[0]:
            try:  # the profile is a diagnosis; the timings stand without it
                out.setdefault('profiles', {})[weights] = _profile(
                    dec, torch, statistics.median(times))
            except Exception as exc:
                out.setdefault('profiles', {})[weights] = {'error': f'{type(exc).__name__}: {exc}'}
        del dec
        if cuda:
            torch.cuda.empty_cache()
    print('RESULT ' + json.dumps(out), flush=True)


def _check(loaded, torch, dev, ctx):
    """bf16 relative logit error of fused vs hf: prefill, then decode steps, short and > 4096."""
    from decode_monitor.engine.fused import FusedBackend
    from decode_monitor.engine.fused.configs import attention_config
    from decode_monitor.engine.hf_backend import HFBackend
    model = loaded.model
    cfg = model.config
    kv = cfg.num_key_value_heads
    att = attention_config(kv, cfg.num_attention_heads // kv, ctx)  # the one being timed
    gen = torch.Generator(device=dev).manual_seed(0)
    errs = []
    for n in (64, 4100) if dev.startswith('cuda') else (64,):
        hf = HFBackend(model, n + 8)
        fu = FusedBackend(model, n + 8, attention_config=att if dev != 'cpu' else None)
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev, generator=gen)
        a, b = hf.prefill(ids).float(), fu.prefill(ids)
        errs.append({'pos': n - 1, 'where': 'prefill', 'rel_err': _rel(b, a)})
        token = a.argmax(-1, keepdim=True)
        for i in range(4):
            pos = torch.tensor([n + i], device=dev)
            a, b = hf.forward_one(token, pos).float(), fu.forward_one(token, pos).clone()
            errs.append({'pos': n + i, 'where': 'step', 'rel_err': _rel(b, a),
                         'same_argmax': bool(a.argmax() == b.argmax())})
            token = a.argmax(-1, keepdim=True)
        del hf, fu
    return errs


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _profile(dec, torch, step_ms):
    """Kernel time by class over graph replays, and the gaps (step time - kernel time)."""
    from torch.profiler import ProfilerActivity, profile
    reps = 10
    dec._seek(dec.max_context - reps - 1)  # replays advance pos; stay inside the cache
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            dec._launch(True)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == 'CUDA'),
                     key=lambda e: e.time_range.start)
    classes, after = {}, None
    for e in kernels:
        name = e.name
        if 'qkv_rope' in name:
            cls = after = 'qkv+rope'
        elif 'attention_' in name:  # its two passes: split and merge
            cls = after = 'attention'
        elif 'gemv_kernel' in name:  # o, gate/up, down follow each other; the lm_head ends
            follows = {'attention': 'o_proj', 'o_proj': 'gate_up', 'gate_up': 'down'}
            cls = follows.get(after, 'lm_head')
            after = cls
        else:
            cls = 'other'
        us = e.time_range.end - e.time_range.start
        entry = classes.setdefault(cls, {'us': 0.0, 'count': 0})
        entry['us'] += us / reps
        entry['count'] += 1 / reps
    kernel_ms = sum(c['us'] for c in classes.values()) / 1e3
    return {'classes': classes, 'kernel_ms': kernel_ms, 'step_ms': step_ms,
            'gap_ms': step_ms - kernel_ms, 'kernels_seen': len(kernels)}


def _orchestrate(args, t0):
    raw, failures = [], []
    for s in range(args.sessions):
        if s >= 1 and time.time() - t0 > args.deadline_s:
            print(f'deadline: stopping after {s} sessions', flush=True)
            break
        order = list(args.models)
        random.Random(1000 + s).shuffle(order)
        for model in order:
            cmd = [sys.executable, os.path.abspath(__file__), '--session', '--model', model,
                   '--index', str(s), '--steps', str(args.steps), '--warmup', str(args.warmup),
                   '--ctx', *map(str, args.ctx), '--backends', *args.backends,
                   '--modes', *args.modes, '--weights', *args.weights, '--device', args.device]
            if s < args.full_sessions:  # eager cells and start-up in the first sessions only
                cmd += ['--full', '--startup']
            if s == 0:
                cmd += ['--check', '--profile']
            env = dict(os.environ, FUSED_BENCH_SPAWN=repr(time.time()))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=args.session_timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
            if proc.returncode or not lines:
                failures.append({'model': model, 'session': s, 'rc': proc.returncode,
                                 'stderr': proc.stderr[-3000:]})
                print(f'session {s} {model} FAILED rc={proc.returncode}\n{proc.stderr[-3000:]}',
                      flush=True)
                continue
            raw.append(json.loads(lines[-1][len('RESULT '):]))
            print(f'session {s} {model} done', flush=True)
        _write(args, t0, raw, failures)  # after every round, so a cut-off run keeps its data
    return raw, failures


def _write(args, t0, raw, failures):
    rows = summarise(raw)
    os.makedirs(args.out, exist_ok=True)
    meta = {'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'wall_s': time.time() - t0, 'failures': failures}
    with open(os.path.join(args.out, 'fused_bench_raw.json'), 'w') as f:
        json.dump({'meta': meta, 'sessions': raw}, f)
    with open(os.path.join(args.out, 'fused_summary.json'), 'w') as f:
        json.dump({'meta': meta, 'rows': rows}, f, indent=1)
    return rows


def summarise(raw):
    """Rows as the bench's summary.json has them, plus the per-session medians behind them.

    ms_per_step is the median over sessions of each session's median step time (the figure
    the table shows); ms_per_step_ci is the bootstrap CI of their mean. For `fused` rows,
    speedup_vs_hf pairs each session's hf and fused medians (same process, same clocks).
    """
    from decode_monitor.telemetry import stats
    cells = {}
    for sess in raw:
        for c in sess['cells']:
            key = (sess['model'], c['ctx'], c['backend'], c['mode_requested'],
                   c.get('weights', 'bf16'))
            cell = cells.setdefault(key, {'sessions': {}, 'floor_bytes': c['floor_bytes'],
                                          'gpu': sess['gpu'], 'peak': sess['peak_bandwidth'],
                                          'copy': [], 'modes_run': set()})
            cell['sessions'][sess['session']] = c['median_ms']
            cell['copy'].append(sess['copy_bandwidth'])
            cell['modes_run'].add(c['mode'])
    rows = []
    for (model, ctx, backend, mode, weights), cell in sorted(cells.items()):
        medians = list(cell['sessions'].values())
        ms = statistics.median(medians)
        mean = stats.mean_ci(medians)
        floor_ms = cell['floor_bytes'] / cell['peak'] * 1e3
        copy = statistics.median(cell['copy'])
        row = {'model': model, 'ctx': ctx, 'backend': backend, 'mode': mode, 'weights': weights,
               'ms_per_step': ms, 'ms_per_step_ci': [_num(mean.lo), _num(mean.hi)],
               'floor_ms': floor_ms, 'floor_fraction': floor_ms / ms,
               'copy_fraction': cell['floor_bytes'] / copy * 1e3 / ms,
               'sessions': len(medians), 'session_medians_ms': medians, 'gpu': cell['gpu'],
               'bytes_per_step': cell['floor_bytes'], 'peak_bandwidth_gbs': cell['peak'] / 1e9,
               'copy_bandwidth_gbs': copy / 1e9, 'modes_run': sorted(cell['modes_run'])}
        for ref_key, name in (((model, ctx, 'hf', mode, 'bf16'), 'speedup_vs_hf'),
                              ((model, ctx, 'fused', mode, 'bf16'), 'speedup_vs_bf16')):
            ref = cells.get(ref_key)
            if ref is None or ref is cell or backend == 'hf':
                continue
            both = sorted(set(cell['sessions']) & set(ref['sessions']))
            speed = stats.paired_ratio_ci([ref['sessions'][i] for i in both],
                                          [cell['sessions'][i] for i in both])
            row[name] = speed.value
            row[name + '_ci'] = [_num(speed.lo), _num(speed.hi)]
            if name == 'speedup_vs_bf16':
                row['byte_ratio_vs_bf16'] = ref['floor_bytes'] / cell['floor_bytes']
        rows.append(row)
    return rows


def _num(x):
    return None if x != x else x  # NaN (no CI from one session) -> null


def table(rows):
    lines = [f"{'model':11s} {'ctx':>5s} {'mode':5s} {'weights':7s} | {'hf ms':>7s} "
             f"{'floor':>6s} | {'fused ms':>8s} {'floor':>6s} | {'vs hf':>7s} | "
             f"{'vs bf16':>7s} {'bytes':>6s} | sessions"]
    by = {(r['model'], r['ctx'], r['mode'], r['backend'], r.get('weights', 'bf16')): r
          for r in rows}
    for (model, ctx, mode, backend, weights), r in sorted(by.items()):
        if backend != 'fused':
            continue
        hf = by.get((model, ctx, mode, 'hf', 'bf16'))
        hf_txt = (f"{hf['ms_per_step']:7.2f} {100 * hf['floor_fraction']:5.1f}%" if hf
                  else f"{'-':>7s} {'-':>6s}")
        speed = f"{r['speedup_vs_hf']:6.2f}x" if 'speedup_vs_hf' in r else f"{'-':>7s}"
        quant = (f"{r['speedup_vs_bf16']:6.2f}x {r['byte_ratio_vs_bf16']:5.2f}x"
                 if 'speedup_vs_bf16' in r else f"{'-':>7s} {'-':>6s}")
        lines.append(f"{model:11s} {ctx:5d} {mode:5s} {weights:7s} | {hf_txt} | "
                     f"{r['ms_per_step']:8.2f} {100 * r['floor_fraction']:5.1f}% | {speed} | "
                     f"{quant} | {r['sessions']}")
    return '\n'.join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=list(MODELS))
    ap.add_argument('--ctx', nargs='+', type=int, default=[2048, 16384])
    ap.add_argument('--backends', nargs='+', default=['fused', 'hf'])
    ap.add_argument('--modes', nargs='+', default=['graph', 'eager'])
    ap.add_argument('--weights', nargs='+', default=['bf16'],
                    help='weight formats of the fused backend: bf16 int8 int4')
    ap.add_argument('--sessions', type=int, default=5)
    ap.add_argument('--steps', type=int, default=40)
    ap.add_argument('--warmup', type=int, default=8)
    ap.add_argument('--session-timeout', type=int, default=300)
    ap.add_argument('--deadline-s', type=float, default=float('inf'),
                    help='start no new round of sessions after this many seconds')
    ap.add_argument('--out', default='.')
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--summarise', metavar='RAW_JSON',
                    help='only rebuild fused_summary.json and the table from a raw file')
    ap.add_argument('--session', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--model', help=argparse.SUPPRESS)
    ap.add_argument('--index', type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument('--full-sessions', type=int, default=10**6,
                    help='sessions that also time eager mode and start-up (graph: all)')
    ap.add_argument('--full', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--startup', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--check', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--profile', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.session:
        return _session(args)
    if args.summarise:  # recompute the summary from a raw file, e.g. on another machine
        with open(args.summarise) as f:
            raw = json.load(f)
        rows = summarise(raw['sessions'])
        with open(os.path.join(args.out, 'fused_summary.json'), 'w') as f:
            json.dump({'meta': raw['meta'], 'rows': rows}, f, indent=1)
        print(table(rows))
        return 0
    t0 = time.time()
    raw, failures = _orchestrate(args, t0)
    rows = _write(args, t0, raw, failures)
    print(table(rows))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
