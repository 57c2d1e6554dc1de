"""`bench tune` end to end on the CPU (Triton's interpreter): the tiny preset, one candidate a
shape. A real `bench tune` process is interrupted with SIGINT once it has written a shape; the
same command then resumes, tuning only the shapes left; the table it leaves in the user cache is
the one a decoder built afterwards finds, and the Triton path launched with it decodes the
reference's tokens. Timing on the interpreter proves the mechanics, not speed.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from decode_monitor.engine.fused import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, '-m', 'decode_monitor.bench', 'tune', 'tiny', '--weights', 'bf16',
           '--candidates', 'tiny', '--context', '16', '--device', 'cpu', '--no-progress']
SHAPES = 6  # tiny's q/k/v, o_proj, gate/up, down_proj, lm_head and its attention layout


def _rows(path):
    with open(path) as f:
        data = json.load(f)
    return data, {json.dumps({k: v for k, v in r.items() if k != 'config'}, sort_keys=True): r
                  for r in data['gemv'] + data['attention']}


@pytest.fixture(scope='module')
def tuned(tmp_path_factory):
    """Interrupt a run after its first shape, then resume it: (first run, second run, table)."""
    cache = str(tmp_path_factory.mktemp('cache'))
    env = {**os.environ, 'DECODE_MONITOR_CACHE': cache, 'TRITON_INTERPRET': '1',
           'PYTHONPATH': os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)}
    path = tables.user_table_path('cpu', environ=env)
    proc = subprocess.Popen(COMMAND, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    first = (proc.returncode, out, err, *_rows(path))
    second = subprocess.run(COMMAND, env=env, capture_output=True, text=True, timeout=300)
    return first, second, path, cache


def test_interrupted_run_keeps_its_shapes_and_the_rerun_resumes(tuned):
    (code, out, err, data, rows), second, path, _ = tuned
    assert code == 1, err
    assert 'interrupted' in err and path in err
    assert data['provenance']['complete'] is False
    assert 1 <= len(rows) < SHAPES, 'the interrupt should land between the first and last shape'
    assert second.returncode == 0, second.stderr
    data2, rows2 = _rows(path)
    assert data2['provenance']['complete'] is True
    assert len(rows2) == SHAPES
    for key, row in rows.items():  # done shapes are kept as measured, not timed again
        assert rows2[key] == row
    timed_again = [line for line in second.stderr.splitlines() if 'ms/step' in line]
    assert len(timed_again) == SHAPES - len(rows)
    each = [line for line in second.stderr.splitlines()  # every candidate's own median
            if line.startswith('  (') and line.endswith(' ms')]
    assert len(each) == 2 * len(timed_again)


def test_table_has_provenance_and_a_measurement_per_shape(tuned):
    *_, path, _ = tuned
    data, rows = _rows(path)
    prov = data['provenance']
    assert prov['gpu_name'] == 'cpu' and prov['triton'] == tables.triton_version()
    assert prov['command'].startswith('bench tune tiny --weights bf16')
    for row in rows.values():
        assert row['model'] == 'tiny (random weights)'
        assert row['tuned_ms'] <= row['default_ms']  # never slower than the default
        assert row['candidates'] == 2


def test_the_decoder_uses_the_tuned_table_and_decodes_the_reference_tokens(tuned, monkeypatch):
    from decode_monitor.engine.factory import DecoderSettings, build_decoder
    from decode_monitor.engine.fused.model import FusedBackend
    from decode_monitor.engine.hf_backend import HFBackend
    *_, path, cache = tuned
    monkeypatch.setenv('DECODE_MONITOR_CACHE', cache)  # where bench tune wrote it
    decoder = build_decoder(DecoderSettings(model='tiny', device='cpu', dtype='float32',
                                            mode='eager', backend='fused', max_context=16))
    assert decoder.kernel_configs_source == path
    table = tables.load(path)
    model = decoder.loaded.model
    fused = FusedBackend(model, 16, use_triton=True)  # the kernels, on the interpreter
    assert fused.kernel_configs.source == path
    for name, key in fused.gemv_keys().items():
        assert key in table.gemv_rows
        assert fused.launch_configs[name] == table.gemv(key.kind, key.n, key.k, key.weights,
                                                        on_cpu=True)
    assert fused.attention.block_t == table.attention(*fused.attention_key()).block_t
    hf = HFBackend(model, 16)
    prompt = torch.tensor([[5, 17, 42, 7]])
    tokens = {}
    for name, backend in (('hf', hf), ('fused', fused)):
        token = backend.prefill(prompt).argmax(-1, keepdim=True)
        tokens[name] = [int(token)]
        for i in range(4):
            logits = backend.forward_one(token.view(1, 1), torch.tensor([4 + i]))
            token = logits.argmax(-1, keepdim=True)
            tokens[name].append(int(token))
    assert tokens['fused'] == tokens['hf']


def test_another_command_tunes_into_a_table_and_keeps_its_rows_and_provenance(tuned, tmp_path):
    """Re-tuning some shapes into an existing table (another command, -o that table): the rows
    it holds are kept as measured, the missing ones tuned, and the table's provenance names
    this command and keeps the earlier one's under 'earlier'."""
    *_, path, cache = tuned
    data, _ = _rows(path)
    dropped = data['gemv'].pop()  # the lm_head's row: to be tuned again
    merged = tmp_path / 'merged.json'
    merged.write_text(json.dumps(data))
    env = {**os.environ, 'DECODE_MONITOR_CACHE': cache, 'TRITON_INTERPRET': '1',
           'PYTHONPATH': os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)}
    run = subprocess.run(COMMAND + ['-o', str(merged)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    timed = [line for line in run.stderr.splitlines() if 'ms/step' in line]
    assert len(timed) == 1 and f"{dropped['kind']} bf16 {dropped['n']}x{dropped['k']}" in timed[0]
    new, rows = _rows(merged)
    assert len(rows) == SHAPES
    for key, row in _rows(path)[1].items():
        if row != dropped:
            assert rows[key] == row
    prov = new['provenance']
    assert prov['command'].endswith(f'-o {merged}') and prov['complete'] is True
    assert [p['command'] for p in prov['earlier']] == [data['provenance']['command']]
    assert 'earlier' not in prov['earlier'][0]
