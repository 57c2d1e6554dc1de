"""Weight formats end to end on the CPU (also on a GPU machine): bf16, int8 and int4 on the fused
backend beside hf bf16, in real session processes, through to the report's speedup-vs-byte-ratio
section."""
import csv
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
from decode_monitor.bench import quantised
from decode_monitor.bench.cli import main
from decode_monitor.engine.presets import preset_config

ROOT = os.path.join(os.path.dirname(__file__), '..')
CTX, STEPS, WARMUP = 16, 6, 2
FORMATS = ('bf16', 'int8', 'int4')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_weights')
    cmd = [sys.executable, '-m', 'decode_monitor.bench', '--grid', 'quick', '--profile',
           '--device', 'cpu', '--backends', 'hf', 'fused', '--weights', *FORMATS,
           '--contexts', str(CTX), '--steps', str(STEPS), '--warmup', str(WARMUP),
           '--no-progress', '-o', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    with open(out / 'results.json') as f:
        results = json.load(f)
    return proc, out, results


@pytest.fixture(scope='module')
def expected_bytes():
    """Mean bytes per timed step of each format (float32 tiny), added up from the preset's shapes:
    hidden 128, intermediate 256, 2 layers, 4 heads and 2 KV heads of 32, vocab 512, untied.
    Every K (128, 256) is a multiple of 128: one group of 128 weights per float32 scale (int8),
    or per float32 scale and offset (int4)."""
    config = preset_config('tiny')
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
            config.tie_word_embeddings) == (128, 256, 2, 4, 2, 512, False)
    matrices = 2 * [(256, 128), (128, 128), (512, 128), (128, 256)] + [(512, 128)]  # + lm_head
    weights = sum(n * k for n, k in matrices)
    groups = sum(n * k // 128 for n, k in matrices)
    dense = 4 * (2 * 2 * 128 + 128 + 128)  # layer norms, final norm, one embedding row
    stored = {'bf16': 4 * weights, 'int8': weights + 4 * groups, 'int4': weights // 2 + 8 * groups}
    kv_per_token = 4 * 2 * 2 * 2 * 32  # float32 x layers x (K, V) x KV heads x head_dim
    return {fmt: statistics.fmean(dense + stored[fmt] + kv_per_token * (CTX + i + 1)
                                  for i in range(STEPS)) for fmt in FORMATS}


def test_run_passes(run):
    proc, _, results = run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert results['grid']['weights'] == list(FORMATS)
    assert quantised.TITLE in proc.stdout  # the section is printed too


def test_samples_carry_weights_and_quantised_cells_run_on_fused_only(run):
    _, _, results = run
    samples = results['samples']
    assert all(s['weights'] in FORMATS for s in samples)
    ok = sorted((s['session'], s['backend'], s['weights']) for s in samples
                if s['status'] == 'ok')
    assert ok == sorted((session, backend, weights) for session in (0, 1)
                        for backend, weights in (('hf', 'bf16'), ('fused', 'bf16'),
                                                 ('fused', 'int8'), ('fused', 'int4')))
    graph = [s for s in samples if s['mode'] == 'graph']  # no CUDA: skipped, weights kept
    assert len(graph) == 8 and all(s['status'] == 'skipped' for s in graph)
    assert not [s for s in samples if s['backend'] == 'hf' and s['weights'] != 'bf16']
    assert {(p['backend'], p['mode'], p['weights'], p['status']) for p in results['profile']} \
        == {(b, m, w, 'ok' if m == 'eager' else 'skipped') for m in ('eager', 'graph')
            for b, w in (('hf', 'bf16'), ('fused', 'bf16'), ('fused', 'int8'), ('fused', 'int4'))}


def test_bytes_per_step_are_the_engines_per_format(run, expected_bytes):
    _, _, results = run
    for s in results['samples']:
        if s['status'] == 'ok' and s['backend'] == 'fused':
            assert s['bytes_per_step'] == pytest.approx(expected_bytes[s['weights']])
    dense = expected_bytes['bf16']
    assert 3 < dense / expected_bytes['int8'] < 4  # weights / 4 (from float32) + scales and KV
    assert 6 < dense / expected_bytes['int4'] < 8


def _section_rows(text):
    section = text.split(f'## {quantised.TITLE}')[1].split('\n## ')[0]
    return [[c.strip() for c in line.strip('|').split('|')]
            for line in section.splitlines() if line.startswith('| tiny |')]


def test_report_section_sets_speedup_against_the_byte_ratio(run, expected_bytes):
    _, out, results = run
    rows = _section_rows((out / 'report.md').read_text())
    assert [r[:5] for r in rows] == [['tiny', str(CTX), 'fused', 'eager', 'int8'],
                                     ['tiny', str(CTX), 'fused', 'eager', 'int4']]

    def medians(weights):
        return [statistics.median(s['step_ms']) for s in sorted(
            (s for s in results['samples'] if s['status'] == 'ok' and s['backend'] == 'fused'
             and s['weights'] == weights), key=lambda s: s['session'])]
    dense_ms = statistics.fmean(medians('bf16'))
    for row, weights in zip(rows, ('int8', 'int4')):
        byte_ratio = expected_bytes['bf16'] / expected_bytes[weights]
        speedup = dense_ms / statistics.fmean(medians(weights))
        bf16_cell, quant_cell, speedup_cell, ratio_cell, share_cell, pairs = row[5:]
        assert float(bf16_cell) == pytest.approx(dense_ms, abs=1e-3)
        assert float(ratio_cell.rstrip('×')) == pytest.approx(byte_ratio, abs=0.005)
        value, lo, hi = map(float, re.match(r'([\d.]+)× \[([\d.]+), ([\d.]+)\]',
                                            speedup_cell).groups())
        # Two pairs give an interval; on a shared CPU its width says little, so only its form.
        assert value == pytest.approx(speedup, abs=1e-3) and lo <= hi
        assert share_cell.startswith(f'{speedup / byte_ratio:.0%} [')
        assert pairs == '2'


def test_summary_and_csv_carry_weights(run, expected_bytes):
    _, out, results = run
    summary = json.loads((out / 'summary.json').read_text())
    assert sorted((r['backend'], r['weights']) for r in summary) == sorted(
        [('hf', 'bf16'), ('fused', 'bf16'), ('fused', 'int8'), ('fused', 'int4')])
    for r in summary:
        quantised_row = r['weights'] != 'bf16'
        assert ('quantised_speedup' in r) == quantised_row
        if quantised_row:
            ratio = expected_bytes['bf16'] / expected_bytes[r['weights']]
            assert r['byte_ratio'] == pytest.approx(ratio)
            assert r['speedup_share_of_byte_ratio'] == pytest.approx(
                r['quantised_speedup'] / ratio)
    with open(out / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results['samples'])
    assert [r['weights'] for r in rows] == [s['weights'] for s in sorted(
        results['samples'], key=lambda s: (s['ctx'], s['backend'], s['mode'],
                                           FORMATS.index(s['weights']), s['session']))]


def test_report_and_compare_read_results_from_before_weights(run, tmp_path, capsys):
    """An old results.json (bf16 only, no weights field anywhere) still reports and compares."""
    _, out, results = run
    old = json.loads(json.dumps(results))
    old['samples'] = [s for s in old['samples'] if s['weights'] == 'bf16']
    for s in old['samples'] + old['profile']:
        del s['weights']
    del old['grid']['weights']
    old.pop('verdict')
    old_path = tmp_path / 'results.json'
    old_path.write_text(json.dumps(old))
    assert main(['report', str(old_path)]) == 0
    text = (tmp_path / 'report.md').read_text()
    assert f'| tiny | {CTX} | hf | eager | bf16 |' in text
    assert quantised.TITLE not in text
    capsys.readouterr()
    assert main(['compare', str(old_path), str(out / 'results.json')]) == 0
    printed = capsys.readouterr().out
    assert f'| tiny | {CTX} | fused | eager | bf16 |' in printed
    assert f'only in B: tiny {CTX} fused eager int4' in printed
