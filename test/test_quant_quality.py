"""int8 / int4 weights on the real SmolLM2-135M-Instruct (CPU), against transformers in bf16.

A shorter run of benchmarks/quant_quality.py (whose full run is recorded): transformers'
`generate()` writes the reference continuation, each format reads it teacher-forced.
"""
import importlib.util
import os

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'quant_quality.py')


@pytest.fixture(scope='module')
def quality():
    spec = importlib.util.spec_from_file_location('quant_quality', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from decode_monitor.engine.sources import load_model
    loaded = load_model(dtype=torch.bfloat16)
    return module.evaluate(loaded, module.PROMPTS, tokens=64)


def test_int8_keeps_greedy_tokens(quality):
    assert quality['int8']['prompts'][0]['positions'] == 64
    assert quality['int8']['greedy_agreement'] >= 0.95
    assert quality['int8']['kl_mean'] < 0.01


def test_quality_orders_with_bits(quality):
    bf16, int8, int4 = quality['bf16'], quality['int8'], quality['int4']
    assert bf16['kl_mean'] < int8['kl_mean'] < int4['kl_mean'] < 1.0
    assert int4['greedy_agreement'] > 0.6
    # tied lm_head: int8 stores it as codes too, about half the bytes; int4 about a quarter
    assert 1.8 < bf16['weight_bytes'] / int8['weight_bytes'] < 2.0
    assert 3.3 < bf16['weight_bytes'] / int4['weight_bytes'] < 4.0
