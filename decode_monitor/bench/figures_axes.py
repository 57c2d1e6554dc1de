"""Figures of the batch and co-runner axes and of `bench attention` (matplotlib, Agg).

Each is `fn(runs, out_dir) -> [written paths]`: runs are loaded files (verdict.load_run): bench
results (they have "samples") and `bench attention` files (their "format" says so); a figure
takes the kind it draws from and returns [] when they hold nothing for it, saying why (as
figures.skip does).

- graph speedup against context and batch: eager / graph, paired by session,
  one line per batch size against context and one per context against batch size;
- step time per co-runner: a cell's mean step time alone and beside each co-runner, its
  slowdown over alone written on the bar;
- attention time per layer by implementation against context.

Several runs (several GPUs) share a figure; their series are named by device.
"""
from decode_monitor.bench import analysis
from decode_monitor.bench.drawing import error_bars, plt, save
from decode_monitor.bench.figures import skip
from decode_monitor.bench.verdict import ATTENTION_FORMAT

SPEEDUP_BATCH = 'graph_speedup_vs_batch.png'
CO_RUNNER = 'step_ms_per_co_runner.png'
ATTENTION = 'attention_per_layer.png'


def results_runs(runs):
    return [r for r in runs if isinstance(r, dict) and 'samples' in r]


def attention_runs(runs):
    return [r for r in runs if isinstance(r, dict) and r.get('format') == ATTENTION_FORMAT]


def _device(run):
    return (run.get('environment') or {}).get('device_name') or 'unknown device'


def _stats_params(run):
    grid = run.get('grid') or {}
    return grid.get('confidence', 0.95), min(grid.get('resamples', 2000), 2000)


def _log2_axis(ax, values, label):
    ax.set_xscale('log', base=2)
    ticks = sorted(set(values))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(v) for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel(label)


# -- graph speedup against context and batch ------------------------------------------------------
def graph_speedup_vs_batch(runs, out_dir):
    """Two panels per model: speedup vs context (a line per batch), vs batch (a line per ctx)."""
    rows = []  # (device, speedup row)
    for run in results_runs(runs):
        for s in analysis.speedups(run, *_stats_params(run)):
            if s['co_runner'] == 'none':
                rows.append((_device(run), s))
    if not rows:
        skip('graph speedup vs batch', 'no run has eager and graph cells of one model, context '
             'and batch, alone on the device')
        return []
    devices = sorted({d for d, _ in rows})
    models = sorted({s['model'] for _, s in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.0 * len(models)), squeeze=False)
    for (ax_ctx, ax_batch), model in zip(axes, models):
        mine = [(d, s) for d, s in rows if s['model'] == model]
        groups = sorted({(d, s['backend'], s['weights']) for d, s in mine})
        for ax, along, across, name in ((ax_ctx, 'ctx', 'batch', 'batch'),
                                        (ax_batch, 'batch', 'ctx', 'ctx')):
            for device, backend, weights in groups:
                series = [s for d, s in mine if (d, s['backend'], s['weights'])
                          == (device, backend, weights)]
                for value in sorted({s[across] for s in series}):
                    points = sorted((s for s in series if s[across] == value),
                                    key=lambda s: s[along])
                    ests = [s['speedup'] for s in points]
                    prefix = f'{device} ' if len(devices) > 1 else ''
                    group = '' if (backend, weights) == ('hf', 'bf16') else \
                        f"{backend}{'' if weights == 'bf16' else ' ' + weights} "
                    ax.errorbar([s[along] for s in points], [e.value for e in ests],
                                yerr=error_bars(ests), capsize=3, marker='o',
                                label=f'{prefix}{group}{name} {value}')
            ax.axhline(1.0, color='k', linewidth=0.8)
            _log2_axis(ax, [s[along] for _, s in mine],
                       'context (tokens)' if along == 'ctx' else 'batch (sequences per step)')
            ax.set_ylabel('CUDA-graph speedup (eager / graph)')
            ax.set_title(model)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(', '.join(devices), fontsize=10)
    return [save(fig, out_dir, SPEEDUP_BATCH)]


# -- step time per co-runner ----------------------------------------------------------------
def _co_runner_order(name):
    return (name != 'none', name)


def step_time_per_co_runner(runs, out_dir):
    """Grouped bars: per cell (without its co-runner), mean step time per co-runner with CI."""
    groups = {}  # (device, cell key without co-runner) -> {co_runner: cell}
    slow = {}  # (device, cell key) -> slowdown estimate
    for run in results_runs(runs):
        params = _stats_params(run)
        device = _device(run)
        for c in analysis.cell_stats(run, *params):
            key = analysis.cell_key(c)
            groups.setdefault((device, key[:-1]), {})[key[-1]] = c
        for r in analysis.co_runner_slowdowns(run, *params):
            slow[(device, analysis.cell_key(r))] = r['slowdown']
    groups = {k: v for k, v in groups.items() if any(r != 'none' for r in v)}
    if not groups:
        skip('step time per co-runner', 'no run has a measured cell beside a co-runner')
        return []
    devices = sorted({d for d, _ in groups})
    runners = sorted({r for v in groups.values() for r in v}, key=_co_runner_order)
    order = sorted(groups, key=lambda k: (k[0], analysis.sort_key((*k[1], ''))))
    width = 0.8 / len(runners)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.9 * len(order) * len(runners)), 4.5))
    for i, runner in enumerate(runners):
        xs, ests, present = [], [], []
        for x, key in enumerate(order):
            cell = groups[key].get(runner)
            if cell is not None:
                xs.append(x + (i - (len(runners) - 1) / 2) * width)
                ests.append(cell['ms_per_step'])
                present.append(key)
        bars = ax.bar(xs, [e.value for e in ests], width, yerr=error_bars(ests), capsize=3,
                      label=runner)
        for bar, key in zip(bars, present):
            est = slow.get((key[0], (*key[1], runner)))
            if est is not None:
                ax.annotate(f'{est.value:.2f}×', (bar.get_x() + bar.get_width() / 2,
                                                  bar.get_height()),
                            ha='center', va='bottom', fontsize=7, xytext=(0, 3),
                            textcoords='offset points')
    labels = []
    for device, key in order:
        words = analysis.key_words(analysis.key_dict((*key, 'none')))
        labels.append((f'{device}\n' if len(devices) > 1 else '') + words.replace(' ctx', '\nctx'))
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel('ms per decode step (mean of sessions)')
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis='y')
    ax.legend(title='co-runner', fontsize=8)
    ax.set_title('Step time per co-runner (slowdown over alone on the bars)', fontsize=10)
    fig.suptitle(', '.join(devices), fontsize=10)
    return [save(fig, out_dir, CO_RUNNER)]


# -- attention time per layer by implementation ---------------------------------------------------
def attention_per_layer(runs, out_dir):
    """A panel per `bench attention` file: µs per layer vs context, a line per implementation;
    the implementations that could not run are named under the panel."""
    runs = [r for r in attention_runs(runs) if any(x['status'] == 'ok' for x in r['rows'])]
    if not runs:
        skip('attention per layer', 'no `bench attention` file with a measured row')
        return []
    fig, axes = plt.subplots(1, len(runs), figsize=(6.0 * len(runs), 4.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        impls = list(dict.fromkeys(x['impl'] for x in run['rows']))
        missing = []
        for impl in impls:
            points = sorted((x['ctx'], x['us_per_layer']) for x in run['rows']
                            if x['impl'] == impl and x['status'] == 'ok')
            if not points:
                missing.append(impl)
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=impl)
        _log2_axis(ax, [x['ctx'] for x in run['rows']], 'context (tokens)')
        ax.set_yscale('log')
        ax.set_ylabel('attention µs per layer (1 query token)')
        shape = run.get('shape') or {}
        ax.set_title(f"{run.get('model')} ({shape.get('q_heads')} q / {shape.get('kv_heads')} kv "
                     f"heads, d {shape.get('head_dim')}), {run.get('dtype')}\n{_device(run)}",
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=8)
        if missing:
            ax.text(0.0, -0.22, 'unavailable here: ' + ', '.join(missing),
                    transform=ax.transAxes, fontsize=8, va='top')
    return [save(fig, out_dir, ATTENTION)]


FIGURES_AXES = (graph_speedup_vs_batch, step_time_per_co_runner, attention_per_layer)
