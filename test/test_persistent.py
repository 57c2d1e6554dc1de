"""Backend `persistent` on the CPU: the layer kernel under Triton's interpreter, the torch path.

- The one-launch-a-layer kernel (interpreter: its programs run one after another, so they take
  the tickets in order and every wait is already satisfied) gives the `hf` backend's logits
  (fp32, relative error < 1e-4) on tiny Llama and Qwen2 models, at short positions and past
  4096, with its scratch poisoned with NaN first and with one, two or three programs; so do the
  layouts of two launches a layer and of q/k/v + attention kernels + o_proj..down, with tickets
  of several row blocks (and single ones at the tail) and the next ticket taken ahead.
- int8 and int4 codes read by the kernel give the fused torch path's logits on the same codes.
- A wait whose counter never arrives gives up and raises the error flag instead of hanging.
- A model the kernel cannot serve falls back to the fused step, with a reason and a count.
- On the CPU the backend decodes through the torch path: greedy tokens equal transformers'
  `generate()` on SmolLM2.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from decode_monitor.engine.decoder import BACKENDS, Decoder  # noqa: E402
from decode_monitor.engine.factory import DecoderSettings, build_decoder  # noqa: E402
from decode_monitor.engine.fused import FusedBackend, PersistentBackend  # noqa: E402
from decode_monitor.engine.fused.persistent import _wait  # noqa: E402
from decode_monitor.engine.fused.persistent_launch import INTERPRETER, ticket_ranges  # noqa: E402
from decode_monitor.engine.hf_backend import HFBackend  # noqa: E402
from decode_monitor.engine.sampling import SamplingParams  # noqa: E402

MAX_CONTEXT = 4200
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
             max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
             initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
TINY = {
    'llama': ('llama', dict(rope_parameters={'rope_type': 'default', 'rope_theta': 5e5})),
    'qwen2': ('qwen2', dict(rope_parameters={'rope_type': 'default', 'rope_theta': 1e6},
                            rms_norm_eps=1e-6)),  # q/k/v biases
}


def tiny_model(name, **overrides):
    model_type, extra = TINY[name]
    config = AutoConfig.for_model(model_type, **{**SHAPE, **extra, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def poison(backend):
    for buf in (backend.q, backend.att, backend.act, backend.logits):
        buf.fill_(float('nan'))


def assert_two_steps_match(backend, reference, n, seed):
    """A prompt of n tokens prefilled by both, then two decode steps from reference's greedy
    tokens: the logits of each (backend's scratch poisoned first) within 1e-4; no wait gave up."""
    prompt = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))
    token = reference.prefill(prompt).argmax(-1, keepdim=True)
    backend.prefill(prompt)
    for i in range(2):
        pos = torch.tensor([n + i])
        expected = reference.forward_one(token, pos)
        poison(backend)
        assert rel(backend.forward_one(token, pos), expected) < 1e-4, f'position {n + i}'
        token = expected.argmax(-1, keepdim=True)
    assert backend.timeouts() == 0


@pytest.mark.parametrize('programs', [1, 3])
@pytest.mark.parametrize('name', list(TINY))
def test_layer_kernel_logits_match_hf_backend(name, programs):
    model = tiny_model(name)
    hf = HFBackend(model, MAX_CONTEXT)
    backend = PersistentBackend(model, MAX_CONTEXT, use_triton=True,
                                attention_config=(64, 5, 4, 1),  # 5 splits of the prefix
                                persistent_config=INTERPRETER._replace(programs_per_sm=programs))
    assert backend.layers_kernel is not None
    assert [p.grid for p in backend.layers_kernel.parts] == [(programs,)]
    gen = torch.Generator().manual_seed(1)
    # past 4096 positions once per model, with several programs (the costly case to interpret)
    for n in (7, 4100) if programs > 1 else (7,):
        prompt = torch.randint(0, 512, (1, n), generator=gen)
        expected = hf.prefill(prompt)
        assert rel(backend.prefill(prompt), expected) < 1e-4
        token = expected.argmax(-1, keepdim=True)
        for i in range(2):
            pos = torch.tensor([n + i])
            expected = hf.forward_one(token, pos)
            poison(backend)
            got = backend.forward_one(token, pos)
            assert rel(got, expected) < 1e-4, f'position {n + i}'
            token = expected.argmax(-1, keepdim=True)
    assert backend.timeouts() == 0


@pytest.mark.parametrize('layout', ['one', 'two', 'split'])
def test_layouts_and_ticket_ranges_match_hf_backend(layout):
    model = tiny_model('qwen2')
    hf = HFBackend(model, 256)
    config = INTERPRETER._replace(block_n=16, programs_per_sm=2, layout=layout, ticket_blocks=4,
                                  tail=0.5, ahead=True)
    backend = PersistentBackend(model, 256, use_triton=True, attention_config=(64, 3, 4, 1),
                                persistent_config=config)
    kernel = backend.layers_kernel
    assert len(kernel.parts) == (1 if layout == 'one' else 2)
    # hidden 128 / 16 rows = 8 blocks on 2 programs: 3 ranges of 2 blocks, then 2 singles;
    # gate/up 256 / 16 = 16 blocks: 3 ranges of 4 blocks, then 4 singles
    mlp = kernel.parts[-1].constants
    assert (mlp['R_O'], mlp['BIG_O'], mlp['R_GU'], mlp['BIG_GU']) == (2, 3, 4, 3)
    assert_two_steps_match(backend, hf, 70, seed=2)


def test_ticket_ranges():
    assert ticket_ranges(4736, 792, 8, 1.0) == (2, 1972)  # 2 * 1972 + 792 singles
    assert ticket_ranges(4736, 132, 8, 1.0) == (8, 575)  # 8 * 575 + 136 singles
    assert ticket_ranges(448, 528, 8, 1.0) == (1, 0)  # fewer blocks than two a program
    assert ticket_ranges(100, 10, 1, 1.0) == (1, 0)  # ranges off


@triton.jit
def wait_kernel(C, ERR, OUT, need):
    _wait(C, need, ERR, 16)
    tl.store(OUT, 1)


def test_a_wait_that_never_ends_gives_up_and_raises_the_flag():
    counter = torch.tensor([3], dtype=torch.int32)
    err = torch.zeros(1, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    wait_kernel[(1,)](counter, err, out, 3)
    assert int(err) == 0 and int(out) == 1  # arrived: no flag
    wait_kernel[(1,)](counter, err, out, 4)
    assert int(err) == 1  # never arrives: gave up, flagged, and went on


def test_a_model_the_kernel_cannot_serve_falls_back_to_the_fused_step():
    # 64 KV heads: more done-counters than a layer's counter row holds
    model = tiny_model('llama', num_attention_heads=64, num_key_value_heads=64, head_dim=16,
                       hidden_size=1024, intermediate_size=64, num_hidden_layers=1)
    backend = PersistentBackend(model, 64, use_triton=True)
    assert backend.layers_kernel is None and backend.fallbacks == 1
    assert 'KV heads' in backend.fallback_reason
    hf = HFBackend(model, 64)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    hf.prefill(prompt)
    backend.prefill(prompt)
    token, pos = torch.tensor([[7]]), torch.tensor([5])
    assert rel(backend.forward_one(token, pos), hf.forward_one(token, pos)) < 1e-4


def test_an_unknown_weight_format_is_refused():
    with pytest.raises(ValueError, match='persistent serves'):
        PersistentBackend(tiny_model('llama'), 64, weights='int3')


@pytest.mark.parametrize('weights', ['int8', 'int4'])
def test_quantised_layer_kernel_matches_the_dequantised_torch_path(weights):
    """int8 / int4 codes read by the layer kernel (dequantised in registers, tickets of several
    blocks, two launches a layer) against the fused backend's torch path, which multiplies the
    same codes dequantised into dense matrices."""
    model = tiny_model('qwen2')
    reference = FusedBackend(model, 256, use_triton=False, weights=weights)
    config = INTERPRETER._replace(block_n=16, programs_per_sm=2, layout='two', ticket_blocks=4,
                                  tail=0.5)
    backend = PersistentBackend(model, 256, use_triton=True, weights=weights,
                                attention_config=(64, 3, 4, 1), persistent_config=config)
    assert backend.layers_kernel is not None, backend.fallback_reason
    assert_two_steps_match(backend, reference, 40, seed=5)


def test_selectable_by_name():
    assert BACKENDS['persistent'] is PersistentBackend
    from decode_monitor.bench.grid import registered_backends
    assert 'persistent' in registered_backends()
    decoder = build_decoder(DecoderSettings(model='tiny', backend='persistent', max_context=64))
    assert isinstance(decoder.backend, PersistentBackend)


def test_greedy_tokens_match_transformers_generate(smollm2):
    loaded = smollm2  # SmolLM2-135M-Instruct, real weights; the CPU decodes on the torch path
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=12,
                                         do_sample=False)[0, len(ids):].tolist()
    decoder = Decoder(loaded, mode='eager', backend='persistent', max_context=256)
    assert isinstance(decoder.backend, PersistentBackend)
    got = [s.token for s in decoder.generate(ids, SamplingParams(), max_new_tokens=12,
                                             stop_token_ids=loaded.stop_token_ids)]
    assert got == expected
    assert 'Paris' in tok.decode(got)
