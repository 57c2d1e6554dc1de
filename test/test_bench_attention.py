"""`bench attention` on the CPU: the real implementations that run here, checked against an
attention written out by hand; the ones that cannot run listed with a reason; bad input refused."""
import json
import math

import pytest
import torch

from decode_monitor.bench import attention, figures_axes, verdict
from decode_monitor.bench.cli import main

CONTEXTS = (16, 40)


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp('attention') / 'attention.json'
    code = main(['attention', '--model', 'tiny', '--contexts', *map(str, CONTEXTS),
                 '--iters', '2', '-o', str(path)])
    with open(path) as f:
        return code, path, json.load(f)


def test_the_math_reference_is_attention(tiny):
    """Layer 0's reference against softmax(q k^T / sqrt(d)) v written out, GQA by hand."""
    shape = attention.attention_shape('tiny')
    assert shape == {'q_heads': 4, 'kv_heads': 2, 'head_dim': 32, 'layers': 2}
    inputs = attention.Inputs(shape, 24, torch.float32, 'cpu')
    q, k, v = inputs.q[0, :, 0], inputs.k[0][0], inputs.v[0][0]  # (4, 32), (2, 24, 32) x2
    out = []
    for h in range(4):
        kv = h // 2  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        weights = torch.softmax(k[kv] @ q[h] / math.sqrt(32), dim=0)
        out.append(weights @ v[kv])
    torch.testing.assert_close(inputs.reference(), torch.cat(out), rtol=1e-5, atol=1e-6)


def test_every_implementation_is_timed_or_says_why_not(measured):
    code, path, result = measured
    assert code == 0
    assert result['format'] == attention.FORMAT and result['partial'] is False
    assert result['model'] == 'tiny' and result['dtype'] == 'float32'
    assert result['shape']['layers'] == 2
    rows = {(r['impl'], r['ctx']): r for r in result['rows']}
    assert set(rows) == {(i, c) for i in attention.IMPLEMENTATIONS for c in CONTEXTS}
    for ctx in CONTEXTS:
        for impl in ('sdpa-math', 'sdpa-flash', 'flash-decoding'):  # these run on a CPU
            row = rows[(impl, ctx)]
            assert row['status'] == 'ok', row.get('reason')
            assert row['us_per_layer'] > 0 and row['timing'] == 'wall'
            assert row['max_abs_err'] < 1e-4  # against the float32 reference
        assert rows[('sdpa-math', ctx)]['gqa'] == 'native'
        if not torch.cuda.is_available():
            for impl in ('sdpa-efficient', 'sdpa-cudnn'):  # CUDA kernels only
                row = rows[(impl, ctx)]
                assert row['status'] == 'unavailable'
                assert row['reason'].startswith('RuntimeError: No viable backend')
    assert '| ctx | sdpa-math | sdpa-efficient | sdpa-flash | sdpa-cudnn | flash-decoding |' \
        in attention.table(result)


def test_the_loader_tells_an_attention_file_from_results(measured):
    _, path, result = measured
    assert verdict.load_run(str(path)) == result
    with pytest.raises(verdict.VerdictUsageError, match='a `bench attention` file, not a bench '
                       'results.json'):
        verdict.load_results(str(path))


def test_the_figure_plots_the_measured_rows(measured, tmp_path, monkeypatch):
    import matplotlib.figure
    saved = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig',
                        lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))[1])
    _, path, result = measured
    paths = figures_axes.attention_per_layer([verdict.load_run(str(path))], str(tmp_path))
    assert paths == [str(tmp_path / figures_axes.ATTENTION)]
    ax = saved[0].axes[0]
    plotted = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
               for line in ax.get_lines()}
    for impl, (xs, ys) in plotted.items():
        rows = sorted((r['ctx'], r['us_per_layer']) for r in result['rows']
                      if r['impl'] == impl and r['status'] == 'ok')
        assert xs == [r[0] for r in rows] and ys == [r[1] for r in rows]
    assert {'sdpa-math', 'sdpa-flash', 'flash-decoding'} <= set(plotted)


@pytest.mark.parametrize('args, message', [
    (['--model', 'no-such-model'], "--model: 'no-such-model'"),
    (['--contexts', '0'], '--contexts[0]: expected a positive integer, got 0'),
    (['--iters', '0'], '--iters: expected a positive integer, got 0'),
])
def test_bad_input_is_refused_before_anything_runs(args, message, tmp_path, capsys):
    out = tmp_path / 'a.json'
    assert main(['attention', *args, '-o', str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
