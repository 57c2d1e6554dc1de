"""Backend `fused` end to end on the CPU, against transformers itself.

- Greedy tokens through the Decoder equal transformers' `generate` on SmolLM2-135M-Instruct.
- Logits equal the `hf` backend's (fp32, relative error < 1e-4) on tiny variants of the study's
  three architectures and of Llama-3's scaled RoPE, after prefill and after decode steps, at
  short positions and past 4096; both the torch path and the Triton path (interpreter; past
  4096 with the scaled RoPE only).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from decode_monitor.engine.decoder import BACKENDS, Decoder  # noqa: E402
from decode_monitor.engine.fused import FusedBackend  # noqa: E402
from decode_monitor.engine.hf_backend import HFBackend  # noqa: E402
from decode_monitor.engine.sampling import SamplingParams  # noqa: E402

MAX_CONTEXT = 4200
PROMPTS = (7, 4100)  # checks at positions 6, 7, 8 and 4099, 4100, 4101
STEPS = 2
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
             max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
             initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
TINY = {  # the study's three architectures, and Llama-3's RoPE scaling
    'llama': ('llama', dict(rope_parameters={'rope_type': 'default', 'rope_theta': 5e5})),
    'qwen2': ('qwen2', dict(rope_parameters={'rope_type': 'default', 'rope_theta': 1e6},
                            rms_norm_eps=1e-6)),  # q/k/v biases
    'mistral': ('mistral', dict(rope_parameters={'rope_type': 'default', 'rope_theta': 1e6},
                                sliding_window=None)),
    'llama3-rope': ('llama', dict(rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0, 'low_freq_factor': 1.0,
        'high_freq_factor': 4.0, 'original_max_position_embeddings': 1024})),
}


def tiny_model(name, **overrides):
    model_type, extra = TINY[name]
    config = AutoConfig.for_model(model_type, **{**SHAPE, **extra, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(backend, prompt, first_token):
    """Logits after prefill, then after STEPS decode steps fed the given greedy tokens."""
    out = [backend.prefill(prompt).clone()]
    token = first_token
    for i in range(STEPS):
        pos = torch.tensor([prompt.shape[1] + i])
        out.append(backend.forward_one(token[i], pos).clone())
    return out


@pytest.fixture(scope='module', params=list(TINY))
def reference(request):
    """A tiny model, and the hf backend's logits for each prompt (the reference)."""
    model = tiny_model(request.param)
    hf = HFBackend(model, MAX_CONTEXT)
    gen = torch.Generator().manual_seed(1)
    cases = []
    for n in PROMPTS:
        prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
        logits = [hf.prefill(prompt).float()]
        tokens = [logits[0].argmax(-1, keepdim=True)]
        for i in range(STEPS):
            logits.append(hf.forward_one(tokens[-1], torch.tensor([n + i])).float())
            tokens.append(logits[-1].argmax(-1, keepdim=True))
        cases.append((prompt, tokens, logits))
    return model, cases


@pytest.mark.parametrize('path', ['torch', 'triton'])
def test_logits_match_hf_backend(reference, path):
    model, cases = reference
    fused = FusedBackend(model, MAX_CONTEXT, use_triton=path == 'triton',
                         attention_config=(64, 5, 4, 1))
    # The Triton path (interpreted here) goes past 4096 positions for the scaled RoPE only:
    # the other architectures' position-dependent work is the same kernels and tables.
    if path == 'triton' and model.config.rope_parameters['rope_type'] != 'llama3':
        cases = cases[:1]
    for prompt, tokens, expected in cases:
        got = run(fused, prompt, tokens)
        for where, (a, b) in enumerate(zip(got, expected)):
            pos = prompt.shape[1] - 1 + where
            assert rel(a, b) < 1e-4, f'{path} path, position {pos}'


def test_greedy_tokens_match_transformers_generate(smollm2):
    loaded = smollm2  # SmolLM2-135M-Instruct, real weights
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=12,
                                         do_sample=False)[0, len(ids):].tolist()
    decoder = Decoder(loaded, mode='eager', backend='fused', max_context=256)
    got = [s.token for s in decoder.generate(ids, SamplingParams(), max_new_tokens=12,
                                             stop_token_ids=loaded.stop_token_ids)]
    assert got == expected
    assert 'Paris' in tok.decode(got)


def test_weights_are_shared_and_hf_is_unchanged():
    model = tiny_model('qwen2')
    hf = HFBackend(model, 64)
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    before = hf.prefill(prompt).clone()
    first = FusedBackend(model, 64)
    attn = model.model.layers[0].self_attn
    packed = first.layers[0].wqkv
    ptrs = [m.weight.data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert ptrs[0] == packed.data_ptr()  # q, k, v are now row slices of the packed tensor
    assert ptrs[2] == packed.data_ptr() + (packed.shape[0] - attn.v_proj.weight.shape[0]) * \
        packed.stride(0) * packed.element_size()
    assert torch.equal(hf.prefill(prompt), before)
    second = FusedBackend(model, 128)  # another context size packs nothing again
    assert second.layers[0].wqkv is packed and second.layers[1].wgu is first.layers[1].wgu


@pytest.mark.parametrize('name,window', [
    ('qwen2', dict(use_sliding_window=True, sliding_window=16, max_window_layers=0)),
    ('mistral', dict(sliding_window=16))])
def test_sliding_window_shorter_than_the_cache_is_refused(name, window):
    model = tiny_model(name, **window)
    with pytest.raises(ValueError, match='sliding'):
        FusedBackend(model, 64)
    assert FusedBackend(model, 16).max_context == 16  # a window covering the cache is fine


def test_importing_registers_the_backend():
    assert BACKENDS['fused'] is FusedBackend
