"""`bench figures`: each figure from a real profiled quick run on the CPU, or from synthetic
results with known values, checked against what the drawn Axes hold."""
import gzip
import json
import logging
import os
import statistics
import subprocess
import sys

import pytest

from decode_monitor.bench import figures, figures_trace
from decode_monitor.bench import grid as G
from decode_monitor.bench.cli import main

ROOT = os.path.join(os.path.dirname(__file__), '..')
PRICE = 2.5


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """A real quick bench on the CPU: 3 fresh sessions, profiled, with a price per GPU-hour."""
    out = tmp_path_factory.mktemp('quick')
    cmd = [sys.executable, '-m', 'decode_monitor.bench', '--grid', 'quick', '--profile',
           '--device', 'cpu', '--contexts', '32', '--sessions', '3', '--no-progress',
           '--price-per-gpu-hour', str(PRICE), '-o', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, figures.load([str(out / 'results.json')])[0]


def gid_artists(fig, prefix, kind='collections'):
    return [a for ax in fig.axes for a in getattr(ax, kind) if (a.get_gid() or '')
            .startswith(prefix)]


# -- a real profiled run on the CPU -----------------------------------------------------------
def test_profile_writes_a_chrome_trace_per_profiled_cell(quick):
    out, run = quick
    ok = [p for p in run['profile'] if p['status'] == 'ok']
    assert [(p['backend'], p['mode'], p['trace'], p['layers']) for p in ok] == [
        ('hf', 'eager', 'trace-tiny-32-hf-eager-bf16.json.gz', 2)]
    with gzip.open(out / ok[0]['trace'], 'rt') as f:
        names = {e.get('name') for e in json.load(f)['traceEvents']}
    assert {'aten::linear', 'aten::scaled_dot_product_attention'} <= names
    assert not [p for p in run['profile'] if p['status'] != 'ok' and p.get('trace')]


def test_kernel_timeline_shows_one_layer_of_the_real_trace(quick, tmp_path):
    _, run = quick
    rows = figures_trace.timeline_data([run])
    assert len(rows) == 1 and rows[0]['source'] == 'cpu operators'
    row = rows[0]
    names = [e[0] for e in row['events']]
    # One Llama layer: q, k, v, o, gate, up, down projections and one attention.
    assert names.count('aten::linear') == 7
    assert names.count('aten::scaled_dot_product_attention') == 1
    assert 'aten::embedding' not in names and row['events_per_layer'] == len(names)
    starts = [e[1] for e in row['events']]
    assert starts[0] == 0 and starts == sorted(starts)
    assert all(s + d <= row['window_us'] + 1e-6 for _, s, d in row['events'])
    assert row['busy_us'] + row['gap_us'] == pytest.approx(row['window_us'])
    assert 0 < row['busy_us'] <= sum(e[2] for e in row['events']) + 1e-6
    fig = figures_trace.timeline_figure(rows)
    bars = gid_artists(fig, 'event 0 ', 'patches')
    assert [v for b in bars for v in (b.get_x(), b.get_width())] == pytest.approx(
        [v for _, s, d in row['events'] for v in (s, d)])
    assert figures_trace.kernel_timeline([run], str(tmp_path)) == [
        str(tmp_path / figures_trace.TIMELINE)]


def test_step_time_distributions_hold_every_session(quick):
    _, run = quick
    groups = figures.distributions_data(run)
    assert list(groups) == [('tiny', 32, 'hf', 'bf16', 1, 'none')]  # + batch, co-runner
    eager = groups[('tiny', 32, 'hf', 'bf16', 1, 'none')]['eager']
    samples = sorted((s for s in run['samples'] if s['status'] == 'ok'),
                     key=lambda s: s['session'])
    assert eager == [(s['session'], s['step_ms']) for s in samples]
    assert [session for session, _ in eager] == [0, 1, 2]
    fig = figures.distributions_figure(groups, 'cpu')
    for session, steps in eager:
        (median,) = gid_artists(fig, f'median eager s{session}', 'lines')
        assert median.get_ydata()[0] == pytest.approx(statistics.median(steps))
        (points,) = gid_artists(fig, f'steps eager s{session}')
        assert sorted(points.get_offsets()[:, 1]) == pytest.approx(sorted(steps))


def test_cost_uses_the_grid_price_and_the_measured_step_time(quick):
    _, run = quick
    assert run['grid']['price_per_gpu_hour'] == PRICE
    (row,) = figures.cost_data([run])
    ms = statistics.fmean(statistics.median(s['step_ms']) for s in run['samples']
                          if s['status'] == 'ok')
    assert row['tokens_per_s'] == pytest.approx(1e3 / ms)
    # 1e6 tokens take 1e6 x ms / 1e3 s = ms / 3.6 hours of the GPU.
    assert row['cost_per_mtok'] == pytest.approx(PRICE * ms / 3.6)
    assert row['joules_per_token'] is None  # no NVML on a CPU
    fig = figures.cost_figure([row])
    assert len(fig.axes) == 1  # no energy panel without energy
    (bar,) = gid_artists(fig, 'cost_per_mtok', 'patches')
    assert bar.get_width() == pytest.approx(row['cost_per_mtok'])


def test_the_report_of_a_run_embeds_its_one_run_figures(quick):
    out, _ = quick
    text = (out / 'report.md').read_text()
    for name in (figures_trace.TIMELINE, figures.DISTRIBUTIONS + '.png', figures.COST):
        assert f']({name})' in text and (out / name).stat().st_size > 0
    assert figures.LADDER not in text and not (out / figures.LADDER).exists()


def test_bench_figures_on_the_real_run(quick, tmp_path, capsys):
    out, _ = quick
    assert main(['figures', str(out / 'results.json'), '-o', str(tmp_path)]) == 0
    printed = capsys.readouterr()
    written = printed.out.split()
    assert sorted(os.path.basename(p) for p in written) == sorted(
        [figures_trace.TIMELINE, figures.DISTRIBUTIONS + '.png', figures.COST])
    assert all(os.path.getsize(p) > 0 for p in written)
    assert 'ladder: ' in printed.err and 'no NVML peak bandwidth' in printed.err


# -- synthetic results with known values --------------------------------------------------------
def sample(model, ctx, mode, session, step_ms, bytes_per_step, backend='hf', weights='bf16',
           jpt=None):
    return {'model': model, 'ctx': ctx, 'backend': backend, 'mode': mode, 'weights': weights,
            'session': session, 'status': 'ok', 'step_ms': list(step_ms),
            'bytes_per_step': bytes_per_step, 'joules_per_token': jpt,
            'floor_ms_copy': 1.0}  # read by the report's statistics (bench figures draws all)


def run_of(device, peak, samples, price=None, profile=()):
    return {'environment': {'device_name': device, 'peak_bandwidth': peak,
                            'peak_source': 'nvml' if peak else None},
            'grid': {'price_per_gpu_hour': price}, 'samples': samples,
            'profile': list(profile)}


def two_gpus():
    """GPU A (2 TB/s): graph cells at 50 % and 30 % of the floor, eager at 10 %; GPU B
    (4 TB/s): graph at 20 % and 40 %."""
    def cells(peak, fractions, mode):
        # floor = bytes / peak; a step of 1 ms moves bytes = fraction x peak x 1 ms.
        return [sample('m', ctx, mode, s, [0.9, 1.0, 1.1], f * peak * 1e-3)
                for ctx, f in zip((2048, 4096), fractions) for s in range(2)]
    a = run_of('GPU A', 2e12, cells(2e12, (0.5, 0.3), 'graph') + cells(2e12, (0.1,), 'eager'))
    b = run_of('GPU B', 4e12, cells(4e12, (0.2, 0.4), 'graph'))
    return a, b


def write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_the_ladder_from_two_devices(tmp_path, capsys):
    a, b = two_gpus()
    paths = [write(tmp_path / 'a.json', a), write(tmp_path / 'b.json', b)]
    points = figures.ladder_data(figures.load(paths))
    got = {(p['series'], p['device']): p for p in points}
    graph_a = got[(('hf', 'graph', 'bf16'), 'GPU A')]
    assert graph_a['peak_tbs'] == 2.0 and graph_a['cells'] == {
        ('m', 2048): pytest.approx(0.5), ('m', 4096): pytest.approx(0.3)}
    assert (graph_a['median'], graph_a['lo'], graph_a['hi']) == pytest.approx((0.4, 0.3, 0.5))
    assert got[(('hf', 'graph', 'bf16'), 'GPU B')]['median'] == pytest.approx(0.3)
    assert got[(('hf', 'eager', 'bf16'), 'GPU A')]['median'] == pytest.approx(0.1)
    fig = figures.ladder_figure(points)
    (graph,) = gid_artists(fig, 'ladder hf graph')
    assert graph.get_offsets().ravel().tolist() == pytest.approx([2.0, 40.0, 4.0, 30.0])
    (eager,) = gid_artists(fig, 'ladder hf eager')
    assert eager.get_offsets().ravel().tolist() == pytest.approx([2.0, 10.0])
    (cells_b,) = gid_artists(fig, 'cells hf graph GPU B')
    assert sorted(cells_b.get_offsets()[:, 1]) == pytest.approx([20.0, 40.0])
    out = tmp_path / 'figs'
    assert main(['figures', *paths, '-o', str(out)]) == 0
    assert str(out / figures.LADDER) in capsys.readouterr().out.split()


def test_the_ladder_pools_runs_of_one_device_and_leaves_out_runs_without_a_peak(caplog):
    a, b = two_gpus()
    more_a = run_of('GPU A', 2e12, [sample('m', 8192, 'graph', 0, [1.0], 0.2 * 2e12 * 1e-3)])
    cpu = run_of('cpu: x', None, [sample('m', 2048, 'eager', 0, [1.0], 1e6)])
    with caplog.at_level(logging.INFO, logger=figures.log.name):
        points = figures.ladder_data([a, b, more_a, cpu])
    graph_a = [p for p in points if p['series'][1] == 'graph' and p['device'] == 'GPU A']
    assert len(graph_a) == 1 and set(graph_a[0]['cells']) == {('m', 2048), ('m', 4096),
                                                              ('m', 8192)}
    assert graph_a[0]['median'] == pytest.approx(0.3)
    assert 'cpu: x' not in {p['device'] for p in points}
    assert 'no NVML peak bandwidth (cpu: x)' in caplog.text


def test_the_axes_figures_say_why_they_draw_nothing(caplog, tmp_path):
    from decode_monitor.bench import figures_axes
    eager_only = run_of('GPU A', 2e12, [sample('m', 2048, 'eager', 0, [1.0], 1e9)])
    with caplog.at_level(logging.INFO, logger=figures.log.name):
        assert figures.draw([eager_only], str(tmp_path), figures_axes.FIGURES_AXES) == []
    assert 'graph speedup vs batch: no run has eager and graph cells' in caplog.text
    assert 'step time per co-runner: no run has a measured cell beside a co-runner' in caplog.text
    assert 'attention per layer: no `bench attention` file with a measured row' in caplog.text


def test_cost_per_million_tokens_and_joules_per_token():
    # 4 ms per step -> 250 tokens/s -> 900000 tokens per hour; at 3.6 per hour: 4 per Mtok.
    run = run_of('GPU A', 2e12, [sample('m', 2048, 'graph', s, [4.0, 4.0], 1e9, jpt=j)
                                 for s, j in ((0, 1.0), (1, 2.0))], price=3.6)
    (row,) = figures.cost_data([run])
    assert row['tokens_per_s'] == pytest.approx(250.0)
    assert row['cost_per_mtok'] == pytest.approx(4.0)
    assert row['joules_per_token'] == pytest.approx(1.5)
    fig = figures.cost_figure([row])
    assert len(fig.axes) == 2
    assert gid_artists(fig, 'joules_per_token', 'patches')[0].get_width() == pytest.approx(1.5)


def test_the_command_line_price_replaces_the_grids(tmp_path, capsys):
    priced = write(tmp_path / 'r.json', run_of('GPU A', 2e12, [
        sample('m', 2048, 'graph', 0, [4.0], 1e9)], price=1.0))
    assert figures.cost_data(figures.load([priced]))[0]['cost_per_mtok'] == pytest.approx(
        4.0 / 3.6)
    assert figures.cost_data(figures.load([priced], 7.2))[0]['cost_per_mtok'] == \
        pytest.approx(8.0)
    unpriced = write(tmp_path / 'u.json', run_of('GPU A', 2e12, [
        sample('m', 2048, 'graph', 0, [4.0], 1e9)]))
    out = tmp_path / 'figs'
    assert main(['figures', unpriced, '-o', str(out), '--price-per-gpu-hour', '7.2']) == 0
    assert str(out / figures.COST) in capsys.readouterr().out.split()
    assert main(['figures', unpriced, '-o', str(out), '--price-per-gpu-hour', '-1']) == 2
    assert '--price-per-gpu-hour' in capsys.readouterr().err


def test_every_figure_says_why_it_draws_nothing(tmp_path, caplog):
    bare = run_of('GPU A', None, [{'model': 'm', 'ctx': 1, 'backend': 'hf', 'mode': 'eager',
                                   'session': 0, 'status': 'error', 'reason': 'x'}],
                  profile=[{'model': 'm', 'ctx': 1, 'backend': 'hf', 'mode': 'eager',
                            'status': 'ok', 'anatomy': {}}])
    with caplog.at_level(logging.INFO, logger=figures.log.name):
        for figure in figures.FIGURES:
            assert figure([bare], str(tmp_path)) == []
    for words in ('ladder: nothing drawn', 'kernel timeline: nothing drawn',
                  'no trace recorded', 'step-time distributions: GPU A: no measured cell',
                  'cost: nothing drawn', 'no price per GPU-hour'):
        assert words in caplog.text
    assert os.listdir(tmp_path) == []


def test_unreadable_results_are_refused_before_drawing(tmp_path, capsys):
    a, _ = two_gpus()
    good = write(tmp_path / 'a.json', a)
    (tmp_path / 'bad.json').write_text('{not json')
    out = tmp_path / 'figs'
    assert main(['figures', good, str(tmp_path / 'missing.json'), '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'cannot read' in err and 'missing.json' in err
    assert main(['figures', good, str(tmp_path / 'bad.json'), '-o', str(out)]) == 2
    assert 'not JSON' in capsys.readouterr().err
    assert not out.exists()
    assert main(['figures', '-o', str(out)]) == 2  # no results at all


# -- traces: a GPU-style trace with known layers, and the repeating-block search ---------------
def gpu_trace(path, layers=3):
    """Kernels of one step: embedding, `layers` x [gemv 10 us, attention 5 us, gemv 8 us] with
    2 + layer us between kernels and a 4 us copy on a second stream from 8 us into each first
    gemv, then
    lm_head; a CPU operator that must be ignored."""
    events, t = [], 0.0

    def kernel(name, ts, dur, cat='kernel', tid=7):
        events.append({'ph': 'X', 'cat': cat, 'name': name, 'ts': 1000.0 + ts, 'dur': dur,
                       'pid': 0, 'tid': tid})
    kernel('embedding_kernel', 0.0, 3.0)
    t = 5.0
    for layer in range(layers):
        for name, dur in (('gemv_a', 10.0), ('flash_decode', 5.0), ('gemv_b', 8.0)):
            kernel(name, t, dur)
            if name == 'gemv_a':
                kernel('Memcpy DtoD', t + 8.0, 4.0, 'gpu_memcpy', tid=8)
            t += dur + 2.0 + layer
    kernel('lm_head', t, 3.0)
    events.append({'ph': 'X', 'cat': 'cpu_op', 'name': 'aten::mm', 'ts': 1000.0, 'dur': 500.0,
                   'pid': 1, 'tid': 1})
    with gzip.open(path, 'wt') as f:
        json.dump({'traceEvents': events}, f)


def test_a_gpu_trace_gives_one_layer_and_its_gaps(tmp_path):
    gpu_trace(tmp_path / 't.json.gz')
    events, source = figures_trace.read_trace(str(tmp_path / 't.json.gz'))
    assert source == 'gpu kernels' and 'aten::mm' not in [e[0] for e in events]
    layer = figures_trace.one_layer(events, layers=3)
    # The middle layer (1): 3 us between kernels; the copy runs 2 us past the first gemv.
    assert [(n, s, d) for n, s, d in layer['events']] == [
        ('gemv_a', 0.0, 10.0), ('Memcpy DtoD', 8.0, 4.0), ('flash_decode', 13.0, 5.0),
        ('gemv_b', 21.0, 8.0)]
    assert layer['window_us'] == 32.0 and layer['busy_us'] == 25.0 and layer['gap_us'] == 7.0
    assert layer['layer'] == 1 and layer['events_per_layer'] == 4
    run = run_of('GPU A', 2e12, [], profile=[
        {'model': 'm', 'ctx': 2048, 'backend': 'fused', 'mode': 'graph', 'weights': 'bf16',
         'status': 'ok', 'trace': 't.json.gz', 'layers': 3, 'anatomy': {'steps': 1}}])
    run['results_path'] = str(tmp_path / 'results.json')
    (row,) = figures_trace.timeline_data([run])
    assert row['gap_us'] == 7.0 and 'fused graph' in row['label']


def test_a_trace_that_cannot_be_read_is_said_and_skipped(tmp_path, caplog):
    (tmp_path / 'broken.json.gz').write_bytes(b'not gzip')
    run = run_of('GPU A', 2e12, [], profile=[
        {'model': 'm', 'ctx': 2048, 'backend': 'hf', 'mode': 'eager', 'status': 'ok',
         'trace': name, 'layers': 3} for name in ('broken.json.gz', 'absent.json.gz')])
    run['results_path'] = str(tmp_path / 'results.json')
    with caplog.at_level(logging.INFO, logger=figures.log.name):
        assert figures_trace.kernel_timeline([run], str(tmp_path / 'out')) == []
    assert 'broken.json.gz' in caplog.text and 'absent.json.gz' in caplog.text


def test_the_block_is_the_layer_not_a_repeat_inside_it_nor_the_step():
    # Inside the layer, (gemv, add) repeats 4 times: a period of 2 over 6 names.
    layer = ['norm'] + ['gemv', 'add'] * 4 + ['attn']
    step = ['embed'] + layer * 4 + ['norm', 'lm_head']
    assert figures_trace.block_period(step * 3, layers=4, steps=3) == (len(layer), 1, 4)
    step = ['embed'] + layer * 2 + ['norm', 'lm_head']  # 2 layers: the step repeats longer
    assert figures_trace.block_period(step * 3, layers=2, steps=3) == (len(layer), 1, 2)
    assert figures_trace.block_period(['a', 'b', 'c', 'd'], layers=4) is None


def test_price_per_gpu_hour_is_a_grid_key():
    raw = {'models': ['tiny'], 'contexts': [32]}
    assert G.from_mapping(raw).price_per_gpu_hour is None
    assert G.from_mapping({**raw, 'price_per_gpu_hour': 2}).price_per_gpu_hour == 2.0
    with pytest.raises(G.GridError, match='price_per_gpu_hour: expected a number > 0'):
        G.from_mapping({**raw, 'price_per_gpu_hour': 0})
