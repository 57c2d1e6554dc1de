"""A decoder block's kernels on a time axis, from the Chrome traces `bench --profile` writes.

The events of a trace are the GPU's kernels, copies and fills (on a CPU: the outermost aten
operators, as in the step anatomy). A decode step runs the same block once per layer, so the
event names repeat with the block's length as their period: with the model's layer count
(recorded with the profile) the block is the longest period p that fits the events
(p <= events / (steps x layers)) and repeats for at least layers - 1 periods. The figure shows
the middle layer of that run, from its first event to the next layer's first: every gap in that
window is time the device (the CPU's operator stream) waited, the gaps CUDA graphs and fused
kernels close. One row per profiled (model, backend, mode, weights); a shared time axis.
"""
import gzip
import json
import os

from decode_monitor.bench import analysis
from decode_monitor.bench.drawing import plt, save
from decode_monitor.bench.figures import device_of, series_label, skip
from decode_monitor.bench.profile import CLASS_LABELS, CLASSES, classify

TIMELINE = 'layer_kernels.png'
GPU_CATEGORIES = ('kernel', 'gpu_memcpy', 'gpu_memset')
_CLASS_COLOURS = dict(zip(CLASSES, ('tab:blue', 'tab:red', 'tab:green', 'tab:orange',
                                    'tab:purple', 'tab:gray')))


class TraceError(ValueError):
    """A trace that cannot be read or holds no usable events."""


def read_trace(path):
    """-> (events [(name, start_us, dur_us)] sorted by start, source: 'gpu kernels' or
    'cpu operators')."""
    try:
        opener = gzip.open if path.endswith('.gz') else open
        with opener(path, 'rt', encoding='utf-8') as f:
            trace = json.load(f)
    except (OSError, EOFError, ValueError) as exc:
        raise TraceError(f'cannot read {path}: {exc}') from None
    raw = trace.get('traceEvents') if isinstance(trace, dict) else trace
    if not isinstance(raw, list):
        raise TraceError(f'{path}: not a Chrome trace (no traceEvents)')
    spans = [e for e in raw if isinstance(e, dict) and e.get('ph') == 'X'
             and isinstance(e.get('ts'), (int, float)) and isinstance(e.get('dur'), (int, float))]
    gpu = [(e['name'], float(e['ts']), float(e['dur'])) for e in spans
           if e.get('cat') in GPU_CATEGORIES]
    if gpu:
        return sorted(gpu, key=lambda e: e[1]), 'gpu kernels'
    ops = sorted((e for e in spans if e.get('cat') == 'cpu_op'
                  and str(e.get('name', '')).startswith('aten::')),
                 key=lambda e: (e['ts'], -e['dur']))
    outer, ends = [], {}
    for e in ops:  # an operator inside another one of its thread is part of it
        key = (e.get('pid'), e.get('tid'))
        if e['ts'] >= ends.get(key, float('-inf')):
            outer.append((e['name'], float(e['ts']), float(e['dur'])))
            ends[key] = e['ts'] + e['dur']
    if not outer:
        raise TraceError(f'{path}: no GPU kernels and no aten operators in the trace')
    return sorted(outer, key=lambda e: e[1]), 'cpu operators'


def block_period(names, layers, steps=1):
    """-> (period, first index of the repeating run, layers in the run); None if none is found.

    The longest period p <= len(names) / (steps x layers) whose names repeat (names[i] ==
    names[i + p]) over a run of at least (layers - 1) x p consecutive i; the first such run.
    """
    if layers < 2:
        return None
    for p in range(len(names) // (steps * layers), 0, -1):
        run = 0
        for i in range(len(names) - p):
            run = run + 1 if names[i] == names[i + p] else 0
            if run >= (layers - 1) * p:
                start = i - run + 1
                while start + run + p < len(names) and names[start + run] == \
                        names[start + run + p]:
                    run += 1
                return p, start, (run + p) // p
    return None


def one_layer(events, layers, steps=1):
    """The middle layer of the first repeating run: its events relative to its first one's
    start, the window to the next layer's first event, busy time and gaps (all in us)."""
    found = block_period([e[0] for e in events], layers, steps)
    if found is None:
        raise TraceError(f'no block of events repeats over {layers} layers')
    period, start, count = found
    first = start + (count // 2) * period
    t0 = events[first][1]  # relative times first: trace clocks count from ~1e12 us
    chosen = [(n, s - t0, d) for n, s, d in events[first:first + period]]
    end = (events[first + period][1] - t0 if first + period < len(events)
           else max(s + d for _, s, d in chosen))
    busy, cursor = 0.0, 0.0
    for _, s, d in chosen:  # union of the intervals, clipped to the window
        s, e = max(s, cursor), min(s + d, end)
        if e > s:
            busy += e - s
            cursor = e
    return {'events': chosen, 'window_us': end, 'busy_us': busy, 'gap_us': end - busy,
            'layer': count // 2, 'events_per_layer': period}


def _trace_path(run, entry):
    base = os.path.dirname(run['results_path']) if run.get('results_path') else '.'
    return os.path.join(base, entry['trace'])


def timeline_data(runs):
    """-> one row per profiled entry with a readable trace: its layer (see one_layer) and
    'label', 'device', 'source'."""
    rows = []
    for run in runs:
        entries = sorted((p for p in run.get('profile') or () if p.get('status') == 'ok'),
                         key=lambda p: analysis.sort_key(analysis.cell_key(p)))
        for entry in entries:
            words = ' '.join(map(str, analysis.cell_key(entry)))
            if not entry.get('trace') or not entry.get('layers'):
                skip('kernel timeline', f'{device_of(run)} {words}: no trace recorded (a run '
                     'with --profile from before traces were written)')
                continue
            steps = (entry.get('anatomy') or {}).get('steps', 1)
            try:
                events, source = read_trace(_trace_path(run, entry))
                layer = one_layer(events, entry['layers'], steps)
            except TraceError as exc:
                skip('kernel timeline', f'{device_of(run)} {words}: {exc}')
                continue
            model, ctx, backend, mode, weights = analysis.cell_key(entry)[:5]
            rows.append({**layer, 'device': device_of(run), 'source': source,
                         'label': f'{model} ctx {ctx}\n{series_label(backend, mode, weights)}'})
    return rows


def timeline_figure(rows):
    devices = len({r['device'] for r in rows})
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.75 * len(rows)))
    seen = set()
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        for name, start, dur in row['events']:
            kind = classify(name)
            ax.barh(y, dur, left=start, height=0.6, color=_CLASS_COLOURS[kind],
                    edgecolor='black', linewidth=0.3, gid=f'event {i} {name}',
                    label=CLASS_LABELS[kind] if kind not in seen else None)
            seen.add(kind)
        ax.plot([row['window_us']] * 2, [y - 0.4, y + 0.4], color='black', linewidth=1)
        ax.annotate(f"{row['window_us']:.0f} us, gaps {row['gap_us']:.0f} us "
                    f"({row['gap_us'] / row['window_us']:.0%})" if row['window_us'] else '',
                    (row['window_us'], y), xytext=(4, 0), textcoords='offset points',
                    va='center', fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([(r['device'].replace('NVIDIA ', '') + '\n' if devices > 1 else '')
                        + r['label'] for r in rows][::-1], fontsize=7)
    ax.set_xlim(0, max(r['window_us'] for r in rows) * 1.25)
    sources = ' / '.join(sorted({r['source'] for r in rows}))
    ax.set_xlabel(f'us from the layer\'s first event ({sources}); bar at the next layer\'s '
                  'first event')
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis='x')
    ax.set_title('one decoder layer (the middle one of a profiled step) on a time axis: '
                 'white space is idle', fontsize=9)
    return fig


def kernel_timeline(runs, out_dir):
    rows = timeline_data(runs)
    if not rows:
        return skip('kernel timeline', 'nothing drawn: no profiled cell with a readable trace '
                    '(bench --profile writes them)')
    return [save(timeline_figure(rows), out_dir, TIMELINE)]
