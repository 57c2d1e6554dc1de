"""Grid files: the shipped ones parse, every validation error names its key, CLI overrides."""
import os

import pytest
import yaml

from decode_monitor.bench import grid as G

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _write(tmp_path, data, name='grid.yaml'):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_study_grid_holds_three_models_four_contexts_eager_and_graph():
    g = G.load('study')
    assert g.models == ('qwen2.5-7b', 'llama-3-8b', 'mistral-7b')
    assert g.contexts == (2048, 4096, 8192, 16384)
    assert g.modes == ('eager', 'graph') and g.backends == ('hf',)
    assert g.dtype == 'bfloat16' and g.sessions == 10 and g.weights == ('bf16',)
    assert len(g.cells()) == 24
    assert os.path.samefile(g.source, os.path.join(ROOT, 'config', 'bench.yaml'))


def test_quick_grid_parses():
    g = G.load('quick')
    assert g.models == ('tiny',) and g.sessions >= 2 and g.weights == ('bf16',)
    assert os.path.samefile(g.source, os.path.join(ROOT, 'config', 'bench_quick.yaml'))


def test_minimal_grid_takes_defaults(tmp_path):
    g = G.load(_write(tmp_path, {'models': ['tiny'], 'contexts': [16]}))
    assert g.modes == ('eager', 'graph') and g.backends == ('hf',) and g.order == 'random'
    assert g.weights == ('bf16',)
    assert g.verdict.min_floor_fraction == {} and g.verdict.max_step_ms is None


def test_checkpoint_directory_is_a_model(tmp_path):
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    g = G.load(_write(tmp_path, {'models': [str(ckpt)], 'contexts': [16]}))
    assert g.models == (str(ckpt),)


BASE = {'models': ['tiny'], 'contexts': [16, 32]}


@pytest.mark.parametrize('change, key', [
    ({'models': ['no-such-model']}, 'models[0]'),
    ({'models': []}, 'models'),
    ({'models': ['tiny', 'tiny']}, 'models'),
    ({'contexts': [16, 'x']}, 'contexts[1]'),
    ({'contexts': [16, 0]}, 'contexts[1]'),
    ({'contexts': [16, True]}, 'contexts[1]'),
    ({'modes': ['eager', 'turbo']}, 'modes[1]'),
    ({'backends': ['nope']}, 'backends[0]'),
    ({'weights': []}, 'weights'),
    ({'weights': ['bf16', 'int8', 'int8']}, 'weights'),
    ({'weights': ['bf16', 'fp8'], 'backends': ['fused']}, 'weights[1]'),
    ({'weights': ['bf16', 'int4']}, 'weights[1]'),  # backends defaults to [hf]
    ({'weights': ['int8'], 'backends': ['hf']}, 'weights[0]'),
    ({'dtype': 'int3'}, 'dtype'),
    ({'device': 'tpu'}, 'device'),
    ({'sessions': 0}, 'sessions'),
    ({'steps': 2.5}, 'steps'),
    ({'warmup': -1}, 'warmup'),
    ({'order': 'sideways'}, 'order'),
    ({'memory_margin_gb': -1}, 'memory_margin_gb'),
    ({'memory_limit_gb': 0}, 'memory_limit_gb'),
    ({'peak_bandwidth_gbs': 'fast'}, 'peak_bandwidth_gbs'),
    ({'confidence': 1.0}, 'confidence'),
    ({'resamples': 10}, 'resamples'),
    ({'profile_context': -5}, 'profile_context'),
    ({'colour': 'blue'}, 'colour'),
    ({'verdict': 'strict'}, 'verdict'),
    ({'verdict': {'min_floor_fraction': {'turbo': 0.5}}}, 'verdict.min_floor_fraction'),
    ({'verdict': {'min_floor_fraction': {'graph': 1.5}}}, 'verdict.min_floor_fraction.graph'),
    ({'verdict': {'max_step_ms': 0}}, 'verdict.max_step_ms'),
    ({'verdict': {'allow_throttling': 'maybe'}}, 'verdict.allow_throttling'),
    ({'verdict': {'strictness': 3}}, 'verdict.strictness'),
])
def test_each_bad_key_is_named(tmp_path, change, key):
    path = _write(tmp_path, dict(BASE, **change))
    with pytest.raises(G.GridError) as err:
        G.load(path)
    message = str(err.value)
    assert f'{key}:' in message and path in message


def test_missing_required_keys(tmp_path):
    with pytest.raises(G.GridError, match='contexts: missing'):
        G.load(_write(tmp_path, {'models': ['tiny']}))
    with pytest.raises(G.GridError, match='models: missing'):
        G.load(_write(tmp_path, {'contexts': [16]}))


def test_unreadable_files(tmp_path):
    with pytest.raises(G.GridError, match='does not exist'):
        G.load(str(tmp_path / 'absent.yaml'))
    with pytest.raises(G.GridError, match='not valid YAML'):
        G.load(_write(tmp_path, 'models: [tiny\ncontexts: ['))
    with pytest.raises(G.GridError, match='empty'):
        G.load(_write(tmp_path, ''))
    with pytest.raises(G.GridError, match='mapping'):
        G.load(_write(tmp_path, '- tiny\n- 16\n'))


def test_reference_path_is_relative_to_the_grid_file(tmp_path):
    sub = tmp_path / 'grids'
    sub.mkdir()
    (sub / 'ref.json').write_text('{}')
    g = G.load(_write(sub, dict(BASE, verdict={'reference': 'ref.json'})))
    assert g.verdict.reference == str(sub / 'ref.json')


def test_overrides_replace_and_validate():
    g = G.load('quick')
    o = G.with_overrides(g, models=['tiny-qwen2'], contexts=[8, 24], modes=['eager'],
                         sessions=3, steps=4, warmup=0, memory_limit_gb=0.5)
    assert o.models == ('tiny-qwen2',) and o.contexts == (8, 24) and o.modes == ('eager',)
    assert (o.sessions, o.steps, o.warmup, o.memory_limit_gb) == (3, 4, 0, 0.5)
    assert o.verdict == g.verdict and o.source == g.source
    assert G.with_overrides(g) == g  # nothing given: nothing changes
    with pytest.raises(G.GridError, match=r'command line: contexts\[0\]'):
        G.with_overrides(g, contexts=[-1])
    with pytest.raises(G.GridError, match=r'command line: models\[0\]'):
        G.with_overrides(g, models=['gpt-17'])


# -- weights ------------------------------------------------------------------------------------
def test_weight_formats_and_modes_are_the_engines():
    from decode_monitor.engine.decoder import MODES
    from decode_monitor.engine.fused.quant import FORMATS
    assert G.WEIGHTS == FORMATS and G.MODES == MODES


def test_backends_serving_a_format_or_a_batch_are_what_their_classes_say():
    assert {'fused', 'hf', 'persistent'} <= set(G.registered_backends())
    assert G.registered_backends(serving='bf16') == G.registered_backends()
    for fmt in ('int8', 'int4'):
        assert {'fused', 'persistent'} <= set(G.registered_backends(serving=fmt))
        assert 'hf' not in G.registered_backends(serving=fmt)
    assert 'hf' in G.registered_backends(batched=True)
    assert not {'fused', 'persistent'} & set(G.registered_backends(batched=True))
    assert G.pairs_with('persistent', 'int8') and not G.pairs_with('hf', 'int8')


def test_quantised_weights_without_fused_name_the_key_and_the_backends(tmp_path):
    path = _write(tmp_path, dict(BASE, backends=['hf'], weights=['bf16', 'int4']))
    with pytest.raises(G.GridError, match=r'weights\[1\]: int4 needs backend fused .* only hf'):
        G.load(path)


def test_cells_pair_quantised_weights_with_fused_only(tmp_path):
    g = G.load(_write(tmp_path, dict(BASE, contexts=[16], modes=['eager'],
                                     backends=['hf', 'fused'], weights=['bf16', 'int8', 'int4'])))
    assert g.weights == ('bf16', 'int8', 'int4')
    assert g.cells() == [('tiny', 16, 'hf', 'eager', 'bf16', 1, 'none'),
                         ('tiny', 16, 'fused', 'eager', 'bf16', 1, 'none'),
                         ('tiny', 16, 'fused', 'eager', 'int8', 1, 'none'),
                         ('tiny', 16, 'fused', 'eager', 'int4', 1, 'none')]
    only_quantised = G.with_overrides(g, weights=['int4'], modes=['eager', 'graph'])
    assert [(c[2], c[3], c[4]) for c in only_quantised.cells()] == [
        ('fused', 'eager', 'int4'), ('fused', 'graph', 'int4')]


def test_weights_override():
    g = G.load('quick')
    o = G.with_overrides(g, backends=['hf', 'fused'], weights=['bf16', 'int8'])
    assert o.weights == ('bf16', 'int8') and o.backends == ('hf', 'fused')
    with pytest.raises(G.GridError, match=r'command line: weights\[0\]: int8 needs backend'):
        G.with_overrides(g, weights=['int8'])  # the quick grid's backends: [hf]
    with pytest.raises(G.GridError, match=r'command line: weights\[1\]'):
        G.with_overrides(g, backends=['fused'], weights=['bf16', 'int2'])


def test_weights_flag_on_the_command_line(capsys, tmp_path):
    from decode_monitor.bench.cli import main
    out = ['-o', str(tmp_path)]  # should a refusal regress, the run lands here, not in the cwd
    assert main(['--grid', 'quick', '--weights', 'int8', *out]) == 2
    assert 'weights[0]: int8 needs backend fused' in capsys.readouterr().err
    assert main(['--grid', 'quick', '--weights', 'int3', *out]) == 2  # argparse: not a choice
    assert "invalid choice: 'int3'" in capsys.readouterr().err
