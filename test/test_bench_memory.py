"""Memory pre-check: estimates from the architecture, per-cell fit, reasons with numbers."""
import dataclasses

import pytest

from decode_monitor.bench import grid as G
from decode_monitor.bench import memory
from decode_monitor.bench.run import precheck


@pytest.fixture(scope='module')
def qwen():
    return memory.model_shape('qwen2.5-7b')


def test_parameter_counts_match_the_published_ones(qwen):
    # Published parameter counts: Qwen2.5-7B 7.616 B, Llama-3-8B 8.030 B, Mistral-7B 7.242 B.
    assert qwen.params / 1e9 == pytest.approx(7.616, abs=0.0005)
    assert memory.model_shape('llama-3-8b').params / 1e9 == pytest.approx(8.030, abs=0.0005)
    assert memory.model_shape('mistral-7b').params / 1e9 == pytest.approx(7.242, abs=0.0005)
    assert (qwen.layers, qwen.heads, qwen.kv_heads, qwen.head_dim) == (28, 28, 4, 128)


def test_cell_bytes_grow_with_context_by_the_kv_and_attention_buffers(qwen):
    base = memory.cell_bytes(qwen, 2048)
    per_token = (28 * 2 * 4 * 128 * 2) + (2 * 28 * 128 * 2) + 28 * 4
    assert memory.cell_bytes(qwen, 4096) - base == pytest.approx(per_token * 2048)
    assert base > qwen.params * 2  # weights alone in bf16
    assert memory.cell_bytes(qwen, 2048, 'float32') > base + qwen.params * 2 - 1
    assert memory.cell_bytes(qwen, 2048, margin_gb=1.5) == pytest.approx(base + 1.5e9)


def test_check_reports_need_and_free():
    assert memory.check(10e9, 10e9).fits  # equal fits
    fit = memory.check(12.5e9, 10e9)
    assert not fit.fits and fit.reason == 'does not fit in memory: needs 12.50 GB, 10.00 GB free'
    assert memory.check(1e12, None).fits  # unknown free memory: no skip


def test_precheck_skips_only_cells_that_do_not_fit(qwen):
    grid = dataclasses.replace(G.load('study'), models=('qwen2.5-7b',), memory_margin_gb=1.0,
                               steps=50, warmup=10)
    need = {ctx: memory.cell_bytes(qwen, ctx + 60, 'bfloat16', 1.0) for ctx in grid.contexts}
    free = (need[8192] + need[16384]) / 2  # 2048..8192 fit, 16384 does not
    runnable, skipped, notes = precheck(grid, 'cuda', free=free, shapes={'qwen2.5-7b': qwen})
    assert sorted({c[0] for c in runnable['qwen2.5-7b']}) == [2048, 4096, 8192]
    assert len(runnable['qwen2.5-7b']) == 6  # 3 contexts x 2 modes
    assert [(s['ctx'], s['mode']) for s in skipped] == [(16384, 'eager'), (16384, 'graph')]
    assert skipped[0]['reason'] == (f'does not fit in memory: needs {need[16384] / 1e9:.2f} GB, '
                                    f'{free / 1e9:.2f} GB free')
    assert notes == []


def test_precheck_without_free_memory_runs_everything(qwen):
    if memory.gpu_free_bytes() is not None:
        pytest.skip('this machine has a GPU that NVML reports')
    grid = dataclasses.replace(G.load('study'), models=('qwen2.5-7b',))
    runnable, skipped, notes = precheck(grid, 'cuda', free=None, shapes={'qwen2.5-7b': qwen})
    # free=None means "read it now"; without NVML the free memory is unknown
    assert skipped == [] and len(runnable['qwen2.5-7b']) == 8
    assert any('free memory unknown' in n for n in notes)


def test_memory_limit_caps_free_memory():
    ram = memory.available_ram_bytes()
    assert ram is not None and ram > 0
    assert memory.free_bytes('cpu', limit_gb=0.5) == min(ram, 0.5e9)
    gpu = memory.gpu_free_bytes()
    assert memory.free_bytes('cuda', limit_gb=0.5) == (0.5e9 if gpu is None else min(gpu, 0.5e9))
