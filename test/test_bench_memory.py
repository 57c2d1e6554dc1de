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


def context_bytes(max_context):
    """What transformers allocates for Qwen2.5-7B at a context, measured on the meta device: its
    StaticCache (bf16), and one layer's K and V repeated to the query heads, and fp32 scores."""
    import torch
    from transformers import StaticCache
    from transformers.models.llama.modeling_llama import repeat_kv
    from decode_monitor.engine.presets import preset_config
    config = preset_config('qwen2.5-7b')
    cache = StaticCache(config=config, max_cache_len=max_context)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, torch.bfloat16,
                               'meta')
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    groups = config.num_attention_heads // config.num_key_value_heads
    keys = repeat_kv(cache.layers[0].keys, groups)  # (1, heads, max_context, head_dim)
    query = torch.empty(1, config.num_attention_heads, 1, config.head_dim, device='meta')
    scores = query @ keys.float().transpose(2, 3)  # (1, heads, 1, max_context) fp32
    return kv + 2 * keys.nbytes + scores.nbytes


def test_cell_bytes_grow_with_context_by_the_kv_and_attention_buffers(qwen):
    base = memory.cell_bytes(qwen, 2048)
    assert memory.cell_bytes(qwen, 4096) - base == context_bytes(4096) - context_bytes(2048)
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


# -- quantised weights ------------------------------------------------------------------------
def test_linear_params_are_the_matrices_and_lm_head(qwen):
    hidden, vocab, layers = 3584, 152064, 28
    embedding = vocab * hidden  # untied: lm_head is another vocab x hidden matrix, counted
    norms = layers * 2 * hidden + hidden
    qkv_biases = layers * (28 + 2 * 4) * 128
    assert qwen.linear_params == qwen.params - embedding - norms - qkv_biases


def test_quantised_copy_adds_a_half_or_a_quarter_of_the_dense_linear_bytes(qwen):
    dense = qwen.linear_params * 2  # bf16
    int8 = memory.quantised_copy_bytes(qwen.linear_params, 'int8', 'bfloat16')
    int4 = memory.quantised_copy_bytes(qwen.linear_params, 'int4', 'bfloat16')
    assert int8 / dense == pytest.approx(0.5 + 1 / 128)  # codes + one bf16 scale per 128
    assert int4 / dense == pytest.approx(0.25 + 2 / 128)  # codes + scale and offset per 128
    assert memory.quantised_copy_bytes(qwen.linear_params, 'bf16', 'bfloat16') == 0
    base = memory.cell_bytes(qwen, 2048)
    assert memory.cell_bytes(qwen, 2048, weights='int8') == pytest.approx(base + int8)
    # Off CUDA the fused torch path also holds a dequantised dense copy.
    assert memory.cell_bytes(qwen, 2048, weights='int4', device='cpu') == pytest.approx(
        base + int4 + dense)


def test_quantised_copy_estimate_matches_the_fused_backends_bytes():
    import torch
    from decode_monitor.engine import fused  # noqa: F401  registers backend fused
    from decode_monitor.engine.decoder import Decoder
    from decode_monitor.engine.fused.model import MATRICES
    from decode_monitor.engine.fused.quant import QuantWeight, weight_nbytes
    from decode_monitor.engine.sources import load_model
    loaded = load_model('tiny', dtype=torch.float32)
    linear = memory.linear_params(loaded.model)
    assert linear == memory.model_shape('tiny').linear_params
    for fmt in ('int8', 'int4'):
        backend = Decoder(loaded, mode='eager', backend='fused', max_context=32,
                          weights=fmt).backend
        stored = [getattr(layer, n) for layer in backend.layers for n in MATRICES]
        stored.append(backend.lm_head)
        assert all(isinstance(w, QuantWeight) for w in stored)
        # Every K of tiny is a multiple of 128, so the estimate is exact here.
        assert memory.quantised_copy_bytes(linear, fmt, 'float32') == sum(
            weight_nbytes(w) for w in stored)


def test_precheck_sizes_each_weight_format(qwen):
    grid = dataclasses.replace(G.load('study'), models=('qwen2.5-7b',), contexts=(2048,),
                               modes=('eager',), backends=('hf', 'fused'),
                               weights=('bf16', 'int8', 'int4'), memory_margin_gb=1.0)
    need = {w: memory.cell_bytes(qwen, 2048 + grid.warmup + grid.steps, 'bfloat16', 1.0, w)
            for w in grid.weights}
    assert need['bf16'] < need['int4'] < need['int8']
    free = (need['int4'] + need['int8']) / 2  # bf16 and int4 fit, int8 does not
    runnable, skipped, _ = precheck(grid, 'cuda', free=free, shapes={'qwen2.5-7b': qwen})
    assert runnable['qwen2.5-7b'] == [(2048, 'hf', 'eager', 'bf16', 1, 'none'),
                                      (2048, 'fused', 'eager', 'bf16', 1, 'none'),
                                      (2048, 'fused', 'eager', 'int4', 1, 'none')]
    assert [(s['backend'], s['weights']) for s in skipped] == [('fused', 'int8')]
    assert skipped[0]['need_gb'] == pytest.approx(need['int8'] / 1e9)
