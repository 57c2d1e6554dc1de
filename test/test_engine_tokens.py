"""The decoder's tokens against transformers' own generate() on the real SmolLM2."""
import pytest
import torch

from decode_monitor.engine.decoder import ContextOverflow, Decoder
from decode_monitor.engine.sampling import SamplingParams

PROMPTS = ['The capital of France is', 'def fibonacci(n):', 'Robots are',
           'A list of prime numbers: 2, 3,']


@pytest.fixture(scope='module')
def decoder(smollm2):
    return Decoder(smollm2, mode='graph', max_context=256)


def reference(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_equal_generate(smollm2, decoder):
    # One decoder serves every prompt in turn: stale cache entries must never leak across.
    for prompt in PROMPTS:
        ids = smollm2.tokenizer.encode(prompt)
        ours = [step.token for step in decoder.generate(ids, max_new_tokens=16)]
        assert ours == reference(smollm2.model, ids, 16), prompt


def test_graph_mode_on_cpu_falls_back_to_eager_and_says_why(decoder):
    assert decoder.device.type == 'cpu'  # the smollm2 fixture loads on the CPU, GPU or not
    assert decoder.mode_requested == 'graph'
    assert decoder.mode == 'eager'
    assert decoder.graph_fallbacks == 1
    assert 'CUDA' in decoder.fallback_reason


def test_stops_on_stop_token_and_reports_steps(smollm2, decoder):
    ids = smollm2.tokenizer.apply_chat_template(
        [{'role': 'user', 'content': 'What is the capital of France?'}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    steps = list(decoder.generate(ids, max_new_tokens=64,
                                  stop_token_ids=smollm2.stop_token_ids))
    assert steps[-1].token in smollm2.stop_token_ids
    assert 'Paris' in smollm2.tokenizer.decode([s.token for s in steps])
    assert [s.index for s in steps] == list(range(len(steps)))
    assert [s.pos for s in steps] == list(range(len(ids) - 1, len(ids) - 1 + len(steps)))
    assert all(s.step_ms > 0 for s in steps)


def test_seeded_sampling_is_reproducible_and_seed_dependent(smollm2, decoder):
    ids = smollm2.tokenizer.encode('Once upon a time')

    def run(seed):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return [s.token for s in decoder.generate(ids, params, max_new_tokens=24)]
    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert first != reference(smollm2.model, ids, 24)


def test_context_overflow_is_refused_before_any_work(smollm2, decoder):
    with pytest.raises(ContextOverflow):
        next(decoder.generate(list(range(1, 200)), max_new_tokens=100))
    with pytest.raises(ValueError):
        next(decoder.generate([], max_new_tokens=4))


def test_time_steps_returns_positive_times(tiny):
    times = Decoder(tiny, mode='eager', max_context=64).time_steps(pos=32, steps=5, warmup=2)
    assert len(times) == 5 and all(t > 0 for t in times)
