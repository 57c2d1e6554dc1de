"""Prompt caching: a prompt that starts like the cached sequence prefills only the rest, and its
greedy tokens are transformers' generate() on the whole prompt (the real SmolLM2 on the CPU)."""
import pytest
import torch

from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.sampling import SamplingParams

SYSTEM = ('You are the voice of a warehouse robot. Answer in one short sentence. The robot has '
          'two arms, a lidar, four cameras and a battery that lasts six hours. ')


def reference(loaded, ids, n):
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def chat(loaded, question):
    messages = [{'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': question}]
    return list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))


def tokens(decoder, ids, n, stop_after=None):
    out = []
    stops = decoder.loaded.stop_token_ids
    for step in decoder.generate(ids, SamplingParams(), n, stops):
        out.append(step.token)
        if stop_after is not None and len(out) == stop_after:
            break  # the caller walks away, as a cancel does
    return out


@pytest.mark.parametrize('backend', ['hf', 'fused'])
def test_shared_prefix_is_reused_and_tokens_do_not_change(smollm2, backend):
    first = chat(smollm2, 'What can you carry?')
    second = chat(smollm2, 'How long can you work?')
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 20
    decoder = Decoder(smollm2, mode='eager', backend=backend, max_context=256)
    got = tokens(decoder, first, 8)
    assert decoder.last_cached_tokens == 0
    assert len(got) == 8 and got == reference(smollm2, first, 8)  # an answer, not a stop
    got = tokens(decoder, second, 8)
    assert decoder.last_cached_tokens == shared
    assert got == reference(smollm2, second, 8)
    # the same prompt again: everything but its last token comes from the cache
    assert tokens(decoder, second, 8) == got and decoder.last_cached_tokens == len(second) - 1


def test_an_abandoned_request_leaves_only_what_was_computed(smollm2):
    tok = smollm2.tokenizer
    prompt = chat(smollm2, 'Describe your cameras.')
    decoder = Decoder(smollm2, mode='eager', backend='hf', max_context=256)
    done = tokens(decoder, prompt, 20, stop_after=5)
    # 5 tokens received: the prompt and the inputs of steps 1..4 have their K/V in the cache
    assert decoder.cached_ids == prompt + done[:4]
    follow = prompt + done + tok.encode('\nAnd your arms?')
    got = tokens(decoder, follow, 6)
    assert decoder.last_cached_tokens == len(prompt) + 4
    assert got == reference(smollm2, follow, 6)


def test_a_failed_prefill_leaves_nothing_cached(smollm2):
    prompt = chat(smollm2, 'Hello.')
    decoder = Decoder(smollm2, mode='eager', backend='hf', max_context=256)
    tokens(decoder, prompt, 3)
    bad = prompt[:10] + [smollm2.model.config.vocab_size + 5]  # no such token: the prefill fails
    with pytest.raises((IndexError, RuntimeError)):
        tokens(decoder, bad, 3)
    assert decoder.cached_ids == []
    assert tokens(decoder, prompt, 4) == reference(smollm2, prompt, 4)
    assert decoder.last_cached_tokens == 0


def test_timing_runs_invalidate_the_cache(tiny):
    decoder = Decoder(tiny, mode='eager', backend='hf', max_context=128)
    tokens(decoder, list(b'hello robot'), 4)
    assert decoder.cached_ids
    decoder.time_steps(pos=4, steps=3, warmup=1)  # random K/V, steps at other positions
    assert decoder.cached_ids == []
    tokens(decoder, list(b'hello robot'), 2)
    assert decoder.last_cached_tokens == 0


@pytest.mark.parametrize('backend', ['hf', 'fused'])
def test_a_pinned_prefix_survives_prompts_without_it(smollm2, backend):
    from decode_monitor.serving.prompt import standing_prefix
    tok = smollm2.tokenizer
    pinned = standing_prefix(tok, SYSTEM)
    assert len(pinned) > 40 and chat(smollm2, 'Hi.')[:len(pinned)] == pinned
    decoder = Decoder(smollm2, mode='eager', backend=backend, max_context=256)
    decoder.pin(pinned)
    assert decoder.cached_ids == pinned
    first = chat(smollm2, 'What can you carry?')
    assert tokens(decoder, first, 6) == reference(smollm2, first, 6)
    assert decoder.last_cached_tokens == len(pinned)
    # a prompt without the prefix writes its K/V over the prefix's positions
    plain = tok.encode('The lighthouse keeper climbed the stairs and')
    assert tokens(decoder, plain, 6) == reference(smollm2, plain, 6)
    assert decoder.last_cached_tokens == 0
    # the next chat starts from the prefix's end again, with the prefix's own K/V back
    second = chat(smollm2, 'How long can you work?')
    assert tokens(decoder, second, 8) == reference(smollm2, second, 8)
    assert decoder.last_cached_tokens == len(pinned)


def test_a_pinned_prefix_outlives_a_failed_prefill_and_a_refused_request(smollm2):
    from decode_monitor.engine.decoder import ContextOverflow
    from decode_monitor.serving.prompt import standing_prefix
    pinned = standing_prefix(smollm2.tokenizer, SYSTEM)
    decoder = Decoder(smollm2, mode='eager', backend='fused', max_context=256)
    decoder.pin(pinned)
    long_prompt = chat(smollm2, 'Tell me a story.')
    with pytest.raises(ContextOverflow):
        tokens(decoder, long_prompt, 256)  # refused before anything is written
    assert decoder.cached_ids == pinned
    plain = smollm2.tokenizer.encode('Once upon a time ' * 12)
    tokens(decoder, plain, 2)  # the prefix's positions now hold other K/V
    bad = pinned + [smollm2.model.config.vocab_size + 5]  # no such token: the prefill fails
    with pytest.raises((IndexError, RuntimeError)):
        tokens(decoder, bad, 3)
    assert decoder.cached_ids == []  # nothing claimed that the failed prefill may have touched
    question = chat(smollm2, 'Describe your cameras.')
    assert tokens(decoder, question, 6) == reference(smollm2, question, 6)
    assert decoder.last_cached_tokens == len(pinned)


def test_a_prefix_too_long_to_pin_is_refused(tiny):
    from decode_monitor.engine.decoder import ContextOverflow
    decoder = Decoder(tiny, mode='eager', backend='hf', max_context=32)
    with pytest.raises(ContextOverflow, match='pinned prefix of 40 tokens'):
        decoder.pin(list(range(1, 41)))
    assert decoder.pinned_ids == [] and decoder.cached_ids == []


def test_the_service_pins_its_system_prompt_and_keeps_it_through_a_timeout(smollm2):
    import json
    from decode_monitor.serving.prompt import standing_prefix
    from test_service import Harness
    pinned = len(standing_prefix(smollm2.tokenizer, SYSTEM))
    h = Harness(smollm2, system_prompt=SYSTEM)  # the real SmolLM2 in place of tiny

    def ask(request_id, **body):
        h.service.submit(json.dumps({'id': request_id, **body}))
        return h.wait(len(h.responses) + 1, timeout=120)[request_id]
    question = 'What can you carry?'
    first = ask('a', prompt=question, max_new_tokens=6)
    assert first['status'] == 'done' and first['cached_prompt_tokens'] == pinned
    ids = chat(smollm2, question)
    assert first['prompt_tokens'] == len(ids)
    assert first['text'] == smollm2.tokenizer.decode(reference(smollm2, ids, 6))
    h.service.request_timeout_s = 1.0  # ends the next request mid-decode
    timed_out = ask('t', prompt='Tell me a long story about a lighthouse.', max_new_tokens=180)
    assert timed_out['status'] == 'error' and 'timed out' in timed_out['error']
    assert 0 < timed_out['tokens'] < 180
    h.service.request_timeout_s = 0.0
    raw = ask('r', prompt='Once upon a time ' * 12, chat=False, max_new_tokens=2)
    assert raw['cached_prompt_tokens'] == 0  # its K/V went where the prefix's was
    again = ask('b', prompt=question, max_new_tokens=6)
    assert again['text'] == first['text'] and again['cached_prompt_tokens'] == pinned
    assert h.service.snapshot()['prompt_cache_hit_rate'] > 0.3
    h.service.stop()


def test_a_system_prompt_needs_a_chat_template(tiny):
    from test_service import Harness
    h = Harness(tiny, system_prompt='Be brief.')
    h.service.submit('hello')
    assert h.wait(1)  # answered, with the reason
    snapshot = h.service.snapshot()
    assert snapshot['state'] == 'failed' and 'chat template' in snapshot['load_error']
    h.service.stop()
