"""`bench quality`: our decode path against transformers' own, on the CPU in float32.

Unquantised weights in float32 must choose transformers' greedy token at every position: the
reference is transformers' `generate()`, our side is the decoder's prefill and decode steps.
The same on the real SmolLM2, with int8 and int4, is in test_quant_quality.
"""
import json

import pytest

from decode_monitor.bench import quality
from decode_monitor.bench.cli import main


def _check_exact(row):
    assert row['greedy_agreement'] == 1.0
    assert row['kl_max'] < 1e-8
    # another implementation: rounding differs a little, so never bit for bit the reference
    assert 0 < row['logit_error_max'] < 1e-4


def test_cli_fused_and_hf_follow_transformers_on_tiny(tmp_path, capsys):
    out = tmp_path / 'quality.json'
    code = main(['quality', '--model', 'tiny', '--backends', 'fused', 'hf', '--weights',
                 'bf16', '--tokens', '12', '--prompts', '2', '--device', 'cpu', '-o', str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert '| fused | bf16 |' in printed and '| hf | bf16 |' in printed
    record = json.loads(out.read_text())
    assert record['format'] == quality.FORMAT and record['dtype'] == 'float32'
    assert record['environment']['command'].startswith('bench quality --model tiny')
    rows = {(r['backend'], r['weights']): r for r in record['results']}
    assert set(rows) == {('fused', 'bf16'), ('hf', 'bf16')}
    for row in rows.values():
        assert row['positions'] == 24 and [p['positions'] for p in row['prompts']] == [12, 12]
        _check_exact(row)


def test_random_prompts_of_a_given_length(tmp_path):
    out = tmp_path / 'quality.json'
    assert main(['quality', '--model', 'tiny', '--weights', 'bf16', '--prompt-tokens', '40',
                 '--prompts', '2', '--tokens', '4', '--device', 'cpu', '-o', str(out)]) == 0
    record = json.loads(out.read_text())
    assert [len(p) for p in record['prompts']] == [40, 40]
    assert record['prompts'][0] != record['prompts'][1]
    [row] = record['results']
    assert row['positions'] == 8
    _check_exact(row)


def test_float32_reference_adds_transformers_in_the_model_dtype(tmp_path):
    out = tmp_path / 'quality.json'
    code = main(['quality', '--model', 'tiny', '--dtype', 'bfloat16', '--reference-dtype',
                 'float32', '--weights', 'bf16', '--tokens', '8', '--prompts', '1', '--device',
                 'cpu', '-o', str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert (record['dtype'], record['reference_dtype']) == ('bfloat16', 'float32')
    own, fused = record['results']
    assert (own['backend'], fused['backend']) == (quality.REFERENCE, 'fused')
    # bf16 rounding shows against the float32 copy, in transformers as in fused, alike
    assert 1e-4 < own['logit_error_mean'] < 0.1
    assert 1e-4 < fused['logit_error_mean'] < 3 * own['logit_error_mean']


@pytest.mark.parametrize('argv, message', [
    (['--backends', 'hf', '--weights', 'int8'], 'weights int8 need backend fused'),
    (['--backends', 'nope'], "backend 'nope'"),
    (['--tokens', '0'], '--tokens: expected a positive integer'),
    (['--model', '/no/such/dir'], 'no such file or directory'),
])
def test_usage_errors_exit_2(capsys, argv, message):
    assert main(['quality', '--device', 'cpu'] + argv) == 2
    assert message in capsys.readouterr().err
