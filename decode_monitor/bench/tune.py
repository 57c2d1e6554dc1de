"""`bench tune`: measure the fused kernels' launch configs on this GPU and write them as a table.

    bench tune MODEL... [--weights bf16 int8 int4] [--context 2048] [--budget-s S]
               [--candidates small|full|wide|waves|tiny] [-o FILE] [--restart]

A kernel timed alone pays a launch and an idle GPU around it; inside the graphed step it
follows another kernel, and what counts is how the step's time moves. So every candidate is
timed as the real step: the model's own decode step (all its layers, its weights in the format
being tuned), captured in one CUDA graph with the candidate config on one shape (a GEMV kind,
format and N x K, or the attention layout) and the shapes tuned so far at their chosen configs,
replayed back to back. The candidates' graphs are replayed in turns (rounds), so drift in clocks
hits them alike; the median per candidate decides. The fastest is then timed again against the
default in alternating rounds and kept only if it still wins: a tuned config is never slower
than the default it replaces, in the same run. A candidate whose logits differ from the
default's is dropped.

The table (tables.py: JSON with provenance) is written after every shape, so an interrupted run
loses at most one shape and the same command resumes it; shapes already in the table are
skipped. `--budget-s` bounds the run: the shapes left at the end keep the defaults.
Without CUDA (tests, under Triton's interpreter) the same sequence runs eagerly, timed by the
host clock: it proves the mechanics, not speed.
"""
import argparse
import os
import shlex
import statistics
import sys
import time

from decode_monitor.bench.grid import WEIGHTS
from decode_monitor.bench.tune_candidates import CANDIDATES
from decode_monitor.bench.tune_check import agrees, kernel_output

MIN_CANDIDATES = 3  # the default and two others, while the budget lasts


class Timer:
    """Runs of one prepared step per candidate: a CUDA graph, or an eager call on a CPU."""

    def __init__(self, backend, torch):
        self.backend, self.torch = backend, torch
        self.cuda = backend.device.type == 'cuda'
        self.token = torch.ones((1, 1), dtype=torch.long, device=backend.device)
        self.pos = torch.tensor([backend.max_context - 1], device=backend.device)
        self.rounds, self.reps = (4, 8) if self.cuda else (1, 1)

    def prepare(self):
        """The step with the backend's current configs, ready to replay."""
        torch, backend = self.torch, self.backend
        state = (backend.launch_configs, backend.attention)  # the graph's buffers stay alive
        if not self.cuda:
            def run():
                backend.launch_configs, backend.attention = state
                return backend.forward_one(self.token, self.pos)
            run()
            return run
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for _ in range(2):
                backend.forward_one(self.token, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            backend.forward_one(self.token, self.pos)

        def replay():
            graph.replay()
            return state
        return replay

    def median_ms(self, runs, rounds=None):
        """Median over rounds of the mean ms of `reps` back-to-back runs, per run; the runs take
        turns within a round, in alternating order."""
        torch = self.torch
        samples = [[] for _ in runs]
        for r in range(rounds or self.rounds):
            order = list(range(len(runs)))[::-1 if r % 2 else 1]
            for i in order:
                if self.cuda:
                    runs[i]()  # settle after the previous candidate
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    for _ in range(self.reps):
                        runs[i]()
                    end.record()
                    end.synchronize()
                    samples[i].append(start.elapsed_time(end) / self.reps)
                else:
                    t0 = time.perf_counter()
                    for _ in range(self.reps):
                        runs[i]()
                    samples[i].append((time.perf_counter() - t0) * 1e3 / self.reps)
        return [statistics.median(s) for s in samples]


def _units(backend, done, tune_attention):
    """(kind, key) of every shape of this backend's step not in `done`: the GEMVs, then the
    attention layout."""
    keys = list(dict.fromkeys(backend.gemv_keys().values()))
    units = [('gemv', key) for key in keys if key not in done]
    att = backend.attention_key()
    if tune_attention and att not in done:
        units.append(('attention', att))
    return units


def _candidates(kind, key, on_cpu, name):
    """The default config of the shape first, then the set's candidates; staged ones only where
    the staged kernel takes the shape (elsewhere they would time the Triton kernel again under
    a row that says staged)."""
    from decode_monitor.engine.fused.configs import ATTENTION_DEFAULT, gemv_default
    from decode_monitor.engine.fused.gemv import staged_fits
    from decode_monitor.engine.fused.quant import group_size_for
    sets = CANDIDATES[name]
    if kind == 'attention':
        return list(dict.fromkeys([ATTENTION_DEFAULT] + list(sets['attention'])))
    by_kind = sets['gemv'][key.weights]
    listed = [c for c in by_kind.get(key.kind, by_kind['*'])
              if not c.staged or staged_fits(c, key.weights, key.n, key.k,
                                             group_size_for(key.k), plain=key.kind == 'gemv')]
    return list(dict.fromkeys([gemv_default(key.kind, key.weights, on_cpu)] + listed))


def tune_unit(backend, timer, table, kind, key, candidates, share, deadline, log):
    """Time the candidates of one shape in the step; returns (config kept, measurements).

    Candidates stop being added past this shape's share of the budget once MIN_CANDIDATES
    ran, and past the whole budget's end once the default ran.
    """
    with_row = table.with_attention if kind == 'attention' else table.with_gemv
    runs, tried, reference = [], [], None
    for config in candidates:
        now = time.monotonic()
        if tried and (now > deadline or (len(tried) >= MIN_CANDIDATES and now > share)):
            break
        try:
            out = kernel_output(backend, kind, key, config)
            if reference is not None:
                ok, err = agrees(out, reference)
                if not ok:
                    log(f'  {tuple(config)}: output differs from the default config\'s '
                        f'(relative error {err:.2g}): dropped')
                    continue
            backend.set_kernel_configs(with_row(key, config))
            run = timer.prepare()
        except Exception as exc:  # a config this GPU cannot run (shared memory, ...): skip it
            log(f'  {tuple(config)}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}')
            continue
        reference = out if reference is None else reference
        runs.append(run)
        tried.append(config)
    if not tried:
        raise RuntimeError(f'no config of {kind} {tuple(key)} ran, not even the default')
    times = timer.median_ms(runs)
    for config, ms in zip(tried, times):  # what each candidate did, for whoever reads the log
        log(f'  {tuple(config)}: {ms:.4f} ms')
    best = min(range(len(tried)), key=times.__getitem__)
    default_ms, tuned_ms = times[0], times[best]
    if best:  # confirm against the default, the winner of many draws being flattered
        default_ms, tuned_ms = timer.median_ms([runs[0], runs[best]], 2 * timer.rounds)
        if tuned_ms >= default_ms:
            best, tuned_ms = 0, default_ms
    measured = {'default_ms': round(default_ms, 5), 'tuned_ms': round(tuned_ms, 5),
                'candidates': len(tried)}
    return tried[best], measured


def _parser():
    p = argparse.ArgumentParser(
        prog='bench tune', description='Measure the fused kernels\' launch configs for a '
        'model on this GPU (each candidate timed in the model\'s own graphed decode step) and '
        'write them as a kernel-config table, used from then on by the decoder on this GPU.')
    p.add_argument('models', nargs='+', metavar='MODEL',
                   help='preset names, checkpoint directories or .gguf files')
    p.add_argument('--weights', nargs='+', default=list(WEIGHTS), choices=WEIGHTS,
                   help='weight formats to tune')
    p.add_argument('--context', type=int, default=2048,
                   help='KV context the step attends over (the attention layout is tuned '
                   'for it)')
    p.add_argument('--budget-s', type=float, default=None,
                   help='stop after about this many seconds; shapes left keep the defaults')
    p.add_argument('--candidates', choices=sorted(CANDIDATES), default='small',
                   help='candidate set per shape: small (minutes), full (more), wide (small '
                   'with more for int8 and int4), waves (small with split-K counts for int8 and '
                   'int4), tiny (tests)')
    p.add_argument('-o', '--output', help='table file (default: the user cache for this GPU '
                   'and Triton version, which the decoder then finds by itself)')
    p.add_argument('--restart', action='store_true',
                   help='ignore the shapes an existing table holds and tune them again')
    p.add_argument('--device', default='auto', help='auto | cuda | cuda:N | cpu')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def main(argv):
    from decode_monitor.engine.fused.tables import TableError
    args = _parser().parse_args(argv)
    try:
        return run(args, argv)
    except TableError as exc:
        print(f'bench tune: error: {exc}', file=sys.stderr)
        return 2


def _start_table(args, path, device_name, triton):
    """The existing table at `path` to resume, or an empty one."""
    from decode_monitor.engine.fused import tables
    from decode_monitor.engine.fused.configs import KernelConfigs
    from decode_monitor.engine.fused.tables import TableError
    if args.restart or not os.path.exists(path):
        return KernelConfigs(source=path), {}
    table = tables.load(path)
    made = (table.provenance.get('gpu_name'), table.provenance.get('triton'))
    if made != (device_name, triton):
        raise TableError(f'{path} was tuned on {made[0]} with Triton {made[1]}, not '
                         f'{device_name} with Triton {triton}: choose another -o, or --restart')
    return table, tables.measurements(path)


def _merged_provenance(new, old):
    """This run's provenance; a table made by another command keeps that one's, and the ones
    it kept, under 'earlier' (newest first): its rows were measured by those runs."""
    if not old or old.get('command') == new['command']:  # a fresh table, or a resumed run
        return {**new, 'earlier': old.get('earlier', [])} if old.get('earlier') else new
    first = {k: v for k, v in old.items() if k != 'earlier'}
    return {**new, 'earlier': [first] + list(old.get('earlier', []))}


def run(args, argv):
    import torch
    from tqdm import tqdm
    from decode_monitor.engine.fused import tables
    from decode_monitor.engine.fused.model import FusedBackend
    from decode_monitor.engine.sources import load_model
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.context < 2:
        _parser().error('--context must be at least 2')
    name, triton = tables.device_name(device), tables.triton_version()
    path = args.output or tables.user_table_path(name, triton)
    table, measured = _start_table(args, path, name, triton)
    command = ' '.join(['bench', 'tune'] + [shlex.quote(a) for a in argv])
    prov = _merged_provenance(tables.provenance(device, command), table.provenance)
    start = time.monotonic()
    deadline = start + (args.budget_s if args.budget_s else float('inf'))
    dtype = torch.bfloat16 if device.startswith('cuda') else torch.float32
    estimate = len(args.models) * (5 * len(args.weights) + 1)
    bar = tqdm(total=estimate, unit='shape', desc='tune', disable=args.no_progress or None,
               file=sys.stderr, dynamic_ncols=True)

    def log(line):  # progress and per-shape lines on stderr; stdout says where the table is
        bar.write(line, file=sys.stderr)
    state = {'done': 0, 'left': 0, 'interrupted': False}

    def save(complete):
        tables.save(path, tables.to_dict(table, {**prov, 'complete': complete}, measured))

    try:
        for m, model in enumerate(args.models):
            if time.monotonic() > deadline:
                state['left'] += 5 * len(args.weights) + 1
                continue
            t0 = time.monotonic()
            loaded = load_model(model, device=device, dtype=dtype)
            log(f'{loaded.name}: loaded in {time.monotonic() - t0:.1f} s')
            for f, fmt in enumerate(args.weights):
                backend = FusedBackend(loaded.model, args.context, use_triton=True,
                                       weights=fmt, kernel_configs=table)
                backend.randomize_cache()
                timer = Timer(backend, torch)
                timer.prepare()  # compiles the step's kernels: no shape's share pays for it
                units = _units(backend, set(table.gemv_rows) | set(table.attention_rows),
                               tune_attention=f == 0)
                bar.total = bar.n + len(units) + (len(args.weights) - f - 1) * 5 + (
                    len(args.models) - m - 1) * (5 * len(args.weights) + 1)
                for kind, key in units:
                    now = time.monotonic()
                    if now > deadline:
                        state['left'] += 1
                        continue
                    bar.set_postfix_str(f'{loaded.name} {_label(kind, key)}', refresh=True)
                    t0 = now
                    # twice a fair share of what is left: the count of shapes left is an
                    # estimate until each model is loaded (and models share shapes)
                    left = max(1, bar.total - bar.n)
                    share = now + 2 * (deadline - now) / left
                    config, result = tune_unit(
                        backend, timer, table, kind, key,
                        _candidates(kind, key, device == 'cpu', args.candidates),
                        share, deadline, log)
                    result['model'] = loaded.name
                    table = (table.with_attention if kind == 'attention'
                             else table.with_gemv)(key, config)
                    measured[key] = result
                    backend.set_kernel_configs(table)
                    save(False)
                    state['done'] += 1
                    bar.update(1)
                    log(f'{loaded.name} {_label(kind, key)}: {tuple(config)} '
                        f"{result['tuned_ms']:.4f} ms/step, default {result['default_ms']:.4f} "
                        f"({result['candidates']} configs, {time.monotonic() - t0:.1f} s)")
                del backend, timer
                loaded.model.__dict__.get('_fused_quantised', {}).pop(fmt, None)
                _free(torch)
            del loaded
            _free(torch)
    except KeyboardInterrupt:
        state['interrupted'] = True
    bar.close()
    complete = not state['interrupted'] and not state['left']
    if os.path.exists(path) or state['done']:
        save(complete)
    if state['interrupted']:
        print(f'bench tune: interrupted; {len(measured)} shapes kept in {path}: run the same '
              'command again to resume', file=sys.stderr)
        return 1
    left = f", {state['left']} left at the defaults (budget spent)" if state['left'] else ''
    print(f'kernel configs: {path} ({len(measured)} shapes{left}; '
          f'{time.monotonic() - start:.0f} s)')
    return 0


def _label(kind, key):
    if kind == 'attention':
        return f'attention {key[0]}x{key[1]} ctx {key[2]}'
    return f'{key.kind} {key.weights} {key.n}x{key.k}'


def _free(torch):
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
