"""Bench outputs: results.json, results.csv, summary.json and the study-style report.md."""
import csv
import json
import math
import os
import statistics

from decode_monitor.bench import analysis, quantised, ttft
from decode_monitor.bench.profile import CLASS_LABELS, CLASSES
from decode_monitor.telemetry import stats

CSV_FIELDS = (
    'model', 'ctx', 'backend', 'mode', 'weights', 'batch', 'co_runner', 'session', 'status',
    'reason', 'steps', 'warmup',
    'median_ms', 'mean_ms', 'p90_ms', 'min_ms', 'max_ms', 'floor_ms_peak', 'floor_ms_copy',
    'floor_fraction', 'copy_fraction', 'bytes_per_step', 'peak_bandwidth_gbs',
    'copy_bandwidth_gbs', 'sm_clock_mhz', 'mem_clock_mhz', 'temperature_c', 'power_w',
    'energy_j', 'joules_per_token', 'throttle_reasons')


def write_json(path, data):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1, default=_json_default)
        f.write('\n')


def _json_default(obj):
    if isinstance(obj, stats.Estimate):
        return obj.as_dict()
    raise TypeError(f'{type(obj).__name__} is not JSON serialisable')


def csv_rows(results):
    rows = []
    for s in results.get('skipped', []):
        rows.append({**analysis.key_dict(analysis.cell_key(s)), 'status': 'skipped',
                     'reason': s['reason']})
    for s in sorted(results['samples'], key=lambda s: (analysis.sort_key(analysis.cell_key(s)),
                                                       s['session'])):
        row = {k: s.get(k) for k in ('model', 'ctx', 'backend', 'mode', 'session', 'status',
                                     'reason', 'steps', 'warmup', 'floor_ms_peak',
                                     'floor_ms_copy', 'bytes_per_step', 'energy_j',
                                     'joules_per_token')}
        row.update(analysis.key_dict(analysis.cell_key(s)))
        if s.get('status') == 'ok':
            summary = stats.summarize(s['step_ms'])
            median = summary['median']
            row.update(median_ms=median, mean_ms=summary['mean'], p90_ms=summary['p90'],
                       min_ms=summary['min'], max_ms=summary['max'],
                       copy_fraction=s['floor_ms_copy'] / median,
                       copy_bandwidth_gbs=s['copy_bandwidth'] / 1e9)
            if s.get('floor_ms_peak') is not None:
                row['floor_fraction'] = s['floor_ms_peak'] / median
                row['peak_bandwidth_gbs'] = s['peak_bandwidth'] / 1e9
            after = s.get('nvml_after') or {}
            before = s.get('nvml_before') or {}
            for key in ('sm_clock_mhz', 'mem_clock_mhz', 'temperature_c', 'power_w'):
                row[key] = after.get(key)
            reasons = sorted(set(before.get('throttle_reasons', []))
                             | set(after.get('throttle_reasons', [])))
            row['throttle_reasons'] = ' '.join(reasons)
        rows.append(row)
    return rows


def write_csv(path, results):
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in csv_rows(results):
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})


def _csv_value(v):
    if v is None:
        return ''
    if isinstance(v, float):
        return f'{v:.6g}'
    return v


def summary_rows(cells, speedups, quantised_rows=(), slowdowns=()):
    """One row per measured cell (the committed summary.json).

    A graph cell's row carries its graph speedup; an int8/int4 cell's row carries its speedup
    over bf16 and the byte ratio (the quantised section's row); a cell beside a co-runner its
    slowdown against the same cell alone: the file stays one row per cell.
    """
    speed = {analysis.graph_key(s): s for s in speedups}
    quant = quantised.summary_fields(quantised_rows)
    slow = {analysis.cell_key(r): r['slowdown'] for r in slowdowns}
    rows = []
    for c in cells:
        row = {**analysis.key_dict(analysis.cell_key(c)),
               'ms_per_step': c['ms_per_step'].value,
               'ms_per_step_ci': [c['ms_per_step'].lo, c['ms_per_step'].hi],
               'floor_ms': c['floor_ms_peak'] if c['floor_ms_peak'] is not None
               else c['floor_ms_copy'],
               'floor_fraction': _value(c['floor_fraction']),
               'copy_fraction': _value(c['copy_fraction']),
               'joules_per_token': _value(c['joules_per_token']),
               'sessions': c['sessions']}
        s = speed.get(analysis.graph_key(c))
        if c['mode'] == 'graph' and s is not None:
            row['graph_speedup'] = s['speedup'].value
            row['graph_speedup_ci'] = [s['speedup'].lo, s['speedup'].hi]
        row.update(quant.get(analysis.cell_key(c), {}))
        if analysis.cell_key(c) in slow:
            est = slow[analysis.cell_key(c)]
            row['co_runner_slowdown'] = est.value
            row['co_runner_slowdown_ci'] = [est.lo, est.hi]
        rows.append({k: _clean(v) for k, v in row.items()})
    return rows


def _value(est):
    return None if est is None else est.value


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


# -- Markdown ------------------------------------------------------------------------------------
def _fmt(v, digits=3):
    return '—' if v is None else f'{v:.{digits}f}'


def results_table(cells, speedups, confidence):
    speed = {analysis.graph_key(s): s for s in speedups}
    ci = f'{confidence:.0%} CI'
    axes = analysis.varied_axes(cells)
    names, align = analysis.key_columns(axes)
    lines = [f'| {names} | ms/step [{ci}] | floor ms | % of floor '
             f'| % of copy ceiling | J/token [{ci}] | graph speedup [{ci}] | N |',
             f'|{align}|---:|---:|---:|---:|---:|---:|---:|']
    for c in cells:
        s = speed.get(analysis.graph_key(c))
        speedup = stats.format_ratio(s['speedup']) if c['mode'] == 'graph' and s else '—'
        floor = c['floor_ms_peak'] if c['floor_ms_peak'] is not None else c['floor_ms_copy']
        jpt = c['joules_per_token']  # None without NVML
        lines.append(
            f"| {analysis.key_cells(c, axes)} "
            f"| {stats.format_estimate(c['ms_per_step'], 3)} | {_fmt(floor)} "
            f"| {stats.format_percent(c['floor_fraction'])} "
            f"| {stats.format_percent(c['copy_fraction'])} "
            f"| {stats.format_estimate(jpt, 2)} | {speedup} | {c['sessions']} |")
    return '\n'.join(lines)


def _environment_table(results):
    env = results.get('environment', {})
    grid = results.get('grid', {})
    rows = [('device', env.get('device_name')), ('GPU UUID', env.get('gpu_uuid')),
            ('driver', env.get('driver')), ('CUDA', env.get('cuda')),
            ('torch', env.get('torch')), ('transformers', env.get('transformers')),
            ('decode_monitor', env.get('package_version')), ('python', env.get('python')),
            ('peak bandwidth (GB/s)', _gbs(env.get('peak_bandwidth'))),
            ('peak bandwidth source', env.get('peak_source')),
            ('copy bandwidth (GB/s), median of sessions', _gbs(_copy_bw(results))),
            ('dtype', grid.get('dtype')),
            ('weight formats', ', '.join(grid.get('weights') or ['bf16'])),
            ('sessions × steps (warm-up)',
             f"{grid.get('sessions')} × {grid.get('steps')} ({grid.get('warmup')})"),
            ('cell order', grid.get('order')),
            ('NVML energy counter period (ms), median of sessions',
             _fmt(_session_median(results, 'energy_counter_period_ms'), 0)),
            ('energy window per cell (s), median', _fmt(_energy_window(results), 2)),
            ('created (UTC)', env.get('created')),
            ('command', f"`{env.get('command')}`" if env.get('command') else None)]
    lines = ['| | |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in rows if v not in (None, '—')]
    return '\n'.join(lines)


def _gbs(v):
    return None if v is None else f'{v / 1e9:.0f}'


def _session_median(results, key):
    values = [s[key] for s in results.get('sessions', []) if s.get(key) is not None]
    return statistics.median(values) if values else None


def _energy_window(results):
    values = [s['energy_window_s'] for s in results['samples'] if s.get('energy_window_s')]
    return statistics.median(values) if values else None


def _copy_bw(results):
    values = [s['copy_bandwidth'] for s in results.get('sessions', [])
              if s.get('copy_bandwidth')]
    return statistics.median(values) if values else None


def _key_head(records):
    """(axes, header cells, alignment) for a table of these records' keys."""
    axes = analysis.varied_axes(records)
    return (axes, *analysis.key_columns(axes))


def co_runner_section(rows, confidence):
    """The report's section (a list of lines): step time alone and beside each co-runner."""
    if not rows:
        return []
    ci = f'{confidence:.0%} CI'
    axes, names, align = _key_head(rows)
    lines = ['', '## Step time per co-runner', '',
             'Step time while another process loads the device (co-runner: `copy` a '
             'device-copy loop, `matmul` a matmul loop, `idle` a context and buffers, or a '
             'command), against the same cell alone (co-runner none); slowdown = step time '
             f'beside it / alone, paired by session ({ci}). The co-runner starts before the '
             'warm-up and stops after the timed steps; its rate is in results.json.', '',
             f'| {names} | alone ms/step | ms/step | slowdown [{ci}] | N |',
             f'|{align}|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {analysis.key_cells(r, axes)} | {r['alone_ms']:.3f} "
                     f"| {r['co_runner_ms']:.3f} | {stats.format_ratio(r['slowdown'])} "
                     f"| {r['pairs']} |")
    return lines


def profile_section(profiles):
    profiles = sorted(profiles, key=lambda p: analysis.sort_key(analysis.cell_key(p)))
    ok = [p for p in profiles if p.get('status') == 'ok']
    lines = []
    if ok:
        source = ok[0]['anatomy'].get('source', 'kernels')
        header = ' | '.join(CLASS_LABELS[c] for c in CLASSES)
        axes, names, align = _key_head(ok)
        lines += [f'Time per decode step by class ({source}; ms, mean over the profiled steps). '
                  'Idle = span between the first and last event minus the time any event ran; '
                  'the profiler itself adds host-side time, so idle is an upper bound.', '',
                  f'| {names} | span ms | busy ms | idle ms (%) '
                  f'| events | {header} |',
                  f'|{align}|---:|---:|---:|---:|' + '---:|' * len(CLASSES)]
        for p in ok:
            a = p['anatomy']
            classes = ' | '.join(f"{a['by_class_ms'][c]:.3f}" for c in CLASSES)
            lines.append(f"| {analysis.key_cells(p, axes)} | {a['span_ms']:.3f} "
                         f"| {a['busy_ms']:.3f} "
                         f"| {a['idle_ms']:.3f} ({a['idle_fraction']:.0%}) "
                         f"| {a['events_per_step']:.0f} | {classes} |")
        lines += ['', 'Longest events per step:', '']
        for p in ok:
            top = ', '.join(f"`{t['name'][:60]}` {t['ms_per_step']:.3f} ms"
                            for t in p['anatomy']['top'][:4])
            lines.append(f"- {analysis.key_words(p)}: {top}")
    for p in profiles:
        if p.get('status') != 'ok':
            lines.append(f"- {analysis.key_words(p)}: {p['status']} ({p.get('reason')})")
    return '\n'.join(lines)


def _kernel_configs_lines(results):
    """The kernel-config tables the fused cells launched with (bench tune writes them)."""
    sources = sorted({s['kernel_configs'] for s in results.get('samples', ())
                      if s.get('kernel_configs')})
    return ['', *(f'kernel configs: {source}' for source in sources)] if sources else []


def markdown(results, cells, speedups, verdict=None, plots=(), confidence=0.95,
             quantised_rows=(), slowdowns=()):
    parts = ['# Decode bench report', '',
             'Decode step time per cell (batch 1 unless a batch column says otherwise): '
             'per-session medians of the timed steps (device events, warm-up discarded), then '
             'the mean over fresh sessions with a '
             f'{confidence:.0%} bootstrap CI. Floor = bytes a step must move (weights, lm_head '
             'in full, one embedding row, the valid KV prefix and the new K/V) over peak '
             'bandwidth; % of floor = floor / step time. The copy ceiling uses the measured '
             'device-to-device copy bandwidth instead. Graph speedup = eager / graph step '
             'time, paired by session. Weights = the format of the stored weights: bf16 = '
             'unquantised (the run\'s dtype), int8/int4 = weight-only quantised (backend '
             'fused), the floor counting their bytes as stored.', '', '## Environment', '',
             _environment_table(results), *_kernel_configs_lines(results),
             '', '## Results', '']
    if results.get('environment', {}).get('peak_bandwidth') is None:
        parts += ['No peak bandwidth is known for this device (no NVML, no override): the floor '
                  'column uses the measured copy bandwidth and % of floor is not given.', '']
    if 'batch' in analysis.varied_axes(cells):
        parts += ['A cell of batch b steps b sequences, each with ctx tokens in its K/V cache: '
                  'the floor counts the weights once and the K/V of every sequence; J/token '
                  'divides by the b tokens a step makes.', '']
    parts.append(results_table(cells, speedups, confidence) if cells else 'No cell was measured.')
    parts += quantised.markdown_section(quantised_rows, confidence)
    parts += co_runner_section(slowdowns, confidence)
    parts += ttft.markdown_section(results.get('ttft', []))
    skipped = analysis.skipped_cells(results)
    if skipped:
        axes, names, align = _key_head(skipped)
        parts += ['', '## Skipped cells', '',
                  f'| {names} | status | reason |',
                  f'|{align}|---|---|']
        parts += [f"| {analysis.key_cells(s, axes)} | {s['status']} | {s['reason']} |"
                  for s in skipped]
    if any(c['joules_per_token'] is not None for c in cells):
        parts += ['', 'J/token = NVML energy-counter difference over the warm-up and timed steps '
                  'of a cell, divided by their number. The counter advances in steps (period '
                  'in the environment table), so a window of a few periods carries an error of '
                  'up to one period\'s energy.']
    notes = list(results.get('notes', []))
    if notes:
        parts += ['', '## Notes', ''] + [f'- {n}' for n in notes]
    throttled = [c for c in cells if c['throttle_reasons']]
    if throttled:
        parts += ['', '## Throttling', '']
        parts += [f"- {analysis.key_words(c)}: {', '.join(c['throttle_reasons'])}"
                  f" (sessions {', '.join(map(str, c['throttled_sessions']))})"
                  for c in throttled]
    if results.get('profile'):
        parts += ['', '## Decode-step anatomy (--profile)', '',
                  profile_section(results['profile'])]
    if plots:
        parts += ['', '## Plots', '']
        parts += [f'![{os.path.splitext(p)[0]}]({p})' for p in plots]
    if verdict is not None:
        parts += ['', '## Verdict', '', verdict_text(verdict)]
    return '\n'.join(parts) + '\n'


def verdict_text(verdict):
    lines = [f"**{'PASS' if verdict['passed'] else 'FAIL'}**"
             + (f" — {'; '.join(verdict['reasons'])}" if verdict['reasons'] else '')]
    t = verdict['thresholds']
    lines.append(f"Thresholds: min fraction of floor {t['min_floor_fraction'] or 'none'}, "
                 f"max ms/step {t['max_step_ms']}, throttling "
                 f"{'allowed' if t['allow_throttling'] else 'not allowed'}"
                 + (f", reference {t['reference']} (tolerance {t['reference_tolerance']:.0%})"
                    if t['reference'] else ''))
    axes, names, align = _key_head(verdict['cells'])
    lines += ['', f'| {names} | ms/step | result | reasons |', f'|{align}|---:|---|---|']
    for c in verdict['cells']:
        lines.append(f"| {analysis.key_cells(c, axes)} | {_fmt(c.get('ms_per_step'))} "
                     f"| {'pass' if c['passed'] else 'FAIL'} | {'; '.join(c['reasons'])} |")
    return '\n'.join(lines)


def write_all(out_dir, results, cells, speedups, verdict, plots, confidence,
              quantised_rows=(), slowdowns=()):
    write_json(os.path.join(out_dir, 'results.json'), results)
    write_csv(os.path.join(out_dir, 'results.csv'), results)
    write_json(os.path.join(out_dir, 'summary.json'),
               summary_rows(cells, speedups, quantised_rows, slowdowns))
    with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
        f.write(markdown(results, cells, speedups, verdict, plots, confidence, quantised_rows,
                         slowdowns))
