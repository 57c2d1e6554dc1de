"""Floor accounting against counts nobody here computed: the study's published byte counts, and
the bytes transformers' own StaticCache actually allocates."""
import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache

from decode_monitor.engine.floor import FloorModel, measure_copy_bandwidth
from decode_monitor.engine.presets import preset_config

# Bytes a bf16 decode step reads, as published with the study (weights, lm_head in full, one
# embedding row), in GB; and the models' published parameter counts in billions.
PUBLISHED = {'qwen2.5-7b': (14.14, 7.616), 'llama-3-8b': (15.01, 8.030),
             'mistral-7b': (14.22, 7.242)}
# The models' public shapes: hidden, intermediate, layers, heads, KV heads, vocab, q/k/v biases.
SHAPES = {'qwen2.5-7b': (3584, 18944, 28, 28, 4, 152064, True),
          'llama-3-8b': (4096, 14336, 32, 32, 8, 128256, False),
          'mistral-7b': (4096, 14336, 32, 32, 8, 32000, False)}


def step_bytes(hidden, inter, layers, heads, kv_heads, vocab, bias):
    """Bytes one bf16 step reads, added up matrix by matrix (untied lm_head)."""
    d = hidden // heads
    layer = (hidden * heads * d + 2 * hidden * kv_heads * d  # q, k, v
             + heads * d * hidden + 3 * hidden * inter  # o, gate, up, down
             + 2 * hidden  # the two RMSNorms
             + ((heads + 2 * kv_heads) * d if bias else 0))
    return 2 * (layers * layer + hidden + vocab * hidden + hidden)  # + norm, lm_head, one row


def meta_model(name):
    with torch.device('meta'):
        return AutoModelForCausalLM.from_config(preset_config(name), dtype=torch.bfloat16)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_weight_bytes_match_published_counts(name):
    model = meta_model(name)
    weight_gb, params_b = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(params_b, abs=5e-4)
    weight_bytes = FloorModel.for_model(model).weight_bytes
    assert weight_bytes / 1e9 == pytest.approx(weight_gb, abs=5e-3)
    # to the byte: one embedding row (7-8 KB) or a norm too many or too few shows here
    assert weight_bytes == step_bytes(*SHAPES[name])


@pytest.mark.parametrize('name', ['tiny', 'tiny-qwen2', 'smollm2-135m'])
def test_kv_bytes_per_token_match_static_cache_allocation(name):
    config = preset_config(name)
    with torch.device('cpu'):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    cache = StaticCache(config=config, max_cache_len=64)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, torch.bfloat16,
                               'cpu')
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    floor = FloorModel.for_model(model)
    assert floor.kv_bytes_per_token == allocated // 64
    assert floor.bytes_per_step(99) - floor.bytes_per_step(0) == 99 * allocated // 64


def test_tied_embedding_counted_once_in_full():
    model = meta_model('smollm2-135m')
    params = sum(p.numel() for p in model.parameters())  # tied: the table appears once
    assert FloorModel.for_model(model).weight_bytes == params * 2


def test_floor_ms_and_copy_bandwidth():
    floor = FloorModel(weight_bytes=10**9, kv_bytes_per_token=1000)
    assert floor.floor_ms(999, 1e12) == pytest.approx((10**9 + 10**6) / 1e12 * 1e3)
    assert measure_copy_bandwidth('cpu', size_mib=32, repeats=3) > 1e8
