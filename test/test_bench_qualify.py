"""Qualification never loses a measurement: a reference it cannot use is refused before the
first session; results.json holds every sample after a failed verdict and after Ctrl-C."""
import json
import os
import signal
import subprocess
import sys

import pytest

from decode_monitor.bench.cli import main

ROOT = os.path.join(os.path.dirname(__file__), '..')
ONE_CELL = """models: [tiny]
contexts: [32]
modes: [eager]
device: cpu
sessions: {sessions}
steps: 4
warmup: 1
resamples: 200
verdict:
  max_step_ms: {max_step_ms}
"""


def _grid(path, sessions=1, max_step_ms=1000.0):
    path.write_text(ONE_CELL.format(sessions=sessions, max_step_ms=max_step_ms))
    return str(path)


def _reference(path, device_name):
    env = {} if device_name is None else {'device_name': device_name}
    path.write_text(json.dumps({'environment': env, 'samples': []}))
    return str(path)


@pytest.mark.parametrize('content, message', [
    ({'device_name': 'NVIDIA H200'}, "measured on 'NVIDIA H200', this run is on 'cpu: "),
    ({}, 'does not say which device measured it'),
    ('not json', 'not JSON'),
    (None, 'cannot read'),
])
def test_unusable_reference_is_refused_before_any_session(tmp_path, capsys, content, message):
    ref = tmp_path / 'reference.json'
    if isinstance(content, dict):
        ref.write_text(json.dumps({'environment': content, 'samples': []}))
    elif content is not None:
        ref.write_text(content)
    out = tmp_path / 'out'
    code = main(['--grid', _grid(tmp_path / 'grid.yaml'), '--reference', str(ref),
                 '--no-progress', '-o', str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # no session log, no results: nothing ran


@pytest.fixture(scope='module')
def failed(tmp_path_factory):
    """One real session whose verdict fails (a step time no CPU meets)."""
    tmp = tmp_path_factory.mktemp('failed')
    out = tmp / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 'decode_monitor.bench', '--grid',
         _grid(tmp / 'grid.yaml', max_step_ms=0.001), '--no-progress', '-o', str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def test_results_kept_after_a_failed_verdict(failed):
    proc, out = failed
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'verdict: FAIL' in proc.stdout
    results = json.loads((out / 'results.json').read_text())
    assert results['partial'] is False and not results.get('interrupted')
    ok = [s for s in results['samples'] if s['status'] == 'ok']
    assert len(ok) == 1 and len(ok[0]['step_ms']) == 4
    assert results['verdict']['passed'] is False
    assert 'over the maximum' in results['verdict']['cells'][0]['reasons'][0]


def test_report_refuses_a_mismatched_reference_before_writing(failed, tmp_path, capsys):
    _, out = failed
    ref = _reference(tmp_path / 'ref.json', 'NVIDIA H200')
    again = tmp_path / 'again'
    code = main(['report', str(out / 'results.json'), '--reference', ref, '-o', str(again)])
    assert code == 2 and 'same device model' in capsys.readouterr().err
    assert not again.exists() or not os.listdir(again)


def test_sigint_mid_run_keeps_every_finished_sample(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.Popen(
        [sys.executable, '-m', 'decode_monitor.bench', '--grid',
         _grid(tmp_path / 'grid.yaml', sessions=50), '--no-progress', '-o', str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # with --no-progress: one line per finished session
            if line.startswith('bench: session 1/50 done'):
                break
        else:
            pytest.fail(f'bench ended before its first session was done: {proc.wait()}')
        checkpoint = json.loads((out / 'results.json').read_text())
        assert checkpoint['partial'] is True and checkpoint['sessions_completed'] >= 1
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=600)  # the analysis runs after the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stdout + stderr
    results = json.loads((out / 'results.json').read_text())
    assert results['partial'] is True and results['interrupted'] is True
    done = results['sessions_completed']
    assert 1 <= done < 50
    ok = [s for s in results['samples'] if s['status'] == 'ok']
    assert len(ok) >= done, [(s['session'], s['status'], s.get('reason'))  # each session's cell
                             for s in results['samples']]
    assert all(s in results['samples'] for s in checkpoint['samples'])
    assert results['verdict']['passed'] is False
    assert 'the run was interrupted' in results['verdict']['reasons']
    assert (out / 'report.md').stat().st_size > 0  # analysed after the interruption


def test_shipped_profiles_name_their_gpus():
    from decode_monitor.bench.verdict import shipped_references
    shipped = shipped_references()
    assert set(shipped) == {'NVIDIA H100 80GB HBM3', 'NVIDIA H200'}
    for path in shipped.values():  # the study grid: 3 models x 4 contexts x 2 modes, 5 sessions
        results = json.loads(open(path).read())
        cells = {(s['model'], s['ctx'], s['mode']) for s in results['samples']
                 if s['status'] == 'ok'}
        assert len(cells) == 24 and len(results['samples']) == 24 * 5


def test_shipped_reference_for_an_unknown_gpu_is_refused_before_any_session(tmp_path, capsys):
    out = tmp_path / 'out'
    code = main(['--grid', _grid(tmp_path / 'grid.yaml'), '--reference', 'shipped',
                 '--no-progress', '-o', str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no reference profile ships for 'cpu" in err and "'NVIDIA H200'" in err
    assert not out.exists()


def test_a_run_judged_against_its_own_shipped_profile_is_at_ratio_one(tmp_path, capsys):
    from decode_monitor.bench.verdict import shipped_references
    h200 = shipped_references()['NVIDIA H200']
    code = main(['report', h200, '--grid', 'study', '--reference', 'shipped', '-o', str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    verdict = json.loads((tmp_path / 'results.json').read_text())['verdict']
    assert verdict['reference']['device_name'] == 'NVIDIA H200'
    ratios = [c['reference_ratio']['value'] for c in verdict['cells']]
    assert len(ratios) == 24 and all(r == pytest.approx(1.0) for r in ratios)
