"""The quick grid end to end on the CPU (also on a GPU machine): real engine, real session
processes, every output."""
import csv
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from decode_monitor.bench import plots
from decode_monitor.bench.cli import main
from decode_monitor.engine.presets import preset_config

ROOT = os.path.join(os.path.dirname(__file__), '..')
STEPS = 8  # the quick grid's


def tiny_step_bytes(pos):
    """Bytes a float32 step of the tiny preset reads at `pos`, added up from its shapes: hidden
    128, intermediate 256, 2 layers, 4 heads and 2 KV heads of 32, vocab 512, untied lm_head."""
    config = preset_config('tiny')
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
            config.tie_word_embeddings) == (128, 256, 2, 4, 2, 512, False)
    layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256 + 2 * 128
    weights = 2 * layer + 128 + 512 * 128 + 128  # + final norm, lm_head, one embedding row
    kv_per_token = 2 * 2 * 2 * 32  # layers x (K, V) x KV heads x head_dim
    return 4 * (weights + kv_per_token * (pos + 1))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    # ctx 1000000 needs about 1.3 GB for the tiny preset: over the 0.3 GB limit, so skipped.
    cmd = [sys.executable, '-m', 'decode_monitor.bench', '--grid', 'quick', '--profile',
           '--device', 'cpu', '--contexts', '32', '64', '1000000', '--memory-limit-gb', '0.3',
           '--no-progress', '-o', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    with open(out / 'results.json') as f:
        results = json.load(f)
    return proc, out, results


def test_exit_code_and_files(run):
    proc, out, _ = run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'verdict: PASS' in proc.stdout
    for name in ('results.json', 'results.csv', 'summary.json', 'report.md', plots.STEP_MS,
                 plots.FRACTION):
        assert (out / name).stat().st_size > 0
    assert not (out / plots.SPEEDUP).exists()  # no graph cells on a CPU


def test_environment_recorded(run):
    _, _, results = run
    env = results['environment']
    assert env['device'] == 'cpu' and env['torch'] == torch.__version__  # --device cpu
    assert env['package_version'] and env['transformers'] and env['python']
    assert env['command'].startswith('bench --grid quick')


def test_each_session_is_a_fresh_process_in_alternating_order(run):
    _, _, results = run
    pids = [s['pid'] for s in results['sessions']]
    assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids
    firsts = {}
    for s in results['samples']:
        firsts.setdefault(s['session'], s['ctx'])
    assert firsts == {0: 32, 1: 64}


def test_graph_and_oversized_cells_are_skipped_with_reasons(run):
    _, _, results = run
    graph = [s for s in results['samples'] if s['mode'] == 'graph']
    assert len(graph) == 4 and all(s['status'] == 'skipped' and 'CUDA' in s['reason']
                                   for s in graph)
    assert [(s['ctx'], s['mode']) for s in results['skipped']] == [(1000000, 'eager'),
                                                                   (1000000, 'graph')]
    assert all(s['reason'].endswith('GB, 0.30 GB free') and s['need_gb'] > 1.0
               for s in results['skipped'])


def test_samples_hold_steps_and_the_floor_of_the_real_model(run):
    _, _, results = run
    assert results['grid']['dtype'] == 'float32'  # the quick grid's auto dtype on a CPU
    copy_bw = {s['session']: s['copy_bandwidth'] for s in results['sessions']}
    ok = [s for s in results['samples'] if s['status'] == 'ok']
    assert sorted((s['session'], s['ctx']) for s in ok) == [(0, 32), (0, 64), (1, 32), (1, 64)]
    for s in ok:
        assert len(s['step_ms']) == STEPS and min(s['step_ms']) > 0
        expected = statistics.fmean(tiny_step_bytes(s['ctx'] + i) for i in range(STEPS))
        assert s['bytes_per_step'] == pytest.approx(expected)
        assert s['copy_bandwidth'] == copy_bw[s['session']]
        assert s['floor_ms_copy'] == pytest.approx(expected / copy_bw[s['session']] * 1e3)
        assert s['floor_ms_peak'] is None and s['joules_per_token'] is None  # no NVML


def test_csv_summary_and_report_rows(run):
    _, out, results = run
    with open(out / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results['samples']) + len(results['skipped']) == 10
    summary = json.loads((out / 'summary.json').read_text())
    assert [(r['ctx'], r['mode'], r['sessions']) for r in summary] == [(32, 'eager', 2),
                                                                       (64, 'eager', 2)]
    for r in summary:
        medians = [statistics.median(s['step_ms']) for s in results['samples']
                   if s['status'] == 'ok' and s['ctx'] == r['ctx']]
        assert r['ms_per_step'] == pytest.approx(statistics.fmean(medians))
        csv_medians = [float(x['median_ms']) for x in rows
                       if x['status'] == 'ok' and int(x['ctx']) == r['ctx']]
        assert sorted(csv_medians) == pytest.approx(sorted(medians), rel=1e-5)
    text = (out / 'report.md').read_text()
    assert '| tiny | 32 | hf | eager |' in text and '| tiny | 64 | hf | eager |' in text
    assert 'does not fit in memory' in text and 'CUDA graphs need a CUDA device' in text


def test_profile_anatomy(run):
    _, out, results = run
    eager = [p for p in results['profile'] if p['mode'] == 'eager']
    graph = [p for p in results['profile'] if p['mode'] == 'graph']
    assert len(eager) == 1 and eager[0]['status'] == 'ok' and graph[0]['status'] == 'skipped'
    a = eager[0]['anatomy']
    assert a['by_class_ms']['gemm'] > 0 and a['busy_ms'] <= a['span_ms']
    assert a['idle_ms'] == pytest.approx(a['span_ms'] - a['busy_ms'])
    assert 'Decode-step anatomy' in (out / 'report.md').read_text()


def test_rejudging_the_real_run_with_a_strict_limit_fails(run, tmp_path):
    _, out, _ = run
    strict = tmp_path / 'strict.yaml'
    strict.write_text('models: [tiny]\ncontexts: [32]\nverdict: {max_step_ms: 0.000001}\n')
    assert main(['report', str(out / 'results.json'), '--grid', str(strict),
                 '-o', str(tmp_path)]) == 1
    assert '**FAIL**' in (tmp_path / 'report.md').read_text()
