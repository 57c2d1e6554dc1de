"""The study's figures from bench results: one run, or several runs on different GPUs.

Every figure is a function `fn(runs, out_dir) -> [written paths]`; `runs` are loaded
results.json dicts (`load` adds `results_path`, where a run's traces are looked up). A figure
whose data the runs do not hold writes nothing, returns [] and says why (logger
`decode_monitor.bench.figures`, at INFO: `bench figures` prints it, a bench run's report stays
quiet). Each figure is split into `<name>_data(runs)` (the numbers it plots) and the drawing, so
what a figure shows can be checked against the results it came from.

- the ladder: achieved fraction of the memory floor (bytes per step / the GPU's NVML peak
  bandwidth / step time) against that peak, one point per GPU and (backend, mode, weights),
  the median over its (model, ctx) cells with their spread; batch-1 decode alone on the GPU.
- step-time distributions: per cell, every timed step of every fresh session, eager beside
  graph (one PNG per device).
- cost per million tokens: a price per GPU-hour (the grid's `price_per_gpu_hour`, or
  `bench figures --price-per-gpu-hour`) over each cell's tokens per hour, beside J/token where
  the run read the NVML energy counter. No price is built in.
- a decoder block's kernels on a time axis: in figures_trace.
- the batch and co-runner axes and `bench attention` files: in figures_axes (draw adds them).
"""
from collections import defaultdict
import logging
import os
import re
import statistics

from decode_monitor.bench import analysis
from decode_monitor.bench.drawing import plt, save
from decode_monitor.bench.verdict import load_run

log = logging.getLogger(__name__)

LADDER = 'ladder.png'
DISTRIBUTIONS = 'step_time_distributions'  # + '.png', or '-<device>.png' for several devices
COST = 'cost_per_mtok.png'
_MODE_COLOURS = {'eager': 'tab:orange', 'graph': 'tab:blue'}
_MODE_MARKERS = {'eager': 'o', 'graph': 's'}


def load(paths, price_per_gpu_hour=None):
    """results.json or `bench attention` files -> runs; an unreadable file is a
    VerdictUsageError naming it.

    price_per_gpu_hour: replaces every run's grid price (the cost figure's).
    """
    runs = []
    for path in paths:
        run = load_run(path)
        run['results_path'] = os.path.abspath(path)
        if price_per_gpu_hour is not None:
            run['grid'] = dict(run.get('grid') or {}, price_per_gpu_hour=price_per_gpu_hour)
        runs.append(run)
    return runs


def skip(figure, reason):
    log.info('%s: %s', figure, reason)
    return []


def device_of(run):
    return (run.get('environment') or {}).get('device_name') or 'unknown device'


def slug(text):
    return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_') or 'device'


def series_label(backend, mode, weights):
    return f'{backend} {mode}' + ('' if weights == 'bf16' else f' {weights}')


def batch1_alone(sample):
    """Decode of one stream with nothing else on the GPU (what the ladder and costs are of)."""
    return (sample.get('batch') or 1) == 1 and sample.get('co_runner') in (None, 'none')


def _cell_samples(run):
    groups = defaultdict(list)
    for s in analysis.ok_samples(run):
        groups[analysis.cell_key(s)].append(s)
    return groups


# -- the ladder ------------------------------------------------------------------------------
def _nvml_peak(run):
    """The GPU's peak bandwidth (bytes/s) as NVML reports it; None without one."""
    env = run.get('environment') or {}
    if env.get('peak_bandwidth') and env.get('peak_source', 'nvml') == 'nvml':
        return env['peak_bandwidth']
    return None


def ladder_data(runs):
    """-> [{'series', 'device', 'peak_tbs', 'median', 'lo', 'hi', 'cells': {(model, ctx): f}}]

    A cell's fraction is the mean over its sessions of bytes per step / NVML peak / median step
    time. Runs of the same device are pooled into one point.
    """
    by_point = defaultdict(lambda: defaultdict(list))  # (series, device, peak) -> cell -> [f]
    for run in runs:
        peak = _nvml_peak(run)
        if peak is None:
            skip('ladder', f'{run.get("results_path", device_of(run))}: no NVML peak bandwidth '
                 f'({device_of(run)}); left out')
            continue
        for s in analysis.ok_samples(run):
            if not batch1_alone(s) or not s.get('bytes_per_step'):
                continue
            model, ctx, backend, mode, weights = analysis.cell_key(s)[:5]
            fraction = s['bytes_per_step'] / peak / (analysis.session_median(s) * 1e-3)
            by_point[((backend, mode, weights), device_of(run), peak)][(model, ctx)].append(
                fraction)
    points = []
    for (series, device, peak), cells in by_point.items():
        means = {cell: statistics.fmean(v) for cell, v in sorted(cells.items())}
        values = list(means.values())
        points.append({'series': series, 'device': device, 'peak_tbs': peak / 1e12,
                       'median': statistics.median(values), 'lo': min(values),
                       'hi': max(values), 'cells': means})
    return sorted(points, key=lambda p: (_series_order(p['series']), p['peak_tbs']))


def _series_order(series):
    backend, mode, weights = series
    return (backend, analysis.MODE_ORDER.get(mode, 9), mode,
            analysis.WEIGHTS_ORDER.get(weights, 9), weights)


def ladder_figure(points):
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    series = list(dict.fromkeys(p['series'] for p in points))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for i, key in enumerate(series):
        pts = sorted((p for p in points if p['series'] == key), key=lambda p: p['peak_tbs'])
        colour = colours[i % len(colours)]
        label = series_label(*key)
        x = [p['peak_tbs'] for p in pts]
        y = [p['median'] * 100 for p in pts]
        for p in pts:
            ax.scatter([p['peak_tbs']] * len(p['cells']), [f * 100 for f in p['cells'].values()],
                       s=10, alpha=0.35, color=colour, gid=f'cells {label} {p["device"]}')
        ax.errorbar(x, y, yerr=[[(p['median'] - p['lo']) * 100 for p in pts],
                                [(p['hi'] - p['median']) * 100 for p in pts]],
                    color=colour, capsize=4, linewidth=1.2, alpha=0.8)
        ax.scatter(x, y, s=45, color=colour, zorder=3, label=f'{label} (median of cells)',
                   marker=_MODE_MARKERS.get(key[1], '^'), gid=f'ladder {label}')
    for peak, device in sorted({(p['peak_tbs'], p['device']) for p in points}):
        ax.annotate(device.replace('NVIDIA ', ''), (peak, 100), textcoords='offset points',
                    xytext=(0, -12), ha='center', fontsize=8)
    ax.set_xlabel('peak memory bandwidth (TB/s, NVML)')
    ax.set_ylabel('achieved % of the memory floor')
    ax.set_ylim(0, 100)
    peaks = [p['peak_tbs'] for p in points]
    pad = max(0.4, 0.1 * (max(peaks) - min(peaks)))
    ax.set_xlim(min(peaks) - pad, max(peaks) + pad)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    ax.set_title('batch-1 decode: fraction of the memory floor per GPU '
                 '(bars: range over model × context)', fontsize=9)
    return fig


def ladder(runs, out_dir):
    points = ladder_data(runs)
    if not points:
        return skip('ladder', 'nothing drawn: no run has an NVML peak bandwidth and a measured '
                    'batch-1 cell')
    return [save(ladder_figure(points), out_dir, LADDER)]


# -- step-time distributions across fresh sessions --------------------------------------------
def distributions_data(run):
    """-> {(model, ctx, backend, weights): {mode: [(session, step_ms)]}} of one run."""
    out = defaultdict(lambda: defaultdict(list))
    for key, samples in sorted(_cell_samples(run).items(),
                               key=lambda kv: analysis.sort_key(kv[0])):
        model, ctx, backend, mode, weights = key[:5]
        group = (model, ctx, backend, weights) + tuple(key[5:])
        for s in sorted(samples, key=lambda s: s['session']):
            out[group][mode].append((s['session'], list(s['step_ms'])))
    return {g: dict(modes) for g, modes in out.items()}


def distributions_figure(groups, title):
    n = len(groups)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax, (group, modes) in zip(axes.flat, groups.items()):
        position, ticks = 0, []
        for mode in sorted(modes, key=lambda m: analysis.MODE_ORDER.get(m, 9)):
            colour = _MODE_COLOURS.get(mode, 'tab:green')
            for session, steps in modes[mode]:
                box = ax.boxplot([steps], positions=[position], widths=0.6, showfliers=False,
                                 patch_artist=True, whis=(5, 95))
                box['boxes'][0].set(facecolor=colour, alpha=0.35)
                box['medians'][0].set(color='black', gid=f'median {mode} s{session}')
                offsets = [position + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(steps))]
                ax.scatter(offsets, steps, s=3, color=colour, alpha=0.6,
                           gid=f'steps {mode} s{session}')
                ticks.append((position, f'{mode[0]}{session}'))
                position += 1
            position += 0.5
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([t[1] for t in ticks], fontsize=7)
        ax.set_ylabel('step time (ms)')
        model, ctx, backend, weights = group[:4]
        ax.set_title(f'{model} ctx {ctx} {backend}' + ('' if weights == 'bf16' else f' {weights}')
                     + ''.join(f' {v}' for v in group[4:]), fontsize=9)
        ax.grid(alpha=0.3, axis='y')
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f'{title}: step times per fresh session (e = eager, g = graph; box 25-75 %, '
                 'whiskers 5-95 %, points every timed step)', fontsize=9)
    return fig


def step_time_distributions(runs, out_dir):
    paths, used = [], set()
    for run in runs:
        groups = distributions_data(run)
        if not groups:
            skip('step-time distributions', f'{device_of(run)}: no measured cell')
            continue
        name = DISTRIBUTIONS
        if len(runs) > 1:
            name = f'{DISTRIBUTIONS}-{slug(device_of(run))}'
            name = name if name not in used else f'{name}-{len(used)}'
        used.add(name)
        paths.append(save(distributions_figure(groups, device_of(run)), out_dir, name + '.png'))
    return paths


# -- cost per million tokens --------------------------------------------------------------------
def price_of(run):
    return (run.get('grid') or {}).get('price_per_gpu_hour')


def cost_data(runs):
    """-> [{'device', 'cell', 'price_per_gpu_hour', 'tokens_per_s', 'cost_per_mtok',
    'joules_per_token'}]

    tokens/s = tokens per step / mean of the session medians (ms); cost per million tokens =
    price per hour / tokens per hour x 1e6, in the price's currency; J/token: the mean of the
    sessions' (None without NVML energy). Cells with a co-runner are left out.
    """
    rows = []
    for run in runs:
        price = price_of(run)
        if not price:
            skip('cost', f'{device_of(run)}: no price per GPU-hour (grid price_per_gpu_hour or '
                 '--price-per-gpu-hour); left out')
            continue
        for key, samples in sorted(_cell_samples(run).items(),
                                   key=lambda kv: analysis.sort_key(kv[0])):
            if samples[0].get('co_runner') not in (None, 'none'):
                continue
            ms = statistics.fmean(analysis.session_median(s) for s in samples)
            tokens_per_s = (samples[0].get('batch') or 1) * 1e3 / ms
            energy = [s['joules_per_token'] for s in samples if s.get('joules_per_token')]
            rows.append({'device': device_of(run), 'cell': key, 'price_per_gpu_hour': price,
                         'tokens_per_s': tokens_per_s,
                         'cost_per_mtok': price / (tokens_per_s * 3600) * 1e6,
                         'joules_per_token': statistics.fmean(energy) if energy else None})
    return rows


def cost_figure(rows):
    devices = len({r['device'] for r in rows})
    energy = any(r['joules_per_token'] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if energy else 1, figsize=(12 if energy else 7.5,
                             1.2 + 0.28 * len(rows)), squeeze=False, sharey=True)
    labels = [(f"{r['device'].replace('NVIDIA ', '')} | " if devices > 1 else '')
              + ' '.join(str(v) for v in r['cell']) for r in rows]
    y = list(range(len(rows)))[::-1]
    prices = sorted({r['price_per_gpu_hour'] for r in rows})
    panels = [('cost_per_mtok', 'cost per million tokens (at '
               f"{', '.join(f'{p:g}' for p in prices)} per GPU-hour)", 'tab:green', '{:.2f}')]
    if energy:
        panels.append(('joules_per_token', 'J per token (NVML energy)', 'tab:red', '{:.2f}'))
    for ax, (field, xlabel, colour, fmt) in zip(axes[0], panels):
        values = [r[field] if r[field] is not None else 0.0 for r in rows]
        bars = ax.barh(y, values, color=colour, alpha=0.7)
        for bar, r, v in zip(bars, rows, values):
            bar.set_gid(f'{field} {" ".join(map(str, r["cell"]))} {r["device"]}')
            ax.annotate(fmt.format(v) if r[field] is not None else '—', (v, bar.get_y()
                        + bar.get_height() / 2), xytext=(3, 0), textcoords='offset points',
                        va='center', fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(values) * 1.2 or 1)
        ax.grid(alpha=0.3, axis='x')
    axes[0][0].set_yticks(y)
    axes[0][0].set_yticklabels(labels, fontsize=7)
    fig.suptitle('batch-1 streaming decode: cost per million tokens served', fontsize=10)
    return fig


def cost(runs, out_dir):
    rows = cost_data(runs)
    if not rows:
        return skip('cost', 'nothing drawn: no run with a price per GPU-hour has a measured cell')
    return [save(cost_figure(rows), out_dir, COST)]


def kernel_timeline(runs, out_dir):
    """figures_trace.kernel_timeline (imported on use: that module draws with this one's
    helpers)."""
    from decode_monitor.bench import figures_trace
    return figures_trace.kernel_timeline(runs, out_dir)


FIGURES = (ladder, kernel_timeline, step_time_distributions, cost)
# What one run suffices for (a bench run's report.md): the ladder needs several GPUs.
REPORT_FIGURES = (kernel_timeline, step_time_distributions, cost)


def draw(runs, out_dir, figures=None):
    """Every figure the runs hold the data for; returns the written paths.

    figures: default all, this module's and figures_axes' (the batch and co-runner axes and
    `bench attention`, which also read attention files; this module's read bench results only).
    """
    from decode_monitor.bench import figures_axes
    if figures is None:
        figures = FIGURES + figures_axes.FIGURES_AXES
    results = [r for r in runs if 'samples' in r]
    paths = []
    for figure in figures:
        paths += figure(runs if figure in figures_axes.FIGURES_AXES else results, out_dir)
    return paths


def report_figures(results, results_path, out_dir):
    """The one-run figures of a bench run, as file names relative to out_dir (report.md)."""
    run = dict(results, results_path=os.path.abspath(results_path))
    from decode_monitor.bench.figures_axes import step_time_per_co_runner
    figures = REPORT_FIGURES + (step_time_per_co_runner,)
    return [os.path.relpath(p, out_dir) for p in draw([run], out_dir, figures)]
