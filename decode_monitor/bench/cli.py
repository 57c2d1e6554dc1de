"""`bench`: the offline grid replay and hardware qualification (no ROS needed).

    bench [run] [--grid study|quick|FILE] [overrides...] [--profile] [--reference R.json]
    bench compare A.json B.json
    bench report results.json [--grid FILE] [--reference R.json] [-o DIR]
    bench figures RESULTS.json|ATTENTION.json... [-o DIR] [--price-per-gpu-hour PRICE]
    bench tune MODEL... [--weights bf16 int8 int4] [--budget-s S] [-o FILE]
    bench quality [--model M] [--backends B..] [--weights W..] [--tokens N] [-o FILE]
    bench attention [--model M] [--contexts CTX..] [--iters N] [-o FILE.json]

Exit code: 0 the verdict passed, 1 it failed (or the analysis broke: results.json holds every
sample, `bench report` reruns it), 2 usage error (bad grid, bad arguments, a reference that cannot
be used: refused before the first session), 130 interrupted outside the sessions (results.json
is written once they began).
"""
import argparse
import os
import signal
import sys
import threading
import traceback

from decode_monitor.bench import grid as grid_mod
from decode_monitor.bench.verdict import FAIL, PASS, USAGE, VerdictUsageError

DEFAULT_OUTPUT = 'bench-results'
INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


def _run_parser():
    p = argparse.ArgumentParser(
        prog='bench', description='Time decode steps over a grid of models, contexts, modes, '
        'backends, weight formats, batch sizes and co-runners in fresh processes; write '
        'results.json, results.csv, '
        'report.md, plots and a pass/fail verdict. Subcommands: compare A.json B.json; '
        'report results.json; figures RESULTS.json...; tune (the fused kernels\' configs); '
        'quality (agreement with transformers); attention (time per layer by attention '
        'implementation).')
    p.add_argument('--grid', default='study',
                   help="grid YAML file, or 'study' (the default grid) or 'quick'")
    p.add_argument('--models', nargs='+', help='preset names or checkpoint directories')
    p.add_argument('--contexts', nargs='+', type=int, metavar='CTX')
    p.add_argument('--modes', nargs='+', choices=grid_mod.MODES)
    p.add_argument('--backends', nargs='+')
    p.add_argument('--weights', nargs='+', choices=grid_mod.WEIGHTS,
                   help='weight formats (int8/int4 run on backends fused and persistent)')
    p.add_argument('--batches', nargs='+', type=int, metavar='B',
                   help='sequences per decode step (above 1: backend hf only)')
    p.add_argument('--co-runners', nargs='+', metavar='R',
                   help="a process loading the device during a cell's steps: none, "
                   f"{', '.join(grid_mod.CO_RUNNERS[1:])}, or a command line (quoted)")
    p.add_argument('--sessions', type=int, help='fresh processes per cell')
    p.add_argument('--steps', type=int, help='timed steps per cell and session')
    p.add_argument('--warmup', type=int, help='discarded steps before the timed ones')
    p.add_argument('--device', choices=grid_mod.DEVICES)
    p.add_argument('--dtype', choices=grid_mod.DTYPES)
    p.add_argument('--order', choices=grid_mod.ORDERS)
    p.add_argument('--seed', type=int)
    p.add_argument('--memory-limit-gb', type=float, help='use at most this much memory')
    p.add_argument('--peak-bandwidth-gbs', type=float, help='override the NVML peak bandwidth')
    p.add_argument('--reference', metavar='R.json|shipped',
                   help="results.json of the same device model to compare with, or 'shipped': "
                   'the study grid measured on a known-good GPU of this model (H100 80GB HBM3, '
                   'H200), shipped with the package')
    p.add_argument('--kernel-configs', metavar='FILE|defaults',
                   help="fused kernels' config table (default: the one `bench tune` wrote for "
                   'this GPU, else the shipped one, else the defaults)')
    p.add_argument('--price-per-gpu-hour', type=float, metavar='PRICE',
                   help='what a GPU-hour costs (any currency): cost per million tokens')
    p.add_argument('--prompt-tokens', nargs='+', type=int, metavar='P',
                   help='also time the first token after prompts of these lengths, fresh and '
                   'with P tokens cached + 64 new (bench/ttft.py)')
    p.add_argument('--profile', action='store_true',
                   help='profile a few steps per mode (first session) for the step anatomy '
                   'and a Chrome trace per profiled cell')
    p.add_argument('-o', '--output', default=DEFAULT_OUTPUT, help='output directory')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def _compare_parser():
    p = argparse.ArgumentParser(prog='bench compare',
                                description='Per-cell ratio of B over A (ms/step) with CIs.')
    p.add_argument('a', help='results.json (A, the baseline)')
    p.add_argument('b', help='results.json (B)')
    p.add_argument('--confidence', type=float, default=0.95)
    return p


def _report_parser():
    p = argparse.ArgumentParser(prog='bench report', description='Rewrite report, CSV, '
                                'summary and plots of a results.json and re-run its verdict.')
    p.add_argument('results', help='results.json of a bench run')
    p.add_argument('--grid', help='take the verdict thresholds from this grid instead')
    p.add_argument('--reference', metavar='R.json|shipped',
                   help="results.json of the same device model, or 'shipped'")
    p.add_argument('-o', '--output', help='output directory (default: next to results.json)')
    return p


def _figures_parser():
    p = argparse.ArgumentParser(
        prog='bench figures', description="The study's figures from one or more results.json "
        '(one per GPU): the ladder (fraction of the memory floor against peak bandwidth), a '
        "decoder layer's kernels on a time axis (runs with --profile), step-time distributions "
        'per fresh session, cost per million tokens (with a price per GPU-hour), graph speedup '
        'against context and batch, step time per co-runner; with `bench attention` files, '
        'attention time per layer by implementation.')
    p.add_argument('results', nargs='+',
                   help='results.json of bench runs, or JSON files of bench attention')
    p.add_argument('-o', '--output', default='bench-figures', help='output directory')
    p.add_argument('--price-per-gpu-hour', type=float, metavar='PRICE',
                   help="what a GPU-hour costs (any currency), for every run (default: each "
                   "run's grid price_per_gpu_hour)")
    return p


def finish(results, out_dir, thresholds, confidence, resamples, reference=None,
           results_path=None):
    """Analyse raw results, write every output.

    reference: the loaded reference profile (default: read thresholds.reference, if any).
    results_path: where the results.json (and its profile traces) lies, if not in out_dir.
    Returns (verdict, cell statistics, graph speedups, quantised-weights speedups).
    """
    from decode_monitor.bench import analysis, figures, plots, quantised, report, verdict
    if reference is None and thresholds.reference:
        reference = verdict.load_reference(thresholds.reference, verdict.device_name(results))
    cells = analysis.cell_stats(results, confidence, resamples)
    speedups = analysis.speedups(results, confidence, resamples)
    quantised_rows = quantised.speedups(results, confidence, resamples)
    slowdowns = analysis.co_runner_slowdowns(results, confidence, resamples)
    outcome = verdict.evaluate(results, thresholds, reference, confidence, resamples, cells)
    results['verdict'] = outcome
    names = plots.write_plots(out_dir, cells, speedups,
                              results.get('environment', {}).get('device_name'))
    names += figures.report_figures(
        results, results_path or os.path.join(out_dir, 'results.json'), out_dir)
    report.write_all(out_dir, results, cells, speedups, outcome, names, confidence,
                     quantised_rows, slowdowns)
    return outcome, cells, speedups, quantised_rows


def _print_table(cells, speedups, quantised_rows, confidence, outcome, out_dir):
    from decode_monitor.bench import analysis, quantised, report
    if cells:
        print(report.results_table(cells, speedups, confidence))
    if quantised_rows:
        print('\n'.join(quantised.markdown_section(quantised_rows, confidence)))
    print(f"verdict: {'PASS' if outcome['passed'] else 'FAIL'}"
          + (f" ({'; '.join(outcome['reasons'])})" if outcome['reasons'] else ''))
    for c in outcome['cells']:
        if not c['passed']:
            print(f"  {analysis.key_words(c)}: " + '; '.join(c['reasons']))
    print(f'outputs: {os.path.abspath(out_dir)}')


def cmd_run(argv):
    args = _run_parser().parse_args(argv)
    grid = grid_mod.load(args.grid)
    grid = grid_mod.with_overrides(
        grid, models=args.models, contexts=args.contexts, modes=args.modes,
        backends=args.backends, weights=args.weights, batches=args.batches,
        co_runners=args.co_runners, sessions=args.sessions, steps=args.steps,
        warmup=args.warmup, device=args.device, dtype=args.dtype, order=args.order, seed=args.seed,
        memory_limit_gb=args.memory_limit_gb, peak_bandwidth_gbs=args.peak_bandwidth_gbs,
        reference=args.reference, kernel_configs=args.kernel_configs,
        price_per_gpu_hour=args.price_per_gpu_hour,
        prompt_tokens=args.prompt_tokens)
    from decode_monitor.bench import run
    reference = None
    if grid.verdict.reference:  # refused now, not after the sessions
        from decode_monitor.bench.verdict import load_reference
        device = run.resolve_device(grid.device)
        reference = load_reference(grid.verdict.reference, run.device_name(device))
    results = run.run_grid(grid, args.output, argv, profile=args.profile,
                           progress=not args.no_progress)  # results.json written
    try:
        outcome, cells, speedups, quantised_rows = finish(
            results, args.output, grid.verdict, grid.confidence, grid.resamples, reference)
    except Exception:
        path = os.path.abspath(os.path.join(args.output, 'results.json'))
        traceback.print_exc()
        print(f'bench: error: the analysis failed; every sample is in {path} '
              f'(`bench report {path}` runs the analysis again)', file=sys.stderr)
        return FAIL
    _print_table(cells, speedups, quantised_rows, grid.confidence, outcome, args.output)
    return PASS if outcome['passed'] else FAIL


def cmd_report(argv):
    from decode_monitor.bench.verdict import load_results
    args = _report_parser().parse_args(argv)
    results = load_results(args.results)
    if args.grid:
        g = grid_mod.load(args.grid)
        thresholds, confidence, resamples = g.verdict, g.confidence, g.resamples
    else:
        stored = dict(results.get('grid') or {})
        thresholds = grid_mod._verdict(stored.get('verdict'), None)
        confidence = stored.get('confidence', 0.95)
        resamples = stored.get('resamples', 9999)
    if args.reference:
        from dataclasses import replace
        thresholds = replace(thresholds, reference=args.reference)
    reference = None
    if thresholds.reference:
        from decode_monitor.bench.verdict import device_name, load_reference
        reference = load_reference(thresholds.reference, device_name(results))
    out_dir = args.output or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out_dir, exist_ok=True)
    results.pop('verdict', None)
    outcome, cells, speedups, quantised_rows = finish(results, out_dir, thresholds, confidence,
                                                      resamples, reference, args.results)
    _print_table(cells, speedups, quantised_rows, confidence, outcome, out_dir)
    return PASS if outcome['passed'] else FAIL


def cmd_compare(argv):
    from decode_monitor.bench import analysis
    from decode_monitor.bench.verdict import device_name, load_results
    from decode_monitor.telemetry import stats
    args = _compare_parser().parse_args(argv)
    if not 0 < args.confidence < 1:
        raise grid_mod.GridError(f'--confidence: expected a number in (0, 1), got '
                                 f'{args.confidence}')
    a, b = load_results(args.a), load_results(args.b)
    rows, only_a, only_b = analysis.compare(a, b, args.confidence)
    print(f'A: {args.a} ({device_name(a)})')
    print(f'B: {args.b} ({device_name(b)})')
    axes = analysis.varied_axes(rows)
    names, align = analysis.key_columns(axes)
    print(f'| {names} | A ms | B ms | B/A [{args.confidence:.0%} CI] |')
    print(f'|{align}|---:|---:|---:|')
    for r in rows:
        print(f"| {analysis.key_cells(r, axes)} "
              f"| {r['a_ms']:.3f} | {r['b_ms']:.3f} | {stats.format_ratio(r['ratio'])} |")
    for label, keys in (('only in A', only_a), ('only in B', only_b)):
        for k in keys:
            extra = [f'{a} {v}' for a, v in zip(analysis.AXES, k[5:])
                     if v != analysis.AXIS_DEFAULTS[a]]
            print(f'{label}: {" ".join(map(str, k[:5] + tuple(extra)))}')
    if not rows:
        print('no cell is in both results')
        return FAIL
    return PASS


def cmd_figures(argv):
    import logging
    from decode_monitor.bench import figures
    args = _figures_parser().parse_args(argv)
    price = args.price_per_gpu_hour
    if price is not None and not price > 0:
        raise grid_mod.GridError(f'--price-per-gpu-hour: expected a number > 0, got {price:g}')
    runs = figures.load(args.results, price)  # an unreadable file: refused before drawing
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('bench figures: %(message)s'))
    level = figures.log.level
    figures.log.addHandler(handler)  # the reasons a figure is left out, on stderr
    figures.log.setLevel(logging.INFO)
    try:
        paths = figures.draw(runs, args.output)
    finally:
        figures.log.removeHandler(handler)
        figures.log.setLevel(level)
    for path in paths:
        print(path)
    if not paths:
        print('bench figures: no figure could be drawn from these results', file=sys.stderr)
        return FAIL
    return PASS


def cmd_tune(argv):
    from decode_monitor.bench.tune import main as tune_main
    return tune_main(argv)


def cmd_attention(argv):
    from decode_monitor.bench.attention import main as attention_main
    return attention_main(argv)


def cmd_quality(argv):
    from decode_monitor.bench import quality
    try:
        return quality.main(argv)
    except quality.QualityError as exc:
        print(f'bench quality: error: {exc}', file=sys.stderr)
        return USAGE


COMMANDS = {'run': cmd_run, 'compare': cmd_compare, 'report': cmd_report, 'tune': cmd_tune,
            'quality': cmd_quality, 'figures': cmd_figures, 'attention': cmd_attention}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, systemd: finish with partial data
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    command = cmd_run
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv.pop(0)]
    try:
        return command(argv)
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return exc.code if isinstance(exc.code, int) else USAGE
    except (grid_mod.GridError, VerdictUsageError) as exc:
        print(f'bench: error: {exc}', file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:  # outside a run's sessions: whatever was measured is written
        print('bench: interrupted', file=sys.stderr)
        return INTERRUPTED


if __name__ == '__main__':
    sys.exit(main())
