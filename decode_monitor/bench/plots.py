"""PNG plots of a bench run (matplotlib, Agg backend: no display needed)."""
import os

from decode_monitor.bench.analysis import WEIGHTS_ORDER
from decode_monitor.bench.drawing import error_bars, plt, save

STEP_MS = 'step_ms_vs_ctx.png'
FRACTION = 'floor_fraction_vs_ctx.png'
SPEEDUP = 'graph_speedup.png'
_MARKERS = {'eager': 'o', 'graph': 's'}
_LINESTYLES = {'bf16': '-', 'int8': '--', 'int4': ':'}
# The floor of each weight format: darker = more bytes.
_FLOOR_COLOURS = {'bf16': 'black', 'int8': 'dimgray', 'int4': 'darkgray'}


def _models(cells):
    return sorted({c['model'] for c in cells})


def _weights(record):
    return record.get('weights') or 'bf16'


def _extra(record):
    """A series' batch and co-runner: (batch, co_runner), (1, 'none') for older results."""
    return (record.get('batch') or 1, record.get('co_runner') or 'none')


def _series(cells, model):
    """(backend, mode, batch, co_runner, weights) -> sorted [(ctx, cell)]"""
    out = {}
    for c in cells:
        if c['model'] == model:
            out.setdefault((c['backend'], c['mode'], *_extra(c), _weights(c)),
                           []).append((c['ctx'], c))
    return {k: sorted(v, key=lambda t: t[0])
            for k, v in sorted(out.items(), key=lambda kv: _by_format(kv[0]))}


def _by_format(key):
    """Sort key of a tuple ending in a weight format: bf16, int8, int4 (most bytes first)."""
    return (*key[:-1], WEIGHTS_ORDER.get(key[-1], 9), key[-1])


def _label(backend, mode, batch=1, co_runner='none', weights='bf16'):
    return (f'{backend} {mode}' + ('' if weights == 'bf16' else f' {weights}')
            + ('' if batch == 1 else f' b{batch}')
            + ('' if co_runner == 'none' else f' +{co_runner}'))


def _ctx_axis(ax, contexts):
    """Log-2 context axis labelled with the grid's own contexts (2048, not 2^11)."""
    ax.set_xscale('log', base=2)
    ticks = sorted(set(contexts))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(c) for c in ticks])
    ax.minorticks_off()
    ax.set_xlabel('context (tokens)')


def _figure(n):
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    return fig, axes[0]


def step_ms_plot(cells, out_dir, title):
    models = _models(cells)
    fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        floors = {}  # (basis, weights) -> {ctx: ms}: quantised weights have their own floor
        for key, points in _series(cells, model).items():
            mode, batch, weights = key[1], key[2], key[-1]
            ctx = [p[0] for p in points]
            ests = [p[1]['ms_per_step'] for p in points]
            ax.errorbar(ctx, [e.value for e in ests], yerr=error_bars(ests), capsize=3,
                        marker=_MARKERS.get(mode, '^'), linestyle=_LINESTYLES.get(weights, '-'),
                        label=_label(*key))
            if batch != 1:
                continue  # the floor drawn is batch 1's
            for c, cell in points:
                floors.setdefault(('peak', weights), {})[c] = cell['floor_ms_peak']
                floors.setdefault(('copy', weights), {})[c] = cell['floor_ms_copy']
        for (basis, weights), by_ctx in sorted(floors.items(), key=lambda kv: _by_format(kv[0])):
            pts = sorted((c, f) for c, f in by_ctx.items() if f is not None)
            if pts:
                name = 'floor' if weights == 'bf16' else f'{weights} floor'
                ax.plot([p[0] for p in pts], [p[1] for p in pts],
                        '-' if basis == 'peak' else '--', linewidth=1,
                        color=_FLOOR_COLOURS.get(weights, 'black'),
                        label=f'{name} ({basis} bandwidth)')
        _ctx_axis(ax, [c['ctx'] for c in cells if c['model'] == model])
        ax.set_ylabel('ms per decode step')
        ax.set_ylim(bottom=0)
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, out_dir, STEP_MS)


def fraction_plot(cells, out_dir, title):
    models = _models(cells)
    fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        for series, points in _series(cells, model).items():
            mode, weights = series[1], series[-1]
            basis = 'peak' if points[0][1]['floor_fraction'] is not None else 'copy'
            key = 'floor_fraction' if basis == 'peak' else 'copy_fraction'
            ests = [p[1][key] for p in points]
            ax.errorbar([p[0] for p in points], [e.value * 100 for e in ests],
                        yerr=[[v * 100 for v in side] for side in error_bars(ests)], capsize=3,
                        marker=_MARKERS.get(mode, '^'), linestyle=_LINESTYLES.get(weights, '-'),
                        label=f'{_label(*series)} (vs {basis})')
        _ctx_axis(ax, [c['ctx'] for c in cells if c['model'] == model])
        ax.set_ylabel('achieved % of the memory floor')
        ax.set_ylim(0, 100)
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, out_dir, FRACTION)


def speedup_plot(speedups, out_dir, title):
    models = sorted({s['model'] for s in speedups})
    fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        series = sorted({(s['backend'], *_extra(s), _weights(s)) for s in speedups
                         if s['model'] == model}, key=_by_format)
        for key in series:
            rows = sorted((s for s in speedups if s['model'] == model
                           and (s['backend'], *_extra(s), _weights(s)) == key),
                          key=lambda s: s['ctx'])
            ests = [s['speedup'] for s in rows]
            weights = key[-1]
            name = ' '.join(_label(key[0], '', *key[1:]).split())
            ax.errorbar([s['ctx'] for s in rows], [e.value for e in ests], yerr=error_bars(ests),
                        capsize=4, marker='o', linestyle=_LINESTYLES.get(weights, '-'),
                        label=f'{name}: eager / graph')
        ax.axhline(1.0, color='k', linewidth=0.8)
        _ctx_axis(ax, [s['ctx'] for s in speedups if s['model'] == model])
        ax.set_ylabel('CUDA-graph speedup (×)')
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, out_dir, SPEEDUP)


def write_plots(out_dir, cells, speedups, device_name):
    """Write the plots there is data for; returns their file names."""
    if not cells:
        return []
    title = device_name or ''
    paths = [step_ms_plot(cells, out_dir, title), fraction_plot(cells, out_dir, title)]
    if speedups:
        paths.append(speedup_plot(speedups, out_dir, title))
    return [os.path.basename(path) for path in paths]
