"""Analysis, verdict, report, CSV, plots and compare on synthetic results with known answers."""
import csv
import dataclasses
import json
import os
import statistics
import zlib

import numpy as np
import pytest
import torch

from decode_monitor.bench import analysis, plots, quantised, report, verdict
from decode_monitor.bench import grid as G
from decode_monitor.bench.cli import finish, main
from decode_monitor.bench.session import cell_order, failure

GPU = 'NVIDIA Test GPU'


def nvml(reasons=()):
    perf = {'sw_power_cap', 'hw_slowdown', 'sw_thermal', 'hw_thermal', 'hw_power_brake'}
    return {'sm_clock_mhz': 1980, 'mem_clock_mhz': 2619, 'temperature_c': 50, 'power_w': 300.0,
            'energy_j': 0.0, 'throttle_reasons': list(reasons),
            'throttled': bool(perf.intersection(reasons))}


def sample(model, ctx, mode, session, ms, floor_ms=5.0, jpt=2.0, reasons=(), backend='hf',
           weights=None):
    """A measured cell; without `weights` it has no such field, as results written before
    weights became an axis do not."""
    rng = np.random.default_rng(zlib.crc32(repr((model, ctx, mode, session)).encode()))
    steps = list(ms * rng.normal(1.0, 0.002, 21))
    weights_field = {} if weights is None else {'weights': weights}
    return {**weights_field, 'model': model, 'ctx': ctx, 'backend': backend, 'mode': mode,
            'session': session, 'status': 'ok', 'steps': 21, 'warmup': 3, 'step_ms': steps,
            'floor_ms_peak': floor_ms, 'floor_ms_copy': floor_ms * 1.1,
            'peak_bandwidth': 3.0e12, 'copy_bandwidth': 3.0e12 / 1.1,
            'bytes_per_step': floor_ms * 3.0e9, 'energy_j': jpt * 24,
            'joules_per_token': jpt, 'nvml_before': nvml(), 'nvml_after': nvml(reasons)}


def results(samples, skipped=(), device=GPU):
    return {'format': 'decode_monitor.bench/1',
            'environment': {'device_name': device, 'peak_bandwidth': 3.0e12, 'command': 'bench'},
            'grid': {'sessions': 4, 'steps': 21, 'warmup': 3, 'dtype': 'bfloat16'},
            'sessions': [{'session': i, 'copy_bandwidth': 3.0e12 / 1.1} for i in range(4)],
            'samples': list(samples), 'skipped': list(skipped), 'profile': []}


def study_like(eager_ms=20.0, speedup=1.25, sessions=4, ctxs=(2048, 4096)):
    out = []
    for s in range(sessions):
        offset = 1.0 + 0.02 * s  # sessions differ; eager and graph of a session share it
        for ctx in ctxs:
            out.append(sample('m', ctx, 'eager', s, eager_ms * offset))
            out.append(sample('m', ctx, 'graph', s, eager_ms * offset / speedup))
    return out


SKIP = {'model': 'm', 'ctx': 16384, 'backend': 'hf', 'mode': 'eager', 'status': 'skipped',
        'reason': 'does not fit in memory: needs 90.00 GB, 80.00 GB free'}


# -- analysis -----------------------------------------------------------------------------------
def test_cell_stats_are_means_of_session_medians():
    res = results(study_like())
    cells = analysis.cell_stats(res, resamples=1000)
    assert [(c['ctx'], c['mode']) for c in cells] == [
        (2048, 'eager'), (2048, 'graph'), (4096, 'eager'), (4096, 'graph')]
    eager = [s for s in res['samples'] if s['ctx'] == 2048 and s['mode'] == 'eager']
    medians = [statistics.median(s['step_ms']) for s in eager]
    c = cells[0]
    assert c['sessions'] == 4 and c['session_medians_ms'] == medians
    assert c['ms_per_step'].value == pytest.approx(statistics.fmean(medians))
    assert c['ms_per_step'].lo < c['ms_per_step'].value < c['ms_per_step'].hi
    assert c['floor_fraction'].value == pytest.approx(statistics.fmean(
        [5.0 / m for m in medians]))
    assert c['joules_per_token'].value == pytest.approx(2.0)


def test_speedup_is_paired_by_session_and_ignores_unpaired_sessions():
    samples = study_like(speedup=1.25)
    samples.append(sample('m', 2048, 'eager', 9, 100.0))  # no graph partner in session 9
    sp = analysis.speedups(results(samples), resamples=2000)
    assert [(s['ctx'], s['pairs']) for s in sp] == [(2048, 4), (4096, 4)]
    for s in sp:
        assert s['speedup'].value == pytest.approx(1.25, rel=0.003)
        assert s['speedup'].lo < s['speedup'].value < s['speedup'].hi
        assert s['speedup'].hi - s['speedup'].lo < 0.01  # the session offsets cancel


def test_skipped_cells_list_precheck_and_in_session_skips():
    samples = study_like(ctxs=(2048,))
    for s in range(2):
        samples.append({'model': 'm', 'ctx': 2048, 'backend': 'hf', 'mode': 'graph2',
                        'session': s, 'status': 'skipped', 'reason': 'no CUDA'})
    skipped = analysis.skipped_cells(results(samples, [SKIP]))
    assert [(s['ctx'], s['mode'], s['sessions']) for s in skipped] == [
        (2048, 'graph2', 2), (16384, 'eager', None)]
    assert skipped[1]['reason'] == SKIP['reason']


def test_cell_order():
    cells = [(c, 'hf', m) for c in (1, 2, 3, 4) for m in ('eager', 'graph')]
    a = cell_order(cells, 'random', 0, 0)
    assert sorted(a) == sorted(cells) and a == cell_order(cells, 'random', 0, 0)
    assert len({tuple(cell_order(cells, 'random', 0, s)) for s in range(6)}) > 1
    even, odd = cell_order(cells, 'alternate', 0, 0), cell_order(cells, 'alternate', 0, 1)
    assert even[:2] == [(1, 'hf', 'eager'), (1, 'hf', 'graph')]
    assert odd[:2] == [(4, 'hf', 'graph'), (4, 'hf', 'eager')]
    assert sorted(odd) == sorted(cells)


# -- verdict ------------------------------------------------------------------------------------
def thresholds(**kw):
    return dataclasses.replace(G.Verdict(), **kw)


def test_verdict_passes_and_fails_on_floor_fraction_per_mode():
    res = results(study_like(eager_ms=20.0, speedup=1.25))  # eager ~25 %, graph ~31 % of floor
    ok = verdict.evaluate(res, thresholds(min_floor_fraction={'eager': 0.2, 'graph': 0.3}),
                          resamples=500)
    assert ok['passed'] and all(c['passed'] for c in ok['cells'])
    bad = verdict.evaluate(res, thresholds(min_floor_fraction={'graph': 0.35}), resamples=500)
    assert not bad['passed']
    assert {(c['mode'], c['passed']) for c in bad['cells']} == {('eager', True),
                                                                ('graph', False)}
    assert 'minimum 35.0%' in bad['cells'][1]['reasons'][0]


def test_verdict_max_step_ms():
    res = results(study_like(eager_ms=20.0))
    out = verdict.evaluate(res, thresholds(max_step_ms=19.0), resamples=500)
    failed = {(c['ctx'], c['mode']) for c in out['cells'] if not c['passed']}
    assert failed == {(2048, 'eager'), (4096, 'eager')}
    assert out['reasons'] == ['2 of 4 cells failed']


def test_verdict_throttling():
    samples = study_like(ctxs=(2048,))
    samples[0] = sample('m', 2048, 'eager', 0, 20.0, reasons=('sw_power_cap',))
    samples[1] = sample('m', 2048, 'graph', 0, 16.0, reasons=('gpu_idle',))  # benign
    res = results(samples)
    out = verdict.evaluate(res, thresholds(), resamples=500)
    assert not out['passed']
    eager = next(c for c in out['cells'] if c['mode'] == 'eager')
    graph = next(c for c in out['cells'] if c['mode'] == 'graph')
    assert not eager['passed'] and 'sw_power_cap' in eager['reasons'][0]
    assert graph['passed']
    assert verdict.evaluate(res, thresholds(allow_throttling=True), resamples=500)['passed']


def test_verdict_errors_fail_skips_do_not():
    samples = study_like(ctxs=(2048,))
    res = results(samples, [SKIP])
    assert verdict.evaluate(res, thresholds(), resamples=500)['passed']
    samples.append({'model': 'm', 'ctx': 2048, 'backend': 'hf', 'mode': 'graph', 'session': 7,
                    'status': 'error', 'reason': 'graph capture failed: boom'})
    out = verdict.evaluate(results(samples, [SKIP]), thresholds(), resamples=500)
    graph = next(c for c in out['cells'] if c['mode'] == 'graph')
    assert not out['passed'] and 'session 7: graph capture failed: boom' in graph['reasons'][0]
    empty = verdict.evaluate(results([], [SKIP]), thresholds(), resamples=500)
    assert not empty['passed'] and 'no cell was measured' in empty['reasons']


def test_a_session_that_crashed_after_its_cells_fails_the_run():
    res = results(study_like(ctxs=(2048,)), [SKIP])
    assert verdict.evaluate(res, thresholds(), resamples=500)['passed']
    res['fatal'] = [{'session': 0, 'reason': 'ValueError: boom'}]  # as run.py records it
    out = verdict.evaluate(res, thresholds(), resamples=500)
    assert not out['passed'] and 'session 0 failed: ValueError: boom' in out['reasons']


def test_verdict_against_reference():
    ref = results(study_like(eager_ms=20.0))
    slower = results(study_like(eager_ms=23.0))  # 15 % slower everywhere
    t = thresholds(reference='ref.json', reference_tolerance=0.10)
    out = verdict.evaluate(slower, t, reference=ref, resamples=500)
    assert not out['passed'] and all(not c['passed'] for c in out['cells'])
    assert out['cells'][0]['reference_ratio']['value'] == pytest.approx(1.15, rel=0.01)
    close = results(study_like(eager_ms=21.0))  # 5 % slower: within tolerance
    assert verdict.evaluate(close, t, reference=ref, resamples=500)['passed']
    other = results(study_like(), device='Another GPU')
    with pytest.raises(verdict.VerdictUsageError, match='same device model'):
        verdict.evaluate(other, t, reference=ref)


# -- report, CSV, summary, plots ----------------------------------------------------------------
@pytest.fixture(scope='module')
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp('report')
    res = results(study_like(), [SKIP])
    outcome, cells, speedups, _ = finish(res, str(out), thresholds(max_step_ms=19.0), 0.95,
                                         1000)
    return out, res, cells, speedups, outcome


def test_csv_has_one_row_per_sample_and_skip(written):
    out, res, _, _, _ = written
    with open(out / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res['samples']) + 1
    assert rows[0]['status'] == 'skipped' and rows[0]['reason'] == SKIP['reason']
    assert {r['weights'] for r in rows} == {'bf16'}
    ok = [r for r in rows if r['status'] == 'ok']
    for row in ok:
        s = next(x for x in res['samples'] if (x['ctx'], x['mode'], x['session'])
                 == (int(row['ctx']), row['mode'], int(row['session'])))
        assert float(row['median_ms']) == pytest.approx(statistics.median(s['step_ms']),
                                                        rel=1e-5)
        assert float(row['floor_fraction']) == pytest.approx(
            5.0 / statistics.median(s['step_ms']), rel=1e-5)


def test_summary_json_rows(written):
    out, _, cells, _, _ = written
    rows = json.loads((out / 'summary.json').read_text())
    assert [(r['ctx'], r['mode']) for r in rows] == [(c['ctx'], c['mode']) for c in cells]
    for r, c in zip(rows, cells):
        assert set(r) >= {'model', 'ctx', 'backend', 'mode', 'weights', 'ms_per_step',
                          'floor_fraction', 'sessions'}
        assert r['weights'] == 'bf16'  # samples without the field: written before weights
        assert 'quantised_speedup' not in r
        assert r['ms_per_step'] == pytest.approx(c['ms_per_step'].value)
        assert r['sessions'] == 4
        assert ('graph_speedup' in r) == (r['mode'] == 'graph')


def test_markdown_report(written):
    out, _, cells, speedups, _ = written
    text = (out / 'report.md').read_text()
    table = [line for line in text.splitlines() if line.startswith('| m |')]
    assert len(table) == len(cells) + 1 + 4  # results, the skipped cell, verdict rows
    graph_row = next(line for line in table if '| 2048 | hf | graph |' in line)
    sp = speedups[0]['speedup']
    assert f'{sp.value:.3f}× [{sp.lo:.3f}, {sp.hi:.3f}]' in graph_row
    assert SKIP['reason'] in text
    assert '**FAIL**' in text and 'over the maximum 19 ms' in text
    for name in (plots.STEP_MS, plots.FRACTION, plots.SPEEDUP):
        assert f']({name})' in text


def test_plots_are_pngs(written):
    out = written[0]
    for name in (plots.STEP_MS, plots.FRACTION, plots.SPEEDUP):
        data = (out / name).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000


def test_no_speedup_plot_without_graph_cells(tmp_path):
    res = results([s for s in study_like() if s['mode'] == 'eager'])
    _, cells, speedups, _ = finish(res, str(tmp_path), thresholds(), 0.95, 500)
    assert speedups == []
    assert (tmp_path / plots.STEP_MS).exists() and not (tmp_path / plots.SPEEDUP).exists()


# -- CLI: compare and report --------------------------------------------------------------------
def test_compare_prints_ratios(tmp_path, capsys):
    a, b = tmp_path / 'a.json', tmp_path / 'b.json'
    report.write_json(a, results(study_like(eager_ms=20.0)))
    report.write_json(b, results(study_like(eager_ms=30.0, ctxs=(2048, 8192))))
    assert main(['compare', str(a), str(b)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if '| 2048 | hf | eager |' in line)
    assert '1.500× [' in row
    assert 'only in A: m 4096 hf eager' in text and 'only in B: m 8192 hf graph' in text


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(['compare', str(tmp_path / 'missing.json'), str(tmp_path / 'x.json')]) == 2
    assert 'cannot read' in capsys.readouterr().err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('models: [tiny]\ncontexts: [0]\n')
    out = str(tmp_path / 'out')
    assert main(['--grid', str(bad), '-o', out]) == 2
    assert 'contexts[0]' in capsys.readouterr().err
    assert main(['--grid', 'quick', '--sessions', '0', '-o', out]) == 2
    assert 'sessions' in capsys.readouterr().err
    assert main(['--grid', 'quick', '--reference', str(tmp_path / 'nope.json'), '-o', out]) == 2
    assert not os.path.exists(out)
    assert main(['--no-such-flag']) == 2


def test_report_subcommand_rejudges_with_other_thresholds(tmp_path, capsys):
    path = tmp_path / 'results.json'
    report.write_json(path, results(study_like(eager_ms=20.0)))
    assert main(['report', str(path)]) == 0  # the stored thresholds: none
    strict = tmp_path / 'strict.yaml'
    strict.write_text('models: [tiny]\ncontexts: [16]\nverdict: {max_step_ms: 1.0}\n')
    assert main(['report', str(path), '--grid', str(strict)]) == 1
    assert 'verdict: FAIL' in capsys.readouterr().out
    assert json.loads(path.read_text())['verdict']['passed'] is False


# -- quantised weights ----------------------------------------------------------------------------
def quantised_like(sessions=4):
    """fused bf16 20 ms, int8 12.5 ms (1.6x; bytes 1/2), int4 10 ms (2x; bytes 1/4), hf beside."""
    out = []
    for s in range(sessions):
        offset = 1.0 + 0.02 * s
        for weights, ms, floor_ms in (('bf16', 20.0, 5.0), ('int8', 12.5, 2.5),
                                      ('int4', 10.0, 1.25)):
            out.append(sample('m', 2048, 'eager', s, ms * offset, floor_ms, backend='fused',
                              weights=weights))
        out.append(sample('m', 2048, 'eager', s, 30.0 * offset, weights='bf16'))  # hf
    # a quantised cell without its bf16 partner in session 9 is left out of the pairs
    out.append(sample('m', 2048, 'eager', 9, 11.0, 2.5, backend='fused', weights='int8'))
    return out


def test_quantised_speedup_is_paired_and_set_against_the_byte_ratio():
    res = results(quantised_like())
    rows = quantised.speedups(res, resamples=2000)
    assert [(r['backend'], r['mode'], r['weights'], r['pairs']) for r in rows] == [
        ('fused', 'eager', 'int8', 4), ('fused', 'eager', 'int4', 4)]
    for r, speedup, byte_ratio in zip(rows, (1.6, 2.0), (2.0, 4.0)):
        assert r['speedup'].value == pytest.approx(speedup, rel=0.003)
        assert r['speedup'].lo <= r['speedup'].value <= r['speedup'].hi
        assert r['byte_ratio'] == pytest.approx(byte_ratio)
        share = r['share_of_byte_ratio']
        assert share.value == pytest.approx(speedup / byte_ratio, rel=0.003)
        assert (share.lo, share.hi) == pytest.approx((r['speedup'].lo / byte_ratio,
                                                      r['speedup'].hi / byte_ratio))
    bf16 = [statistics.median(s['step_ms']) for s in res['samples']
            if s['backend'] == 'fused' and s['weights'] == 'bf16']
    assert rows[0]['bf16_ms'] == pytest.approx(statistics.fmean(bf16))
    only_hf = results([s for s in res['samples'] if s['backend'] == 'hf'])
    assert quantised.speedups(only_hf, resamples=500) == []


def test_cells_and_graph_speedups_are_per_weight_format():
    samples = quantised_like()
    for s in range(4):
        for weights, ms in (('bf16', 16.0), ('int8', 10.0)):
            samples.append(sample('m', 2048, 'graph', s, ms * (1.0 + 0.02 * s), backend='fused',
                                  weights=weights))
    res = results(samples)
    cells = analysis.cell_stats(res, resamples=500)
    assert [(c['backend'], c['mode'], c['weights']) for c in cells] == [
        ('fused', 'eager', 'bf16'), ('fused', 'eager', 'int8'), ('fused', 'eager', 'int4'),
        ('fused', 'graph', 'bf16'), ('fused', 'graph', 'int8'), ('hf', 'eager', 'bf16')]
    graph = {s['weights']: s['speedup'].value for s in analysis.speedups(res, resamples=500)}
    assert graph == pytest.approx({'bf16': 20.0 / 16.0, 'int8': 12.5 / 10.0}, rel=0.01)


def test_report_and_summary_of_quantised_weights(tmp_path):
    res = results(quantised_like())
    _, cells, _, rows = finish(res, str(tmp_path), thresholds(), 0.95, 1000)
    text = (tmp_path / 'report.md').read_text()
    assert '| m | 2048 | fused | eager | int4 | ' in text  # the results table's weights column
    section = text.split(f'## {quantised.TITLE}')[1].split('\n## ')[0]
    table = [line for line in section.splitlines() if line.startswith('| m |')]
    assert len(table) == 2
    int8 = rows[0]
    assert table[0].startswith('| m | 2048 | fused | eager | int8 | ')
    assert (f"| {int8['bf16_ms']:.3f} | {int8['quantised_ms']:.3f} | "
            f"{int8['speedup'].value:.3f}× [") in table[0]
    assert '| 2.00× | 80% [' in table[0] and '| 4.00× | 50% [' in table[1]
    summary = {(r['backend'], r['weights']): r
               for r in json.loads((tmp_path / 'summary.json').read_text())}
    assert len(summary) == len(cells) == 4
    assert summary[('fused', 'int8')]['quantised_speedup'] == pytest.approx(1.6, rel=0.003)
    assert summary[('fused', 'int8')]['byte_ratio'] == pytest.approx(2.0)
    assert summary[('fused', 'int4')]['speedup_share_of_byte_ratio'] == pytest.approx(
        0.5, rel=0.003)
    lo, hi = summary[('fused', 'int4')]['quantised_speedup_ci']
    assert lo <= summary[('fused', 'int4')]['quantised_speedup'] <= hi
    assert 'quantised_speedup' not in summary[('fused', 'bf16')]
    with open(tmp_path / 'results.csv') as f:
        assert {r['weights'] for r in csv.DictReader(f)} == {'bf16', 'int8', 'int4'}


def test_compare_reads_results_without_weights_as_bf16(tmp_path, capsys):
    old, new = tmp_path / 'old.json', tmp_path / 'new.json'
    report.write_json(old, results([sample('m', 2048, 'eager', s, 20.0) for s in range(4)]))
    report.write_json(new, results(
        [sample('m', 2048, 'eager', s, 30.0, weights='bf16') for s in range(4)]
        + [sample('m', 2048, 'eager', s, 10.0, backend='fused', weights='int8')
           for s in range(4)]))
    assert main(['compare', str(old), str(new)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if '| 2048 | hf | eager | bf16 |' in line)
    assert '1.500× [' in row
    assert 'only in B: m 2048 fused eager int8' in text


def test_a_cell_failure_is_recorded_whatever_its_message():
    def recorded(exc):
        try:
            raise exc
        except Exception as caught:
            return failure(caught)
    empty = recorded(RuntimeError())  # no message at all: still a record, not an IndexError
    assert empty['status'] == 'error' and empty['reason'] == 'RuntimeError: '
    assert 'RuntimeError' in empty['traceback']
    several = recorded(ValueError('first line\nsecond line'))
    assert several['reason'] == 'ValueError: first line'
    oom = recorded(torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB'))
    assert oom['status'] == 'skipped' and 'traceback' not in oom
    assert oom['reason'].startswith('OutOfMemoryError: CUDA out of memory')
