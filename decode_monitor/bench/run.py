"""Run a grid: memory pre-check, one fresh process per session, progress, raw results.

The parent never opens a CUDA context (free memory comes from NVML), so every session starts
on a GPU exactly as a freshly started robot process would.

No measurement is lost: results.json is rewritten (atomically) after every session with
`partial: true`, and once more when the run ends or is interrupted (Ctrl-C, SIGTERM), before any
analysis. An interrupted run keeps every sample that was reported, `interrupted: true`.
"""
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading

from decode_monitor.bench import memory
from decode_monitor.bench.analysis import KEY_FIELDS as CELL_FIELDS  # as Grid.cells() lists them
from decode_monitor.bench.grid import GridError
from decode_monitor.bench.session import MARK

FORMAT = 'decode_monitor.bench/1'


def resolve_device(requested):
    os.environ.setdefault('PYTORCH_NVML_BASED_CUDA_CHECK', '1')  # no CUDA init in the parent
    import torch
    available = torch.cuda.is_available()
    if requested == 'auto':
        return 'cuda' if available else 'cpu'
    if requested == 'cuda' and not available:
        raise GridError('device: cuda was asked for, but torch sees no CUDA device')
    return requested


def _cpu_name():
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    """The device model a run on `device` reports (NVML's GPU name; 'cpu: <model>' on a CPU).

    None when it cannot be told (a GPU without NVML). A reference profile is matched on it.
    """
    if device == 'cuda':
        from decode_monitor.telemetry.gpu import GpuTelemetry
        return GpuTelemetry().name
    return f'cpu: {_cpu_name()}'


def save_results(out_dir, results):
    """Write results.json through a temporary file, so an interruption leaves the last copy."""
    from decode_monitor.bench.report import write_json
    path = os.path.join(out_dir, 'results.json')
    write_json(path + '.tmp', results)
    os.replace(path + '.tmp', path)
    return path


def environment(device, argv):
    import torch
    import transformers
    import decode_monitor
    from decode_monitor.telemetry.gpu import GpuTelemetry
    env = {'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
           'command': ' '.join(['bench'] + [shlex.quote(a) for a in argv]),
           'device': device, 'torch': torch.__version__, 'cuda': torch.version.cuda,
           'transformers': transformers.__version__,
           'package_version': decode_monitor.__version__,
           'python': platform.python_version(), 'platform': platform.platform()}
    if device == 'cuda':
        gpu = GpuTelemetry()
        env.update(device_name=gpu.name, gpu_name=gpu.name, gpu_uuid=gpu.uuid, driver=gpu.driver,
                   nvml=gpu.available, nvml_reason=gpu.reason, peak_bandwidth=gpu.peak_bandwidth,
                   peak_source='nvml' if gpu.peak_bandwidth else None)
    else:
        env.update(device_name=f'cpu: {_cpu_name()}', peak_bandwidth=None, peak_source=None)
    return env


def precheck(grid, device, free=None, shapes=None):
    """Split the grid into runnable cells per model and skipped cells with reasons.

    free: bytes available (None: read now); shapes: model -> ModelShape (None: count now).
    Returns (runnable: {model: [(ctx, backend, mode, weights, batch, co_runner)]},
    skipped: [dict], notes: [str]).
    """
    if free is None:
        free = memory.free_bytes(device, grid.memory_limit_gb)
    notes = []
    if free is None:
        notes.append('free memory unknown: no memory pre-check')
    shapes = dict(shapes or {})
    fits = {}  # (model, ctx, weights, batch, co_runner) -> Fit: the need depends on no more
    runnable, skipped = {}, []
    for model, ctx, backend, mode, weights, batch, co_runner in grid.cells():
        if model not in shapes:
            shapes[model] = _shape_or_none(model, notes)
        fit = None
        need_key = (model, ctx, weights, batch, co_runner)
        if shapes[model] is not None and free is not None:
            if need_key not in fits:
                need = memory.cell_bytes(shapes[model], ctx + grid.warmup + grid.steps,
                                         grid.dtype, grid.memory_margin_gb, weights, device,
                                         batch, co_runner)
                fits[need_key] = memory.check(need, free)
            fit = fits[need_key]
        if fit is not None and not fit.fits:
            skipped.append({'model': model, 'ctx': ctx, 'backend': backend, 'mode': mode,
                            'weights': weights, 'batch': batch, 'co_runner': co_runner,
                            'status': 'skipped', 'reason': fit.reason,
                            'need_gb': fit.need_bytes / memory.GB,
                            'free_gb': fit.free_bytes / memory.GB})
        else:
            runnable.setdefault(model, []).append((ctx, backend, mode, weights, batch, co_runner))
    return runnable, skipped, notes


def _shape_or_none(model, notes):
    try:
        return memory.model_shape(model)
    except Exception as exc:
        notes.append(f'{model}: no memory estimate ({type(exc).__name__}: {exc})')
        return None


def session_spec(grid, device, runnable, index, profile=False, trace_dir=None):
    """One session's spec. profile: profile this session; trace_dir: write the profile's
    Chrome traces there (absolute: the session runs in its own process)."""
    spec = {'session': index, 'device': device, 'dtype': grid.dtype, 'steps': grid.steps,
            'warmup': grid.warmup, 'order': grid.order, 'seed': grid.seed,
            'peak_bandwidth': grid.peak_bandwidth_gbs * 1e9 if grid.peak_bandwidth_gbs else None,
            'kernel_configs': grid.kernel_configs, 'prompt_tokens': list(grid.prompt_tokens),
            'models': [{'source': m, 'cells': [list(c) for c in cells]}
                       for m, cells in runnable.items()]}
    if profile:
        contexts = sorted({c[0] for cells in runnable.values() for c in cells})
        ctx = grid.profile_context or (contexts[0] if contexts else None)
        spec['profile'] = {'context': ctx, 'steps': grid.profile_steps,
                           'backends': list(grid.backends), 'modes': list(grid.modes),
                           'weights': list(grid.weights),
                           'trace_dir': os.path.abspath(trace_dir) if trace_dir else None}
    return spec


def _child_env():
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (package_root, env.get('PYTHONPATH')) if p)
    env['PYTHONUNBUFFERED'] = '1'
    env.pop('PYTORCH_NVML_BASED_CUDA_CHECK', None)
    return env


def run_session(spec, timeout_s, log, on_event):
    """Start one session process, feed it the spec, pass its events on.

    Returns a description of how it ended: 'exit code N' or 'timed out after T s'.
    """
    proc = subprocess.Popen([sys.executable, '-m', 'decode_monitor.bench.session'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_child_env())
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        proc.kill()
    timer = threading.Timer(timeout_s, kill)
    try:  # from here on, an interruption ends the session process too
        timer.start()
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith(MARK):
                on_event(json.loads(line[len(MARK):]))
            else:
                log.write(line)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ending = f'timed out after {timeout_s:g} s' if timed_out.is_set() else f'exit code {code}'
    log.write(f'session {spec["session"]}: {ending}\n')
    return ending


def run_grid(grid, out_dir, argv=(), profile=False, progress=True, free=None):
    """Run every session of the grid; returns the results dict (not yet analysed)."""
    from tqdm import tqdm
    device = resolve_device(grid.device)
    if grid.dtype == 'auto':  # as the node does: bf16 on a GPU, float32 where bf16 is slow
        grid = dataclasses.replace(grid, dtype='bfloat16' if device == 'cuda' else 'float32')
    os.makedirs(out_dir, exist_ok=True)
    runnable, skipped, notes = precheck(grid, device, free)
    results = {'format': FORMAT, 'environment': environment(device, list(argv)),
               'grid': grid.as_dict(), 'sessions': [], 'samples': [], 'skipped': skipped,
               'profile': [], 'notes': notes, 'sessions_completed': 0, 'partial': True}
    total = grid.sessions * sum(len(c) for c in runnable.values())
    bar = tqdm(total=total, unit='cell', desc='bench', disable=not progress or None,
               file=sys.stderr, dynamic_ncols=True)
    log_path = os.path.join(out_dir, 'sessions.log')
    with open(log_path, 'w', encoding='utf-8') as log:
        try:
            _run_sessions(grid, device, runnable, results, profile, bar, log,
                          lambda: save_results(out_dir, results), out_dir)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what finished, report it
            results['interrupted'] = True
            results['notes'].append(
                f"interrupted after {results['sessions_completed']} of {grid.sessions} sessions: "
                'the results hold the cells that finished before that')
            log.write('interrupted\n')
        results['partial'] = bool(results.get('interrupted'))
        save_results(out_dir, results)
    bar.close()
    return results


def _run_sessions(grid, device, runnable, results, profile, bar, log, checkpoint, out_dir):
    for index in range(grid.sessions if runnable else 0):
        spec = session_spec(grid, device, runnable, index, profile and index == 0, out_dir)
        seen = set()

        def on_event(event, index=index, seen=seen):
            kind = event.pop('event')
            if kind == 'sample':
                seen.add(tuple(event[k] for k in CELL_FIELDS))
                results['samples'].append(event)
                bar.update(1)
                bar.set_postfix_str(f"s{index} {' '.join(str(event[k]) for k in CELL_FIELDS)} "
                                    f"{event['status']}", refresh=False)
            elif kind == 'session':
                results['sessions'].append(event)
            elif kind == 'profile':
                results['profile'].append(event)
            elif kind == 'ttft':
                results.setdefault('ttft', []).append(event)
            elif kind == 'fatal':
                log.write(f"session {index} failed: {event['reason']}\n"
                          f"{event.get('traceback', '')}\n")
                event['session'] = index
                results.setdefault('fatal', []).append(event)
        ending = run_session(spec, grid.session_timeout_s, log, on_event)
        results['sessions_completed'] += 1
        missing = [(m, *c) for m, cells in runnable.items() for c in cells
                   if (m, *c) not in seen]
        for cell in missing:
            results['samples'].append(
                {**dict(zip(CELL_FIELDS, cell)), 'session': index, 'status': 'error',
                 'reason': f'session process ended ({ending}) before this cell '
                           'reported (see sessions.log)'})
            bar.update(1)
        checkpoint()
        if bar.disable:
            print(f'bench: session {index + 1}/{grid.sessions} done ({ending})',
                  file=sys.stderr, flush=True)
