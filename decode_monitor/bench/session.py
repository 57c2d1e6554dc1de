"""One bench session: a fresh process (fresh CUDA context) that times its cells.

    python -m decode_monitor.bench.session < spec.json

reads a JSON spec on stdin and writes one line per event on stdout, each `@@bench {json}`:
`session` (environment and bandwidths), `sample` (one cell), `profile`, `done`. Anything else on
stdout or stderr is library chatter the parent keeps in its log.
"""
import contextlib
import gc
import json
import os
import random
import re
import sys
import time
import traceback

MARK = '@@bench '


def emit(event, **payload):
    payload['event'] = event
    sys.stdout.write(MARK + json.dumps(payload) + '\n')
    sys.stdout.flush()


def failure(exc, with_traceback=True):
    """What a cell records of `exc`: skipped for an out-of-memory (the cell does not fit this
    GPU), else an error; the reason is the message's first line (and the traceback's tail).
    Called inside the `except` block (the traceback is the one being handled)."""
    oom = type(exc).__name__ == 'OutOfMemoryError'
    first_line = (str(exc).splitlines() or [''])[0][:300]
    out = dict(status='skipped' if oom else 'error', reason=f'{type(exc).__name__}: {first_line}')
    if with_traceback and not oom:
        out['traceback'] = traceback.format_exc()[-2000:]
    return out


def cell_order(cells, order, seed, session):
    """Cells (ctx, backend, mode[, weights]) of one model in the order a session runs them.

    random: shuffled by a generator seeded from (seed, session), so a rerun repeats it.
    alternate: contexts ascending in even sessions and descending in odd ones; within a context
    the modes (and backends, and weight formats) swap their order from one session to the next,
    so neither side of a paired comparison always runs first.
    """
    cells = list(cells)
    if order == 'random':
        random.Random(seed * 1_000_003 + session).shuffle(cells)
        return cells
    if order != 'alternate':
        raise ValueError(f'unknown order {order!r}')
    flip = session % 2 == 1
    contexts = sorted({c[0] for c in cells}, reverse=flip)
    out = []
    for ctx in contexts:
        group = sorted((c for c in cells if c[0] == ctx), key=lambda c: (c[2], c[1], c[3:]),
                       reverse=flip)
        out.extend(group)
    return out


def trace_name(source, ctx, backend, mode, weights):
    """File name of a profiled cell's Chrome trace (in the bench output directory)."""
    model = re.sub(r'[^A-Za-z0-9._-]+', '_', os.path.basename(source.rstrip('/\\')))
    return f'trace-{model}-{ctx}-{backend}-{mode}-{weights}.json.gz'


def _sample_dict(sample):
    return None if sample is None else {
        'sm_clock_mhz': sample.sm_clock_mhz, 'mem_clock_mhz': sample.mem_clock_mhz,
        'temperature_c': sample.temperature_c, 'power_w': sample.power_w,
        'energy_j': sample.energy_j, 'throttle_reasons': list(sample.throttle_reasons),
        'throttled': sample.throttled}


def energy_counter_period_ms(telemetry, window_s=0.3):
    """Median time between changes of the NVML energy counter (its resolution in time)."""
    changes, last = [], None
    end = time.perf_counter() + window_s
    while time.perf_counter() < end:
        energy = telemetry.sample().energy_j
        if energy is None:
            return None
        if energy != last:
            changes.append(time.perf_counter())
            last = energy
        time.sleep(0.001)
    gaps = sorted(b - a for a, b in zip(changes[1:], changes[2:]))
    return gaps[len(gaps) // 2] * 1e3 if gaps else None


def _free_cuda_memory():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Session:
    def __init__(self, spec):
        import torch
        from decode_monitor.telemetry.gpu import GpuTelemetry
        self.spec = spec
        self.torch = torch
        self.index = spec['session']
        self.device = spec['device']
        self.dtype = getattr(torch, spec['dtype'])
        self.steps = spec['steps']
        self.warmup = spec['warmup']
        self.telemetry = GpuTelemetry() if self.device == 'cuda' else None

    def start(self):
        import torch
        import transformers
        from decode_monitor.engine.floor import measure_copy_bandwidth
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('the grid asks for cuda but torch sees no CUDA device')
        self.copy_bandwidth = measure_copy_bandwidth(self.device)
        _free_cuda_memory()
        peak = self.spec.get('peak_bandwidth')
        peak_source = 'override' if peak else None
        if not peak and self.telemetry is not None and self.telemetry.peak_bandwidth:
            peak, peak_source = self.telemetry.peak_bandwidth, 'nvml'
        self.peak_bandwidth = peak
        info = {'session': self.index, 'pid': os.getpid(), 'device': self.device,
                'torch': torch.__version__,
                'transformers': transformers.__version__, 'cuda': torch.version.cuda,
                'copy_bandwidth': self.copy_bandwidth, 'peak_bandwidth': peak,
                'peak_source': peak_source}
        if self.device == 'cuda':
            info['device_name'] = torch.cuda.get_device_name()
        if self.telemetry is not None:
            info.update(gpu_name=self.telemetry.name, gpu_uuid=self.telemetry.uuid,
                        driver=self.telemetry.driver, nvml=self.telemetry.available,
                        energy_counter_period_ms=energy_counter_period_ms(self.telemetry))
        emit('session', **info)

    def run(self):
        models = list(self.spec['models'])
        if self.spec['order'] == 'random':
            random.Random(self.spec['seed'] * 7_919 + self.index).shuffle(models)
        elif self.index % 2 == 1:
            models.reverse()
        for entry in models:
            self.run_model(entry)
        emit('done', session=self.index)

    def _base(self, source, ctx, backend, mode, weights, batch=1, co_runner='none'):
        return {'model': source, 'ctx': ctx, 'backend': backend, 'mode': mode,
                'weights': weights, 'batch': batch, 'co_runner': co_runner,
                'session': self.index, 'steps': self.steps, 'warmup': self.warmup}

    def run_model(self, entry):
        from decode_monitor.engine.sources import load_model
        source = entry['source']
        cells = cell_order([tuple(c) for c in entry['cells']], self.spec['order'],
                           self.spec['seed'], self.index)
        try:
            t0 = time.perf_counter()
            loaded = load_model(source, self.device, self.dtype)
            load_s = time.perf_counter() - t0
        except Exception as exc:
            reason = f'model load failed: {type(exc).__name__}: {exc}'
            for cell in cells:
                emit('sample', **self._base(source, *cell), status='error', reason=reason)
            return
        for cell in cells:
            emit('sample', **self.run_cell(loaded, source, *cell), load_s=load_s)
            _free_cuda_memory()
        if self.spec.get('prompt_tokens'):
            from decode_monitor.bench import ttft
            for row in ttft.run(self, loaded, source, cells):
                emit('ttft', **row)
            _free_cuda_memory()
        profile = self.spec.get('profile')
        if profile:
            self.run_profile(loaded, source, profile)
        del loaded
        _free_cuda_memory()

    def _cell_fits(self, loaded, max_context, weights, batch, co_runner):
        """In-process check once the dense weights are resident: what the cell adds (KV,
        attention buffers, a quantised copy of the weights, a co-runner) vs free memory."""
        from decode_monitor.bench import memory
        shape = memory.shape_from_config(loaded.config, 0, memory.linear_params(loaded.model))
        need = memory.cell_bytes(shape, max_context, self.spec['dtype'], weights=weights,
                                 device=self.device, batch=batch, co_runner=co_runner)
        return memory.check(need, self.torch.cuda.mem_get_info()[0])

    def run_cell(self, loaded, source, ctx, backend, mode, weights, batch=1, co_runner='none'):
        from decode_monitor.engine.decoder import Decoder
        out = self._base(source, ctx, backend, mode, weights, batch, co_runner)
        max_context = ctx + self.warmup + self.steps
        if self.device == 'cuda':
            fit = self._cell_fits(loaded, max_context, weights, batch, co_runner)
            if not fit.fits:
                out.update(status='skipped', reason=fit.reason)
                return out
        decoder = None
        try:
            t0 = time.perf_counter()
            decoder = Decoder(loaded, mode=mode, backend=backend, max_context=max_context,
                              weights=weights, kernel_configs=self.spec.get('kernel_configs'),
                              batch=batch)
            out['build_s'] = time.perf_counter() - t0
            out['kernel_configs'] = decoder.kernel_configs_source
            if decoder.mode != mode:
                status = 'error' if self.device == 'cuda' else 'skipped'
                out.update(status=status, reason=decoder.fallback_reason)
                return out
            with self._co_runner(co_runner, out) as running:
                if not running:
                    return out  # it could not start: the reason is in `out`
                # The energy window spans the warm-up and the timed steps (the same decode
                # steps, back to back) so that it is long against the NVML energy counter's
                # update period.
                before = self.telemetry.sample() if self.telemetry else None
                t0 = time.perf_counter()
                decoder.time_steps(ctx, 0, self.warmup)  # randomise the cache, warm up
                times = decoder.time_steps(ctx, self.steps, 0)
                wall = time.perf_counter() - t0
                after = self.telemetry.sample() if self.telemetry else None
            out.update(self._measurements(decoder, ctx, times, wall, before, after, batch))
            report = out.get('co_runner_run') or {}
            if report.get('status', 'ran') != 'ran':  # it ended while the steps ran
                out.update(status='error', reason=f"co-runner {co_runner}: {report['reason']}")
            else:
                out['status'] = 'ok'
        except Exception as exc:
            out.update(failure(exc))
        finally:
            del decoder
        return out

    @contextlib.contextmanager
    def _co_runner(self, spec, out):
        """Run `spec` in its own process around the block; yields False if it cannot start.

        Its report (pid, how it ended, its rate) lands in out['co_runner_run'].
        """
        if spec == 'none':
            yield True
            return
        from decode_monitor.bench.corunner import CoRunner, CoRunnerError
        runner = CoRunner(spec, self.device)
        try:
            runner.start()
        except CoRunnerError as exc:
            out.update(status='error', reason=str(exc), co_runner_run=runner.report())
            yield False
            return
        try:
            yield True
        finally:
            out['co_runner_run'] = runner.stop()

    def _measurements(self, decoder, ctx, times, wall, before, after, batch=1):
        floor = decoder.floor
        mean_bytes = sum(floor.bytes_per_step(ctx + i) for i in range(len(times))) / len(times)
        m = {'mode_used': decoder.mode, 'step_ms': times, 'wall_s': wall,
             'bytes_per_step': mean_bytes, 'max_context': decoder.max_context,
             'copy_bandwidth': self.copy_bandwidth, 'peak_bandwidth': self.peak_bandwidth,
             'floor_ms_copy': mean_bytes / self.copy_bandwidth * 1e3,
             'floor_ms_peak': (mean_bytes / self.peak_bandwidth * 1e3
                               if self.peak_bandwidth else None),
             'nvml_before': _sample_dict(before), 'nvml_after': _sample_dict(after),
             'energy_j': None, 'joules_per_token': None}
        if before is not None and before.energy_j is not None and after.energy_j is not None:
            m['energy_j'] = after.energy_j - before.energy_j
            m['energy_window_s'] = wall
            # a step of a batch of b decodes b tokens
            m['joules_per_token'] = m['energy_j'] / ((len(times) + self.warmup) * batch)
        return m

    def run_profile(self, loaded, source, profile):
        from decode_monitor.bench.grid import pairs_with
        from decode_monitor.bench.profile import profile_steps
        from decode_monitor.engine.decoder import Decoder
        ctx, steps = profile['context'], profile['steps']
        runs = [(b, mode, w) for b in profile['backends'] for mode in profile['modes']
                for w in profile['weights'] if pairs_with(b, w)]
        for backend, mode, weights in runs:
            base = self._base(source, ctx, backend, mode, weights)
            decoder = None
            try:
                decoder = Decoder(loaded, mode=mode, backend=backend,
                                  max_context=ctx + 3 + steps, weights=weights,
                                  kernel_configs=self.spec.get('kernel_configs'))
                if decoder.mode != mode:
                    emit('profile', **base, status='skipped',
                         reason=decoder.fallback_reason)
                    continue
                # The trace's name is kept relative: the output directory may move.
                trace = (trace_name(source, ctx, backend, mode, weights)
                         if profile.get('trace_dir') else None)
                anatomy = profile_steps(
                    decoder, ctx, steps, warmup=3,
                    trace_path=os.path.join(profile['trace_dir'], trace) if trace else None)
                emit('profile', **base, status='ok', anatomy=anatomy, trace=trace,
                     layers=loaded.config.num_hidden_layers)
            except Exception as exc:
                emit('profile', **base, status='error',
                     reason=f'{type(exc).__name__}: {str(exc).splitlines()[0][:300]}')
            finally:
                del decoder
                _free_cuda_memory()


def main():
    spec = json.load(sys.stdin)
    try:
        session = Session(spec)
        session.start()
        session.run()
    except Exception as exc:
        emit('fatal', session=spec.get('session'),
             reason=f'{type(exc).__name__}: {exc}', traceback=traceback.format_exc()[-4000:])
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
