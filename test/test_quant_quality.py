"""Weight formats on the real SmolLM2-135M-Instruct (CPU, float32), scored by `bench quality`.

transformers' `generate()` writes the reference continuation, each format reads it
teacher-forced through the fused backend's decode path (the torch path on a CPU): unquantised
weights choose transformers' token at every position, int8 and int4 lose a little and more.
"""
import pytest

from decode_monitor.bench import quality
from decode_monitor.engine.floor import FloorModel


@pytest.fixture(scope='module')
def rows(smollm2):
    prompts = quality.prompt_ids(smollm2, 2)
    cells = quality.pairs(['fused'], ['bf16', 'int8', 'int4'])
    results = quality.evaluate(smollm2, cells, prompts, tokens=16)
    return {r['weights']: r for r in results}


def test_unquantised_follows_transformers(rows, smollm2):
    full = rows['bf16']
    assert smollm2.tokenizer.chat_template  # the prompts went through the chat template
    assert full['positions'] == 32 and full['greedy_agreement'] == 1.0
    assert full['kl_max'] < 1e-8
    assert 0 < full['logit_error_max'] < 1e-4  # another implementation: rounding differs a little
    assert full['weight_bytes'] == FloorModel.for_model(smollm2.model).weight_bytes


def test_int8_keeps_greedy_tokens(rows):
    int8 = rows['int8']
    assert [p['positions'] for p in int8['prompts']] == [16, 16]
    assert int8['greedy_agreement'] >= 0.8
    assert 1e-5 < int8['kl_mean'] < 0.01  # quantisation shows, a little


def test_quality_orders_with_bits(rows):
    int8, int4 = rows['int8'], rows['int4']
    assert rows['bf16']['kl_mean'] < int8['kl_mean'] < int4['kl_mean'] < 1.0
    assert int8['logit_error_mean'] < int4['logit_error_mean'] < 1.0
    assert int4['greedy_agreement'] > 0.4
    # float32 model, tied lm_head: int8 stores it as codes too, about a quarter of the bytes
    # (plus scales); int4 about an eighth
    full = rows['bf16']['weight_bytes']
    assert 3.5 < full / int8['weight_bytes'] < 4.0
    assert 6.0 < full / int4['weight_bytes'] < 8.0
