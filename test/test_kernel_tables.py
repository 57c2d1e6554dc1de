"""Kernel-config tables as data: the lookup order, the file format and its provenance.

The order a backend's table is found in: an explicit table (or 'defaults'), the user's cache for
this GPU and Triton version, the table shipped for this GPU model, the defaults. The shipped
tables are the package's own files; the user cache is a temporary directory named the way a
user names it, through the environment the lookup reads when a backend is built.
"""
import json
import os

import pytest

from decode_monitor.engine.fused import tables
from decode_monitor.engine.fused.configs import (
    ATTENTION_DEFAULT, DEFAULTS, UNTUNED, AttentionConfig, GemvConfig)

H100 = 'NVIDIA H100 80GB HBM3'
PROVENANCE = ('gpu_name', 'gpu_uuid', 'sm_count', 'compute_capability', 'driver', 'torch',
              'triton', 'package_version', 'created', 'command')


def write_table(path, gpu_name, gemv=(), attention=()):
    data = {'format': tables.FORMAT, 'provenance': {'gpu_name': gpu_name},
            'gemv': [dict(kind=k, weights=w, n=n, k=kk, config=list(c))
                     for k, w, n, kk, c in gemv],
            'attention': [dict(kv_heads=a, group=g, max_context=t, config=list(c))
                          for a, g, t, c in attention]}
    tables.save(str(path), data)
    return str(path)


def test_lookup_order(tmp_path):
    env = {'DECODE_MONITOR_CACHE': str(tmp_path / 'cache')}
    # no table in the cache: the one shipped for this GPU model
    shipped = tables.resolve_for(None, H100, env)
    assert shipped.source == tables.shipped_table_path(H100)
    assert shipped.gemv('head', 152064, 3584, 'int4') == GemvConfig(128, 256, 4, 1)
    # a table `bench tune` left in the user cache for this GPU and Triton version wins
    cached = write_table(tables.user_table_path(H100, environ=env), H100,
                         gemv=[('head', 'int4', 152064, 3584, (32, 256, 4, 1, 2))])
    mine = tables.resolve_for(None, H100, env)
    assert mine.source == os.path.abspath(cached)
    assert mine.gemv('head', 152064, 3584, 'int4') == GemvConfig(32, 256, 4, 1, 2)
    assert mine.gemv('gated', 18944, 3584) == DEFAULTS.gemv('gated', 18944, 3584)
    # ... but only for the Triton version it was measured with
    other = tables.user_table_path(H100, triton='0.0', environ=env)
    assert other != cached and not os.path.exists(other)
    # an explicit table wins over both; 'defaults' forces the defaults
    explicit = write_table(tmp_path / 'mine.json', 'elsewhere',
                           attention=[(4, 7, 4096, (32, 8, 4, 1))])
    chosen = tables.resolve_for(explicit, H100, env)
    assert chosen.source == os.path.abspath(explicit)
    assert chosen.attention(4, 7, 2048) == AttentionConfig(32, 8, 4, 1)  # nearest context
    assert chosen.attention(8, 4, 2048) == ATTENTION_DEFAULT  # another layout: the default
    assert tables.resolve_for('defaults', H100, env).gemv_rows == {}
    # a GPU with neither table: the defaults, saying so
    assert tables.resolve_for(None, 'Some Other GPU', env).source == UNTUNED


def test_cache_directory_follows_the_environment(tmp_path):
    assert tables.cache_dir({'DECODE_MONITOR_CACHE': 'a', 'XDG_CACHE_HOME': 'b'}) == 'a'
    assert tables.cache_dir({'XDG_CACHE_HOME': 'b'}) == os.path.join('b', 'decode_monitor')
    assert tables.cache_dir({}).endswith(os.path.join('.cache', 'decode_monitor'))
    path = tables.user_table_path('NVIDIA H200', triton='3.6.0', environ={
        'DECODE_MONITOR_CACHE': str(tmp_path)})
    assert path == str(tmp_path / 'kernel_configs' / 'nvidia-h200-triton-3.6.0.json')


@pytest.mark.parametrize('content, words', [
    (None, 'no such file'),
    ('{"format": "decode_monitor.kernel_configs/1", "gemv": [', 'not readable JSON'),
    ({'format': 'other'}, 'format'),
    ({'gemv': [dict(kind='gemv', weights='bf16', n=8, k=8, config=[3, 64, 4, 1])]},
     'gemv[0]: block_n must be a power of two'),
    ({'gemv': [dict(kind='gemv', weights='int2', n=8, k=8, config=[4, 64, 4, 1])]},
     "weights 'int2'"),
    ({'attention': [dict(kv_heads=1, group=1, max_context=8, config=[64, 0, 4, 1])]},
     'n_splits must be a positive integer'),
    ({'gemv': [dict(kind='gemv', weights='int4', n=8, k=8, config=[4, 64, 4, 1, 1, 0])]},
     'max_registers must be a positive integer'),
])
def test_a_bad_table_is_refused_by_name(tmp_path, content, words):
    path = tmp_path / 'bad.json'
    if isinstance(content, dict):
        content = json.dumps({'format': tables.FORMAT, **content})
    if content is not None:
        path.write_text(content)
    with pytest.raises(tables.TableError) as err:
        tables.load(str(path))
    assert str(path) in str(err.value) and words in str(err.value)


def test_a_bad_explicit_table_fails_before_the_model_loads(tmp_path):
    from decode_monitor.engine.factory import DecoderSettings, build_decoder
    with pytest.raises(tables.TableError, match='no such file'):
        build_decoder(DecoderSettings(model=str(tmp_path / 'no-such-model'), device='cpu',
                                      backend='fused', kernel_configs=str(tmp_path / 'x.json')))


def test_shipped_tables_name_their_gpu_and_provenance():
    files = sorted(os.listdir(tables.SHIPPED_DIR))
    assert 'nvidia-h100-80gb-hbm3.json' in files
    for name in files:
        table = tables.load(os.path.join(tables.SHIPPED_DIR, name))
        assert tables.slug(table.provenance['gpu_name']) + '.json' == name
        assert set(PROVENANCE) <= set(table.provenance)
        assert table.gemv_rows and table.attention_rows
        for earlier in table.provenance.get('earlier', []):  # runs that tuned rows kept here
            assert set(PROVENANCE) <= set(earlier)
            assert earlier['gpu_name'] == table.provenance['gpu_name']


def test_every_tune_candidate_is_a_valid_table_row(tmp_path):
    """What `bench tune` may write must load; `wide` and `waves` are `small` with more
    quantised configs."""
    from decode_monitor.bench.tune_candidates import CANDIDATES
    for name, sets in CANDIDATES.items():
        configs = [(fmt, c) for fmt, by_kind in sets['gemv'].items()
                   for listed in by_kind.values() for c in listed]
        gemv = [('gemv', fmt, n, 64, c) for n, (fmt, c) in enumerate(configs, 1)]
        attention = [(1, 1, t, c) for t, c in enumerate(sets['attention'], 2)]
        table = tables.load(write_table(tmp_path / f'{name}.json', 'cpu', gemv, attention))
        assert list(table.gemv_rows.values()) == [GemvConfig(*c) for _, c in configs]
        assert list(table.attention_rows.values()) == [AttentionConfig(*c)
                                                       for c in sets['attention']]
    for fmt in ('bf16', 'int8', 'int4'):
        small, wide, waves = (CANDIDATES[s]['gemv'][fmt]['*']
                              for s in ('small', 'wide', 'waves'))
        assert set(small) <= set(wide) and (fmt == 'bf16' or len(wide) > len(small))
        added = set(waves) - set(small)  # `waves` adds split-K counts to `small`
        assert set(small) <= set(waves) and all(GemvConfig(*c).split_k > 1 for c in added)
        assert fmt == 'bf16' or added


def test_provenance_of_this_machine():
    prov = tables.provenance('cpu', 'bench tune tiny')
    assert set(PROVENANCE) <= set(prov)
    assert prov['gpu_name'] == 'cpu' and prov['command'] == 'bench tune tiny'
    assert prov['triton'] == tables.triton_version()


def test_bench_takes_a_table_by_flag_and_its_report_names_it(tmp_path, monkeypatch):
    """`bench --kernel-configs` refuses a bad table before any session, hands a good one to
    the sessions (absolute), and report.md names the table the fused cells launched with."""
    from decode_monitor.bench import grid as G
    from decode_monitor.bench.cli import finish
    from test_bench_outputs import results, sample, thresholds
    quick = G.load('quick')
    with pytest.raises(G.GridError, match='no such file'):
        G.with_overrides(quick, kernel_configs=str(tmp_path / 'missing.json'))
    assert G.with_overrides(quick, kernel_configs='defaults').kernel_configs == 'defaults'
    path = write_table(tmp_path / 'mine.json', 'cpu', gemv=[('gemv', 'bf16', 8, 8, (4, 8, 4, 1))])
    monkeypatch.chdir(tmp_path)
    assert G.with_overrides(quick, kernel_configs='mine.json').kernel_configs == path
    samples = [dict(sample('m', 64, 'graph', s, 2.0, backend='fused'), kernel_configs=path)
               for s in range(2)]
    finish(results(samples), str(tmp_path), thresholds(), 0.95, 200)
    assert f'kernel configs: {path}' in (tmp_path / 'report.md').read_text()


def test_a_register_cap_is_kept_by_the_file_and_reaches_the_launch(tmp_path):
    """A row may cap a thread's registers (the launch's maxnreg); rows without one are written
    as before, so tables from before the field load and save unchanged."""
    from decode_monitor.engine.fused import gemv as G
    capped, plain = GemvConfig(64, 256, 4, 2, 7, 96), GemvConfig(4, 512, 4, 1)
    table = DEFAULTS.with_gemv(('gated', 'int4', 18944, 3584), capped).with_gemv(
        ('gemv', 'bf16', 3584, 3584), plain)
    data = tables.to_dict(table, {'gpu_name': 'cpu'})
    assert [row['config'] for row in data['gemv']] == [[64, 256, 4, 2, 7, 96], [4, 512, 4, 1, 1]]
    path = tmp_path / 't.json'
    tables.save(str(path), data)
    loaded = tables.load(str(path))
    assert loaded.gemv('gated', 18944, 3584, 'int4') == capped
    assert loaded.gemv('gemv', 3584, 3584) == GemvConfig(4, 512, 4, 1, 1, None)
    assert G._register_cap(capped) == {'maxnreg': 96}
    assert G._register_cap(plain) == {} and G._register_cap((8, 64, 4, 1, 2)) == {}
    assert G._split_config(capped, 3584, 128) == (64, 256, 4, 2, 7)


def test_a_staged_row_is_kept_by_the_file_and_a_bad_flag_refused(tmp_path):
    """`staged` (the int4 gate/up kernel of staged.py) is written only where it is set, comes
    back as a bool, and a table whose flag is not a bool is refused with the row named."""
    staged = GemvConfig(16, 512, 8, 1, 1, None, True)
    capped_staged = GemvConfig(16, 512, 8, 1, 1, 96, True)
    table = DEFAULTS.with_gemv(('gated', 'int4', 18944, 3584), staged).with_gemv(
        ('gated', 'int4', 14336, 4096), capped_staged)
    data = tables.to_dict(table, {'gpu_name': 'cpu'})
    assert [row['config'] for row in data['gemv']] == [[16, 512, 8, 1, 1, None, True],
                                                       [16, 512, 8, 1, 1, 96, True]]
    path = tmp_path / 't.json'
    tables.save(str(path), data)
    loaded = tables.load(str(path))
    assert loaded.gemv('gated', 18944, 3584, 'int4').staged is True
    assert loaded.gemv('gated', 14336, 4096, 'int4') == capped_staged
    assert loaded.gemv('gemv', 3584, 3584, 'int4').staged is False  # a default
    data['gemv'][0]['config'][-1] = 1
    tables.save(str(path), data)
    with pytest.raises(tables.TableError, match=r'gemv\[0\].*staged'):
        tables.load(str(path))


def test_tune_offers_staged_candidates_only_where_the_kernel_takes_the_shape():
    """A staged candidate the kernel cannot take (a split that leaves a share empty, x' of a
    share past 64 KB) would time the Triton kernel again under a row marked staged: dropped."""
    pytest.importorskip('triton.experimental.gluon')
    from decode_monitor.bench.tune import _candidates
    from decode_monitor.engine.fused.configs import GemvKey
    o_proj = _candidates('gemv', GemvKey('gemv', 'int8', 3584, 3584), False, 'small')
    down = _candidates('gemv', GemvKey('gemv', 'int8', 3584, 18944), False, 'small')
    gate_up = _candidates('gemv', GemvKey('gated', 'int4', 18944, 3584), False, 'small')
    for listed in (o_proj, down, gate_up):
        assert any(c.staged for c in listed) and any(not c.staged for c in listed)
    # 7 chunks of 512: splits of 5, 6 and 8 leave a share empty; 4 does not
    assert {c.split_k for c in o_proj if c.staged} == {1, 4}
    # 37 chunks: all of K's x' (128 KB) does not fit, a split's share does
    assert all(c.split_k > 1 for c in down if c.staged)
    assert all(c.split_k == 1 for c in gate_up if c.staged)  # RMSNorm needs all of K
