"""From raw samples to per-cell statistics, graph speedups and run-to-run comparisons.

A cell is (model, ctx, backend, mode, weights, batch, co_runner). Results written before an
axis existed have no field for it, and read as its only value then: weights 'bf16', batch 1,
co_runner 'none'.
"""
from collections import defaultdict
import statistics

from decode_monitor.bench.grid import WEIGHTS
from decode_monitor.telemetry import stats

MODE_ORDER = {'eager': 0, 'graph': 1}
WEIGHTS_ORDER = {w: i for i, w in enumerate(WEIGHTS)}  # most bytes first
KEY_FIELDS = ('model', 'ctx', 'backend', 'mode', 'weights', 'batch', 'co_runner')
# The axes beyond the first five: a report shows their columns only when a run varies them.
AXES = ('batch', 'co_runner')
AXIS_DEFAULTS = {'batch': 1, 'co_runner': 'none'}


def weights_of(record):
    return record.get('weights') or 'bf16'


def batch_of(record):
    return record.get('batch') or 1


def co_runner_of(record):
    return record.get('co_runner') or 'none'


def cell_key(sample):
    return (sample['model'], sample['ctx'], sample['backend'], sample['mode'],
            weights_of(sample), batch_of(sample), co_runner_of(sample))


def key_dict(key):
    return dict(zip(KEY_FIELDS, key))


def sort_key(key):
    model, ctx, backend, mode, weights, batch, co_runner = key
    return (model, ctx, backend, MODE_ORDER.get(mode, 9), mode,
            WEIGHTS_ORDER.get(weights, 9), weights, batch, co_runner != 'none', co_runner)


def varied_axes(records):
    """The axes (of AXES) on which some record is not at its default, in AXES order."""
    return tuple(a for a in AXES if any(
        key_dict(cell_key(r))[a] != AXIS_DEFAULTS[a] for r in records))


# A Markdown table's key columns: the first five always, batch and co-runner when varied.
_AXIS_COLUMNS = {'batch': ('batch', '---:'), 'co_runner': ('co-runner', '---')}


def key_columns(axes):
    """(header cells, alignment cells) of a key: 'model | ctx | ...', '---|---:|...'."""
    names = ['model', 'ctx', 'backend', 'mode', 'weights'] + [_AXIS_COLUMNS[a][0] for a in axes]
    align = ['---', '---:', '---', '---', '---'] + [_AXIS_COLUMNS[a][1] for a in axes]
    return ' | '.join(names), '|'.join(align)


def key_cells(record, axes=AXES):
    """A record's key as Markdown table cells: 'm | 2048 | hf | eager | bf16[ | 8][ | copy]'."""
    key = key_dict(cell_key(record))
    return ' | '.join(str(key[f]) for f in KEY_FIELDS[:5] + tuple(axes))


def key_words(record):
    """A record's key in words: 'm ctx 2048 hf eager bf16', '... batch 8', '... + copy'."""
    key = key_dict(cell_key(record))
    words = f"{key['model']} ctx {key['ctx']} {key['backend']} {key['mode']} {key['weights']}"
    if key['batch'] != 1:
        words += f" batch {key['batch']}"
    if key['co_runner'] != 'none':
        words += f" + co-runner {key['co_runner']}"
    return words


def session_median(sample):
    return statistics.median(sample['step_ms'])


def ok_samples(results):
    return [s for s in results['samples'] if s.get('status') == 'ok']


def _est(values, confidence, resamples, seed):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return stats.mean_ci(values, confidence, resamples, seed)


def _throttle(samples):
    reasons = set()
    sessions = set()
    for s in samples:
        for key in ('nvml_before', 'nvml_after'):
            reading = s.get(key) or {}
            if reading.get('throttled'):
                from decode_monitor.telemetry.gpu import PERFORMANCE_THROTTLES
                reasons.update(r for r in reading.get('throttle_reasons', [])
                               if r in PERFORMANCE_THROTTLES)
                sessions.add(s['session'])
    return sorted(reasons), sorted(sessions)


def _mean_of(samples, key, field, reduce=statistics.fmean):
    values = [(s.get(key) or {}).get(field) for s in samples]
    values = [v for v in values if v is not None]
    return reduce(values) if values else None


def cell_stats(results, confidence=0.95, resamples=9999):
    """One dict per measured cell: per-session medians -> mean with a bootstrap CI, and more."""
    groups = defaultdict(list)
    for s in ok_samples(results):
        groups[cell_key(s)].append(s)
    out = []
    for seed, key in enumerate(sorted(groups, key=sort_key)):
        samples = sorted(groups[key], key=lambda s: s['session'])
        medians = [session_median(s) for s in samples]
        floor_peak = [s.get('floor_ms_peak') for s in samples]
        floor_copy = [s['floor_ms_copy'] for s in samples]
        frac_peak = [f / m if f is not None else None for f, m in zip(floor_peak, medians)]
        frac_copy = [f / m for f, m in zip(floor_copy, medians)]
        reasons, throttled_sessions = _throttle(samples)
        est = _est(medians, confidence, resamples, seed)
        out.append({
            **key_dict(key), 'sessions': len(samples), 'session_medians_ms': medians,
            'ms_per_step': est,
            'session_cv': (statistics.stdev(medians) / est.value if len(medians) > 1
                           else None),
            'floor_ms_peak': _mean([f for f in floor_peak if f is not None]),
            'floor_ms_copy': _mean(floor_copy),
            'floor_fraction': _est(frac_peak, confidence, resamples, seed),
            'copy_fraction': _est(frac_copy, confidence, resamples, seed),
            'joules_per_token': _est([s.get('joules_per_token') for s in samples],
                                     confidence, resamples, seed),
            'sm_clock_mhz': _mean_of(samples, 'nvml_after', 'sm_clock_mhz'),
            'mem_clock_mhz': _mean_of(samples, 'nvml_after', 'mem_clock_mhz'),
            'temperature_c_max': _mean_of(samples, 'nvml_after', 'temperature_c', max),
            'power_w': _mean_of(samples, 'nvml_after', 'power_w'),
            'throttle_reasons': reasons, 'throttled_sessions': throttled_sessions,
        })
    return out


def _mean(values):
    return statistics.fmean(values) if values else None


GRAPH_FIELDS = tuple(f for f in KEY_FIELDS if f != 'mode')


def graph_key(cell):
    """What a graph speedup is per: the cell without its mode."""
    return (cell['model'], cell['ctx'], cell['backend'], weights_of(cell), batch_of(cell),
            co_runner_of(cell))


def _graph_sort_key(key):
    model, ctx, backend, weights, batch, co_runner = key
    return sort_key((model, ctx, backend, '', weights, batch, co_runner))


def speedups(results, confidence=0.95, resamples=9999):
    """Graph over eager per (model, ctx, backend, weights): paired by session, eager / graph ms."""
    by_session = defaultdict(dict)
    for s in ok_samples(results):
        by_session[graph_key(s)].setdefault(s['session'], {})[s['mode']] = session_median(s)
    out = []
    for seed, key in enumerate(sorted(by_session, key=_graph_sort_key)):
        pairs = [v for _, v in sorted(by_session[key].items()) if 'eager' in v and 'graph' in v]
        if not pairs:
            continue
        eager = [p['eager'] for p in pairs]
        graph = [p['graph'] for p in pairs]
        out.append({**dict(zip(GRAPH_FIELDS, key)), 'pairs': len(pairs),
                    'speedup': stats.paired_ratio_ci(eager, graph, confidence, resamples,
                                                     seed)})
    return out


CO_RUNNER_FIELDS = tuple(f for f in KEY_FIELDS if f != 'co_runner')


def co_runner_slowdowns(results, confidence=0.95, resamples=9999):
    """Step time beside each co-runner over the step time alone (co_runner none), per cell.

    Paired by session, as the graph speedup is: both ran in the same process, so what the
    session shares cancels out of the CI. One row per cell with a co-runner and a baseline.
    """
    by_session = defaultdict(lambda: defaultdict(dict))  # cell without co-runner -> session
    for s in ok_samples(results):
        key = cell_key(s)[:-1]
        by_session[key][s['session']][co_runner_of(s)] = session_median(s)
    rows = []
    keys = sorted(((*k, r) for k, sessions in by_session.items()
                   for r in {r for v in sessions.values() for r in v} if r != 'none'),
                  key=sort_key)
    for seed, key in enumerate(keys):
        sessions = by_session[key[:-1]]
        pairs = [v for _, v in sorted(sessions.items()) if 'none' in v and key[-1] in v]
        if not pairs:
            continue
        alone = [p['none'] for p in pairs]
        loaded = [p[key[-1]] for p in pairs]
        rows.append({**key_dict(key), 'pairs': len(pairs), 'alone_ms': statistics.fmean(alone),
                     'co_runner_ms': statistics.fmean(loaded),
                     'slowdown': stats.paired_ratio_ci(loaded, alone, confidence, resamples,
                                                       seed)})
    return rows


def compare(results_a, results_b, confidence=0.95, resamples=9999):
    """Per cell present in both: B's ms/step over A's (sessions resampled independently)."""
    def medians(results):
        groups = defaultdict(list)
        for s in ok_samples(results):
            groups[cell_key(s)].append(session_median(s))
        return groups
    a, b = medians(results_a), medians(results_b)
    rows = []
    for seed, key in enumerate(sorted(set(a) & set(b), key=sort_key)):
        rows.append({**key_dict(key),
                     'a_ms': statistics.fmean(a[key]), 'b_ms': statistics.fmean(b[key]),
                     'ratio': stats.ratio_ci(b[key], a[key], confidence, resamples, seed)})
    only_a = sorted(set(a) - set(b), key=sort_key)
    only_b = sorted(set(b) - set(a), key=sort_key)
    return rows, only_a, only_b


def skipped_cells(results):
    """Cells never measured: skipped by the pre-check, or skipped/failed in every session."""
    measured = {cell_key(s) for s in ok_samples(results)}
    out = {}
    for s in results.get('skipped', []):
        out[cell_key(s)] = {'status': 'skipped', 'reason': s['reason'], 'sessions': None}
    for s in results['samples']:
        key = cell_key(s)
        if s.get('status') == 'ok' or key in measured:
            continue
        entry = out.setdefault(key, {'status': s['status'], 'reason': s.get('reason'),
                                     'sessions': 0})
        if entry['sessions'] is not None:
            entry['sessions'] += 1
        if s['status'] == 'error':
            entry['status'] = 'error'
    return [dict(key_dict(k), **v) for k, v in sorted(out.items(), key=lambda kv: sort_key(kv[0]))]


def failed_samples(results):
    """Errors in cells that were measured in other sessions (they still fail a verdict)."""
    return [s for s in results['samples'] if s.get('status') == 'error']
