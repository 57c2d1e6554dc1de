"""figures_axes from synthetic runs with known values: the plotted data itself is checked (the
figure each function saves is kept through Figure.savefig), and [] where a run holds nothing."""
import matplotlib.figure
import pytest

from decode_monitor.bench import figures_axes as F
from decode_monitor.bench.verdict import ATTENTION_FORMAT

SPEEDUP = {(2048, 1): 1.25, (2048, 8): 2.0, (16384, 1): 1.1, (16384, 8): 1.5}
EAGER = {(2048, 1): 20.0, (2048, 8): 30.0, (16384, 1): 25.0, (16384, 8): 60.0}
SLOWDOWN = {'copy': 1.5, 'matmul': 1.8}


@pytest.fixture
def saved(monkeypatch):
    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', keep)
    return figures


def sample(ctx, mode, session, ms, batch=1, co_runner='none'):
    return {'model': 'm', 'ctx': ctx, 'backend': 'hf', 'mode': mode, 'weights': 'bf16',
            'batch': batch, 'co_runner': co_runner, 'session': session, 'status': 'ok',
            'step_ms': [ms] * 5, 'floor_ms_peak': 1.0, 'floor_ms_copy': 1.1,
            'bytes_per_step': 3e9}


def run(samples, device='GPU X'):
    return {'format': 'decode_monitor.bench/1',
            'environment': {'device_name': device, 'peak_bandwidth': 3e12},
            'grid': {'confidence': 0.95, 'resamples': 300}, 'samples': samples}


def synthetic(device='GPU X', scale=1.0, sessions=3):
    out = []
    for s in range(sessions):
        drift = 1 + 0.01 * s
        for (ctx, batch), eager in EAGER.items():
            graph = eager * scale / SPEEDUP[(ctx, batch)]
            out.append(sample(ctx, 'eager', s, eager * scale * drift, batch))
            out.append(sample(ctx, 'graph', s, graph * drift, batch))
            if batch == 1:
                for runner, factor in SLOWDOWN.items():
                    out.append(sample(ctx, 'graph', s, graph * drift * factor, batch, runner))
    return run(out, device)


def attention_run(device='GPU X'):
    rows = []
    for ctx in (2048, 4096, 8192):
        rows += [{'impl': 'sdpa-math', 'ctx': ctx, 'status': 'ok', 'us_per_layer': ctx / 100},
                 {'impl': 'flash-decoding', 'ctx': ctx, 'status': 'ok',
                  'us_per_layer': ctx / 1000},
                 {'impl': 'sdpa-cudnn', 'ctx': ctx, 'status': 'unavailable',
                  'reason': 'RuntimeError: no kernel'}]
    return {'format': ATTENTION_FORMAT, 'environment': {'device_name': device},
            'model': 'qwen2.5-7b', 'dtype': 'bfloat16',
            'shape': {'q_heads': 28, 'kv_heads': 4, 'head_dim': 128, 'layers': 28},
            'rows': rows}


def series(ax):
    """label -> (x, y) of every errorbar series on the axes."""
    out = {}
    for container in ax.containers:
        if hasattr(container, 'has_xerr'):  # an ErrorbarContainer
            line = container.lines[0]
            out[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


def test_graph_speedup_against_context_and_batch(saved, tmp_path):
    paths = F.graph_speedup_vs_batch([synthetic(), attention_run()], str(tmp_path))
    assert paths == [str(tmp_path / F.SPEEDUP_BATCH)]
    assert open(paths[0], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    by_ctx, by_batch = saved[0].axes
    lines = series(by_ctx)
    assert lines['batch 1'][0] == [2048, 16384]
    assert lines['batch 1'][1] == pytest.approx([1.25, 1.1])
    assert lines['batch 8'][1] == pytest.approx([2.0, 1.5])
    lines = series(by_batch)
    assert set(lines) == {'ctx 2048', 'ctx 16384'}  # co-runner cells have no eager pair
    assert lines['ctx 2048'] == ([1, 8], pytest.approx([1.25, 2.0]))
    assert by_batch.get_xlabel() == 'batch (sequences per step)'


def test_two_devices_share_the_figure_named_by_device(saved, tmp_path):
    F.graph_speedup_vs_batch([synthetic('GPU A'), synthetic('GPU B')], str(tmp_path))
    assert {'GPU A batch 8', 'GPU B batch 8'} <= set(series(saved[0].axes[0]))


def test_step_time_per_co_runner(saved, tmp_path):
    paths = F.step_time_per_co_runner([synthetic()], str(tmp_path))
    assert paths == [str(tmp_path / F.CO_RUNNER)]
    ax = saved[0].axes[0]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers
            if hasattr(c, 'patches')}
    alone = [EAGER[(ctx, 1)] / SPEEDUP[(ctx, 1)] * 1.01 for ctx in (2048, 16384)]
    assert bars['none'] == pytest.approx(alone)
    for runner, factor in SLOWDOWN.items():
        assert bars[runner] == pytest.approx([ms * factor for ms in alone])
    assert sorted(t.get_text() for t in ax.texts) == ['1.50×', '1.50×', '1.80×', '1.80×']
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        'm\nctx 2048 hf graph bf16', 'm\nctx 16384 hf graph bf16']


def test_attention_time_per_layer_by_implementation(saved, tmp_path):
    paths = F.attention_per_layer([synthetic(), attention_run()], str(tmp_path))
    assert paths == [str(tmp_path / F.ATTENTION)]
    ax = saved[0].axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines()}
    assert lines == {'sdpa-math': ([2048, 4096, 8192], [20.48, 40.96, 81.92]),
                     'flash-decoding': ([2048, 4096, 8192], [2.048, 4.096, 8.192])}
    assert [t.get_text() for t in ax.texts] == ['unavailable here: sdpa-cudnn']


def test_nothing_to_draw_draws_nothing(tmp_path):
    eager_only = run([sample(2048, 'eager', s, 20.0) for s in range(2)])
    nothing = attention_run()
    for row in nothing['rows']:
        row.update(status='unavailable', reason='no GPU')
    for fn in F.FIGURES_AXES:
        assert fn([], str(tmp_path)) == []
    assert F.graph_speedup_vs_batch([eager_only, attention_run()], str(tmp_path)) == []
    assert F.step_time_per_co_runner([eager_only, attention_run()], str(tmp_path)) == []
    assert F.attention_per_layer([synthetic(), nothing], str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []
    assert F.FIGURES_AXES == (F.graph_speedup_vs_batch, F.step_time_per_co_runner,
                              F.attention_per_layer)
