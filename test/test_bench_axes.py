"""The batch and co-runner axes: floor bytes, the batched hf step, the grid's checks, the analysis
and report per axis (synthetic results with known answers), and a real CPU run of both axes."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import StaticCache

from decode_monitor.bench import analysis, report, verdict
from decode_monitor.bench import grid as G
from decode_monitor.bench import memory
from decode_monitor.bench.cli import finish, main
from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.floor import FloorModel
from decode_monitor.engine.presets import preset_config

ROOT = os.path.join(os.path.dirname(__file__), '..')
BASE = {'models': ['tiny'], 'contexts': [16]}
STEPS = 200  # of the real run: long against a co-runner that dies 1.2 s after it started


# -- the floor of a batch ----------------------------------------------------------------------
def test_floor_counts_weights_once_and_the_kv_of_every_sequence(tiny):
    """Expected bytes added up from the tiny preset's shapes (float32), not from FloorModel."""
    layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256 + 2 * 128
    weights = 4 * (2 * layer + 128 + 512 * 128 + 128)  # + final norm, lm_head, one embed row
    kv_token = 4 * 2 * 2 * 2 * 32  # fp32 x layers x (K, V) x KV heads x head_dim
    for batch in (1, 2, 16):
        floor = FloorModel.for_model(tiny.model, batch=batch)
        for pos in (0, 99):
            assert floor.bytes_per_step(pos) == weights + batch * kv_token * (pos + 1)


def test_floor_kv_of_a_batch_is_what_static_cache_allocates():
    config = preset_config('tiny-qwen2')
    cache = StaticCache(config=config, max_cache_len=64)
    cache.early_initialization(8, config.num_key_value_heads, config.head_dim, torch.bfloat16,
                               'cpu')
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    floor = FloorModel(weight_bytes=0, kv_bytes_per_token=FloorModel.for_model(
        _meta('tiny-qwen2')).kv_bytes_per_token, batch=8)
    assert floor.bytes_per_step(63) == allocated  # 64 positions of 8 sequences


def _meta(name):
    from transformers import AutoModelForCausalLM
    with torch.device('meta'):
        return AutoModelForCausalLM.from_config(preset_config(name), dtype=torch.bfloat16)


# -- the batched hf step -----------------------------------------------------------------------
def test_a_batched_step_computes_each_sequence_as_batch_one_would(tiny):
    batch, pos = 3, 10
    big = Decoder(tiny, mode='eager', backend='hf', max_context=32, batch=batch)
    assert big.batch == batch and big.floor.batch == batch
    torch.manual_seed(1)
    big.backend.randomize_cache()
    tokens = torch.tensor([[5], [77], [300]])
    big._seek(pos)
    with torch.no_grad():
        logits = big.backend.forward_one(tokens, torch.tensor([pos]))
    assert logits.shape == (batch, 512)
    for b in range(batch):
        one = Decoder(tiny, mode='eager', backend='hf', max_context=32)
        for mine, theirs in zip(one.backend.cache.layers, big.backend.cache.layers):
            mine.keys.copy_(theirs.keys[b:b + 1])
            mine.values.copy_(theirs.values[b:b + 1])
        one._seek(pos)
        with torch.no_grad():
            expected = one.backend.forward_one(tokens[b:b + 1], torch.tensor([pos]))
        torch.testing.assert_close(logits[b:b + 1], expected, rtol=1e-4, atol=1e-4)
    # greedy steps advance every sequence: one token each, at the same position
    times = big.time_steps(pos, 3, warmup=1)
    assert len(times) == 3 and big.token.shape == (batch, 1) and int(big.pos) == pos + 4


def test_batch_one_only_backends_and_serving_refuse_a_batch(tiny):
    with pytest.raises(ValueError, match=r"backend 'fused' decodes batch 1 only, not batch 4 "
                       r'\(batched: hf\)'):
        Decoder(tiny, mode='eager', backend='fused', max_context=32, batch=4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match='batch must be a positive integer'):
            Decoder(tiny, mode='eager', backend='hf', max_context=32, batch=bad)
    decoder = Decoder(tiny, mode='eager', backend='hf', max_context=32, batch=2)
    with pytest.raises(ValueError, match='generate.. decodes one sequence'):
        next(decoder.generate([1, 2, 3]))


# -- the grid ----------------------------------------------------------------------------------
def test_batches_and_co_runners_become_cells():
    g = G.from_mapping(dict(BASE, modes=['eager'], batches=[1, 2, 4, 8, 16],
                            co_runners=['none', 'copy', 'matmul', 'sleep 5']))
    assert g.batches == G.BATCHES
    assert len(g.cells()) == 5 * 4
    assert g.cells()[:3] == [('tiny', 16, 'hf', 'eager', 'bf16', 1, 'none'),
                             ('tiny', 16, 'hf', 'eager', 'bf16', 1, 'copy'),
                             ('tiny', 16, 'hf', 'eager', 'bf16', 1, 'matmul')]
    assert G.from_mapping(BASE).batches == (1,)
    assert G.from_mapping(BASE).co_runners == ('none',)


@pytest.mark.parametrize('raw, message', [
    (dict(batches=[1, 0]), 'batches[1]: expected a positive integer, got 0'),
    (dict(batches=['x']), "batches[0]: expected a positive integer, got 'x'"),
    (dict(batches=[1, 1]), 'batches: expected a list without duplicates'),
    (dict(backends=['hf', 'fused'], batches=[1, 4]),
     'batches[1]: batch 4 needs a batched backend (hf); fused decodes batch 1 only'),
    (dict(co_runners=['none', '']), 'co_runners[1]: expected none, copy, matmul, idle or a '
     "command line, got ''"),
    (dict(co_runners=["sh -c 'unclosed"]), "co_runners[0]: \"sh -c 'unclosed\" is not a "
     'command line: No closing quotation'),
    (dict(co_runners=[3]), 'co_runners[0]: expected none, copy, matmul, idle or a command '
     'line, got 3'),
])
def test_bad_axes_are_named(raw, message):
    with pytest.raises(G.GridError) as err:
        G.from_mapping(dict(BASE, **raw))
    assert message in str(err.value)


def test_axes_from_the_command_line(tmp_path, capsys):
    g = G.with_overrides(G.load('quick'), batches=[2, 8], co_runners=['copy'])
    assert (g.batches, g.co_runners) == ((2, 8), ('copy',))
    out = tmp_path / 'out'  # a refusal writes nothing, even where it was told to
    assert main(['--grid', 'quick', '--backends', 'fused', '--batches', '1', '4',
                 '-o', str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert 'command line: batches[1]: batch 4 needs a batched backend (hf); fused decodes ' \
           'batch 1 only' in err


def test_memory_need_grows_with_the_batch_and_a_co_runner():
    shape = memory.model_shape('qwen2.5-7b')
    ctx = 2048
    per_sequence = (shape.layers * 2 * shape.kv_heads * shape.head_dim * ctx * 2  # KV, bf16
                    + 2 * shape.heads * shape.head_dim * ctx * 2  # repeated K/V
                    + shape.heads * ctx * 4 + shape.vocab * 8)  # scores, logits
    one = memory.cell_bytes(shape, ctx)
    assert memory.cell_bytes(shape, ctx, batch=16) - one == pytest.approx(15 * per_sequence)
    assert memory.cell_bytes(shape, ctx, co_runner='copy') - one == pytest.approx(2**31 + 0.5e9)
    assert memory.cell_bytes(shape, ctx, co_runner='sleep 5') == one


# -- analysis and report on synthetic results --------------------------------------------------
def sample(ctx, mode, session, ms, batch=None, co_runner=None):
    """A measured cell with constant steps (medians exact); without batch/co_runner it has no
    such field, as results written before those axes were do not."""
    extra = {k: v for k, v in (('batch', batch), ('co_runner', co_runner)) if v is not None}
    return {**extra, 'model': 'm', 'ctx': ctx, 'backend': 'hf', 'mode': mode,
            'weights': 'bf16', 'session': session, 'status': 'ok', 'step_ms': [ms] * 5,
            'floor_ms_peak': 1.0, 'floor_ms_copy': 1.1, 'peak_bandwidth': 3e12,
            'copy_bandwidth': 2.7e12, 'bytes_per_step': 3e9}


def results(samples):
    return {'format': 'decode_monitor.bench/1',
            'environment': {'device_name': 'GPU X', 'peak_bandwidth': 3e12},
            'grid': {'sessions': 3, 'steps': 5, 'warmup': 1, 'resamples': 500},
            'sessions': [], 'samples': samples, 'skipped': [], 'profile': []}


# known: eager ms and graph speedup per (ctx, batch); co-runner slowdowns on graph cells
SPEEDUP = {(2048, 1): 1.25, (2048, 8): 2.0, (16384, 1): 1.1, (16384, 8): 1.5}
EAGER = {(2048, 1): 20.0, (2048, 8): 30.0, (16384, 1): 25.0, (16384, 8): 60.0}
SLOWDOWN = {'copy': 1.5, 'matmul': 1.8}


def axes_results(sessions=3):
    out = []
    for s in range(sessions):
        drift = 1 + 0.01 * s  # sessions differ; the cells of one session share it
        for (ctx, batch), eager in EAGER.items():
            graph = eager / SPEEDUP[(ctx, batch)]
            out.append(sample(ctx, 'eager', s, eager * drift, batch, 'none'))
            out.append(sample(ctx, 'graph', s, graph * drift, batch, 'none'))
            if batch == 1:
                for runner, factor in SLOWDOWN.items():
                    out.append(sample(ctx, 'graph', s, graph * drift * factor, batch, runner))
    return results(out)


def test_speedups_are_per_batch_and_co_runner():
    rows = analysis.speedups(axes_results(), resamples=500)
    by = {(r['ctx'], r['batch'], r['co_runner']): r['speedup'].value for r in rows}
    for key, value in SPEEDUP.items():
        assert by[(*key, 'none')] == pytest.approx(value)
    # a co-runner cell has a graph speedup only where its eager cell exists: here none
    assert {k[2] for k in by} == {'none'}


def test_co_runner_slowdowns_pair_each_cell_with_the_same_cell_alone():
    rows = analysis.co_runner_slowdowns(axes_results(), resamples=500)
    assert [(r['ctx'], r['co_runner']) for r in rows] == [
        (2048, 'copy'), (2048, 'matmul'), (16384, 'copy'), (16384, 'matmul')]
    for r in rows:
        assert r['slowdown'].value == pytest.approx(SLOWDOWN[r['co_runner']])
        assert r['slowdown'].lo == pytest.approx(SLOWDOWN[r['co_runner']])  # constant ratio
        alone = EAGER[(r['ctx'], 1)] / SPEEDUP[(r['ctx'], 1)] * 1.01
        assert r['alone_ms'] == pytest.approx(alone)
        assert r['co_runner_ms'] == pytest.approx(alone * SLOWDOWN[r['co_runner']])
        assert r['pairs'] == 3


def test_report_verdict_and_summary_group_by_the_axes(tmp_path):
    run = axes_results()
    outcome, cells, speedups, _ = finish(run, str(tmp_path), G.Verdict(max_step_ms=30.0), 0.95,
                                         500)
    assert len(cells) == 8 + 4
    text = (tmp_path / 'report.md').read_text()
    assert '| model | ctx | backend | mode | weights | batch | co-runner | ms/step' in text
    assert '## Step time per co-runner' in text
    # the section's rows are all batch 1: no batch column there
    row = "| m | 2048 | hf | graph | bf16 | copy | 16.160 | 24.240 | 1.500× [1.500, 1.500] | 3 |"
    assert row \
        in text
    # the verdict: every cell with its step time; batch 8 eager at 16384 (60 ms) is over 30 ms
    rows = {(c['ctx'], c['mode'], c['batch'], c['co_runner']): c for c in outcome['cells']}
    assert rows[(16384, 'eager', 8, 'none')]['ms_per_step'] == pytest.approx(60.6)
    assert not rows[(16384, 'eager', 8, 'none')]['passed']
    assert rows[(2048, 'graph', 1, 'copy')]['passed']
    assert '| m | 16384 | hf | eager | bf16 | 8 | none | 60.600 | FAIL |' in text
    summary = json.loads((tmp_path / 'summary.json').read_text())
    copy = [r for r in summary if r['co_runner'] == 'copy' and r['ctx'] == 2048][0]
    assert copy['co_runner_slowdown'] == pytest.approx(1.5) and copy['batch'] == 1
    csv_head = (tmp_path / 'results.csv').read_text().splitlines()[0]
    assert csv_head.startswith('model,ctx,backend,mode,weights,batch,co_runner,session')


def test_results_without_the_axes_read_as_batch_one_alone_and_show_no_columns(tmp_path):
    old = results([sample(64, mode, s, ms) for s in range(2)
                   for mode, ms in (('eager', 10.0), ('graph', 8.0))])
    cells = analysis.cell_stats(old, resamples=500)
    assert {(c['batch'], c['co_runner']) for c in cells} == {(1, 'none')}
    table = report.results_table(cells, analysis.speedups(old, resamples=500), 0.95)
    assert table.splitlines()[0].startswith('| model | ctx | backend | mode | weights | ms/step')
    assert analysis.co_runner_slowdowns(old) == []


# -- a real run of both axes on the CPU ---------------------------------------------------------
def _gone(pid, timeout_s=10.0):
    """The process ended: no /proc entry, or a zombie nobody reaped yet."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope='module')
def axes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('axes')
    # alive through the 1 s a command is given to settle, dead long before 200 steps end
    dies = f'{sys.executable} -c "import sys, time; time.sleep(1.2); sys.exit(5)"'
    cmd = [sys.executable, '-m', 'decode_monitor.bench', '--grid', 'quick', '--device', 'cpu',
           '--contexts', '16', '--modes', 'eager', '--sessions', '1', '--steps', str(STEPS),
           '--warmup', '1', '--batches', '1', '2', '--co-runners', 'none', 'copy', dies,
           'no-such-co-runner-command', '--no-progress', '-o', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    with open(out / 'results.json') as f:
        return proc, out, json.load(f), dies


def test_real_run_carries_batch_and_co_runner_and_fails_on_dead_co_runners(axes_run):
    proc, out, run, dies = axes_run
    assert proc.returncode == 1, proc.stderr[-2000:]  # the verdict fails: co-runners died
    by = {(s['batch'], s['co_runner']): s for s in run['samples']}
    assert set(by) == {(b, r) for b in (1, 2)
                       for r in ('none', 'copy', dies, 'no-such-co-runner-command')}
    for b in (1, 2):
        assert by[(b, 'none')]['status'] == 'ok' and 'co_runner_run' not in by[(b, 'none')]
        copy = by[(b, 'copy')]
        assert copy['status'] == 'ok', copy.get('reason')
        ran = copy['co_runner_run']
        assert ran['status'] == 'ran' and ran['stopped_by'] == 'SIGTERM'
        assert ran['iterations'] > 0 and ran['rate'] > 0 and ran['device'] == 'cpu'
        assert ran['pid'] != run['sessions'][0]['pid'] and _gone(ran['pid'])
        died = by[(b, dies)]
        assert died['status'] == 'error'
        assert died['reason'].startswith(f'co-runner {dies}: exited with code 5 while the '
                                         'steps ran')
        assert _gone(died['co_runner_run']['pid'])
        missing = by[(b, 'no-such-co-runner-command')]
        assert missing['status'] == 'error' and 'exited with code 127 before it was ready: ' \
            "corunner: cannot run 'no-such-co-runner-command'" in missing['reason']
    # the floor of batch 2 counts the K/V of both sequences (float32 tiny: 1024 B a token)
    delta = by[(2, 'none')]['bytes_per_step'] - by[(1, 'none')]['bytes_per_step']
    mean_pos = 16 + (STEPS - 1) / 2  # the timed steps run from ctx on
    assert delta == pytest.approx(1024 * (mean_pos + 1))
    text = (out / 'report.md').read_text()
    assert '| tiny | 16 | hf | eager | bf16 | 2 | copy |' in text
    assert verdict.load_results(str(out / 'results.json'))['grid']['batches'] == [1, 2]
