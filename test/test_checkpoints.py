"""Checkpoints that arrive quantised (compressed-tensors `pack-quantized`), on the real SmolLM2.

The checkpoints are written here by compressed-tensors itself (the library llm-compressor saves
GPTQ / AWQ models with), and every check is against it or transformers: its own decompression
for the weights, transformers' forward and generate() on the model it loads for the tokens.
"""
import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F

from decode_monitor.engine.checkpoints import packed_scheme, read_tensors
from decode_monitor.engine.decoder import BACKENDS, Decoder
from decode_monitor.engine.fused import FusedBackend
from decode_monitor.engine.fused import gemv as G
from decode_monitor.engine.fused.quant import QuantWeight
from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.engine.sources import ModelLoadError, load_model

ct = pytest.importorskip('compressed_tensors')
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized import (  # noqa: E402
    PackedQuantizationCompressor, unpack_from_int32)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
GROUP = 64  # SmolLM2's K (576, 1536) are multiples of 64, not of 128
SCHEMES = {'int4': dict(num_bits=4, symmetric=True),
           'int4-asym': dict(num_bits=4, symmetric=False),
           'int8': dict(num_bits=8, symmetric=True)}


def write_checkpoint(loaded, directory, num_bits, symmetric):
    """SmolLM2 in bf16, its Linear layers (not lm_head) quantised and packed by
    compressed-tensors, saved as a transformers checkpoint with its quantization_config."""
    from safetensors.torch import save_file
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=num_bits, type='int', symmetric=symmetric,
                            strategy='group', group_size=GROUP)
    config = QuantizationConfig(
        config_groups={'group_0': QuantizationScheme(targets=['Linear'], weights=args)},
        ignore=['lm_head'], format='pack-quantized')
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, 'weight_scale'):  # min/max scales, as an observer would set them
            w = module.weight.detach().float()
            w = w.view(w.shape[0], -1, GROUP)
            scale, zero_point = calculate_qparams(w.amin(-1), w.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            if hasattr(module, 'weight_zero_point'):
                module.weight_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format='pack-quantized')
    compressor.compress_model(model)
    tied = model.config.tie_word_embeddings  # then lm_head is the embedding, saved once
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (tied and k == 'lm_head.weight')}
    save_file(state, str(directory / 'model.safetensors'), metadata={'format': 'pt'})
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    compressor.update_config(str(directory))
    return directory


@pytest.fixture(scope='module')
def written(smollm2, tmp_path_factory):
    """Checkpoint directories of SmolLM2 by scheme name, each written once when first asked."""
    directories = {}

    def directory(name):
        if name not in directories:
            directories[name] = write_checkpoint(smollm2, tmp_path_factory.mktemp(name),
                                                 **SCHEMES[name])
        return directories[name]
    return directory


@pytest.fixture(scope='module', params=list(SCHEMES))
def checkpoint(request, written):
    """(scheme name, directory, compressed-tensors' scheme, our load, transformers' load)."""
    from transformers import AutoModelForCausalLM
    directory = written(request.param)
    with open(directory / 'config.json') as f:
        scheme = QuantizationConfig.model_validate(
            json.load(f)['quantization_config']).config_groups['group_0']
    ours = load_model(str(directory), dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                  local_files_only=True).eval()
    return request.param, directory, scheme, ours, theirs


def decompressed(tensors, name, scheme):
    """compressed-tensors' own dequantisation of one module, in fp32 (scales as stored)."""
    parts = {p: tensors[f'{name}.{p}'] for p in ('weight_packed', 'weight_scale', 'weight_shape',
                                                 'weight_zero_point') if f'{name}.{p}' in tensors}
    parts['weight_scale'] = parts['weight_scale'].float()
    return PackedQuantizationCompressor.decompress(parts, scheme)['weight']


def test_dense_weights_are_compressed_tensors_decompression(checkpoint):
    _, directory, scheme, ours, _ = checkpoint
    tensors = read_tensors(str(directory))
    names = sorted({k.rsplit('.', 1)[0] for k in tensors})
    assert len(names) == 30 * 7  # every q/k/v/o/gate/up/down, not lm_head
    for name in names:
        assert torch.equal(ours.model.get_submodule(name).weight, decompressed(
            tensors, name, scheme)), name


def test_forward_equals_transformers_on_the_checkpoint(checkpoint):
    _, _, _, ours, theirs = checkpoint
    ids = torch.tensor([ours.tokenizer.encode('Robots that quantise their weights')])
    with torch.no_grad():
        a, b = ours.model(ids).logits, theirs(ids).logits
    assert torch.equal(a, b)


def test_fused_backend_serves_the_stored_codes(checkpoint):
    name, directory, scheme, ours, _ = checkpoint
    fmt = name.split('-')[0]
    decoder = Decoder(ours, mode='eager', backend='fused', max_context=128, weights=fmt)
    wqkv = decoder.backend.layers[0].wqkv
    assert isinstance(wqkv, QuantWeight) and wqkv.group == GROUP
    tensors = read_tensors(str(directory))
    stored = torch.cat([unpack_from_int32(tensors[f'model.layers.0.self_attn.{p}.weight_packed'],
                                          scheme.weights.num_bits,
                                          tensors[f'model.layers.0.self_attn.{p}.weight_shape'])
                        for p in ('q_proj', 'k_proj', 'v_proj')])  # signed codes
    codes = wqkv.codes().to(torch.int16)
    assert torch.equal(codes - 8 if fmt == 'int4' else codes, stored.to(torch.int16))
    assert decoder.backend.lm_head is ours.model.lm_head.weight  # kept dense, as stored


@pytest.mark.parametrize('matrix', ['self_attn.q_proj', 'mlp.down_proj'])
def test_kernel_on_checkpoint_codes_equals_decompressed_matrix(checkpoint, matrix):
    name, directory, scheme, ours, _ = checkpoint
    layers, _ = ours.model.__dict__['_fused_quantised'][name.split('-')[0]]
    module = f'model.layers.2.{matrix}'
    w = decompressed(read_tensors(str(directory)), module, scheme)
    qw = layers[2]['wqkv' if 'q_proj' in matrix else 'wd']
    qw = QuantWeight(qw.fmt, qw.q[:w.shape[0]], qw.scale[:w.shape[0]],
                     None if qw.offset is None else qw.offset[:w.shape[0]], qw.group)
    x = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(3))
    out = torch.full((w.shape[0],), float('nan'))
    G.gemv(qw, x, out, kind='head')
    ref = F.linear(x.double(), w.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_greedy_tokens_equal_transformers_generate_on_the_checkpoint(checkpoint):
    name, _, _, ours, theirs = checkpoint
    tok = ours.tokenizer
    ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    decoder = Decoder(ours, mode='eager', backend='fused', max_context=128,
                      weights=name.split('-')[0])
    got = [s.token for s in decoder.generate(ids, SamplingParams(), max_new_tokens=12)]
    assert got == expected


class KernelFused(FusedBackend):
    """The fused backend on its Triton path, in the interpreter here: every step reads the
    stored codes through the kernels, and prefill dequantises them a layer at a time."""

    def __init__(self, model, max_context, weights='bf16', kernel_configs=None):
        super().__init__(model, max_context, use_triton=True, weights=weights,
                         kernel_configs=kernel_configs)


@pytest.mark.parametrize('name', list(SCHEMES))
def test_a_released_checkpoint_decodes_its_stored_codes(name, smollm2, tmp_path, monkeypatch):
    """A tiny model (the kernels in the interpreter are slow) written packed: after its dense
    copies are released, the kernels on the stored codes still give transformers' tokens."""
    from transformers import AutoModelForCausalLM
    from decode_monitor.engine.hf_backend import HFBackend
    monkeypatch.setitem(BACKENDS, 'fused-kernels', KernelFused)
    tiny = types.SimpleNamespace(model=load_model('tiny', dtype=torch.float32).model,
                                 tokenizer=smollm2.tokenizer)
    directory = write_checkpoint(tiny, tmp_path, **SCHEMES[name])
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                  local_files_only=True).eval()
    prompt = [5, 17, 99, 3, 200, 41, 7]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = load_model(str(directory), device=DEV, dtype=torch.float32)
    fmt = name.split('-')[0]
    decoder = Decoder(ours, mode='eager', backend='fused', max_context=32, weights=fmt)
    freed = decoder.backend.release_dense(ours.model)
    # 2 layers of q, k, v, o (128 x 128, 2 x 64 x 128, 128 x 128) and gate, up, down
    # (3 x 256 x 128) in float32; lm_head is stored dense, and served so: it stays
    assert freed == 2 * (128 * 128 + 2 * 64 * 128 + 128 * 128 + 3 * 256 * 128) * 4
    for block in ours.model.model.layers:
        for module in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                       block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
                       block.mlp.down_proj):
            assert module.weight.numel() == 0
    assert ours.model.lm_head.weight.shape == (512, 128)
    with pytest.raises(ValueError, match='released'):
        HFBackend(ours.model, 32)
    kernels = Decoder(ours, mode='eager', backend='fused-kernels', max_context=32, weights=fmt)
    assert [s.token for s in kernels.generate(prompt, max_new_tokens=5)] == expected
    assert [s.token for s in decoder.generate(prompt, max_new_tokens=5)] == expected


def _config(**weights):
    base = dict(num_bits=4, type='int', symmetric=True, strategy='group', group_size=128)
    groups = {'group_0': {'targets': ['Linear'], 'weights': {**base, **weights}}}
    return {'quant_method': 'compressed-tensors', 'format': 'pack-quantized',
            'config_groups': groups}


@pytest.mark.parametrize('qc,match', [
    ({'quant_method': 'gptq', 'bits': 4}, "quant_method 'gptq'"),
    ({**_config(), 'format': 'float-quantized'}, "format 'float-quantized'"),
    (_config(num_bits=2), 'int 2-bit'),
    (_config(type='float', num_bits=8), 'float 8-bit'),
    (_config(num_bits=8, symmetric=False), 'zero points'),
    (_config(strategy='channel', group_size=None), "strategy 'channel'"),
    (_config(group_size=256), 'group size 256'),
    (_config(actorder='group'), "activation order 'group'"),
])
def test_unsupported_schemes_say_what_is_unsupported(qc, match):
    with pytest.raises(ValueError, match=match):
        packed_scheme(types.SimpleNamespace(quantization_config=qc))


def test_no_quantization_config_is_a_dense_checkpoint():
    assert packed_scheme(types.SimpleNamespace()) is None
    scheme = packed_scheme(types.SimpleNamespace(quantization_config=_config()))
    assert (scheme.bits, scheme.group, scheme.symmetric, scheme.fmt) == (4, 128, True, 'int4')


def test_loading_an_unsupported_checkpoint_is_a_clear_error(written, tmp_path):
    directory = written('int4')
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / 'config.json').read_text())
    config['quantization_config']['config_groups']['group_0']['weights']['actorder'] = 'group'
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match='activation order'):
        load_model(str(tmp_path))


def _without(source, directory, dropped):
    """A copy of the checkpoint in `source`, less the tensors named in `dropped`."""
    from safetensors.torch import load_file, save_file
    for f in source.iterdir():
        if f.suffix != '.safetensors':
            (directory / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(source / 'model.safetensors'))
    assert set(dropped) <= set(tensors)
    save_file({k: v for k, v in tensors.items() if k not in dropped},
              str(directory / 'model.safetensors'), metadata={'format': 'pt'})
    return directory


@pytest.mark.parametrize('dropped', [
    ['model.norm.weight'],  # dense in a packed checkpoint: nothing would replace it
    [f'model.layers.3.mlp.up_proj.weight_{part}' for part in ('packed', 'scale', 'shape')]])
def test_a_weight_the_checkpoint_lacks_is_refused(written, tmp_path, dropped):
    """transformers fills a missing weight with random values (and, for a packed checkpoint, is
    told not to draw them): loading must refuse it and name it, not serve noise."""
    directory = written('int4-asym')
    lost = dropped[0].rsplit('_', 1)[0] if dropped[0].endswith('_packed') else dropped[0]
    with pytest.raises(ModelLoadError, match=f"lacks 1 weight.*{lost.replace('.', '[.]')}"):
        load_model(str(_without(directory, tmp_path, dropped)))


def test_a_dense_checkpoint_lacking_a_weight_is_refused(smollm2, tmp_path):
    """The same for a plain checkpoint; the complete one loads and gives transformers' logits."""
    from transformers import AutoModelForCausalLM
    from safetensors.torch import save_file
    whole = tmp_path / 'whole'
    whole.mkdir()
    model = smollm2.model  # from the GGUF, which save_pretrained refuses: written by hand
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != 'lm_head.weight'}
    save_file(state, str(whole / 'model.safetensors'), metadata={'format': 'pt'})
    config = copy.deepcopy(model.config)
    config.__dict__.pop('quantization_config', None)
    config.save_pretrained(whole)
    smollm2.tokenizer.save_pretrained(whole)
    ours = load_model(str(whole), dtype=torch.float32).model
    theirs = AutoModelForCausalLM.from_pretrained(whole, local_files_only=True).eval()
    ids = torch.tensor([[1, 502, 3300, 27, 8]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    broken = _without(whole, tmp_path, ['model.layers.0.self_attn.k_proj.weight'])
    with pytest.raises(ModelLoadError, match='lacks 1 weight.*layers[.]0[.]self_attn[.]k_proj'):
        load_model(str(broken))


def test_serving_another_format_than_stored_says_so(written, caplog):
    directory = written('int4')
    from decode_monitor.engine.factory import DecoderSettings, build_decoder
    settings = dict(model=str(directory), device='cpu', mode='eager', max_context=64)
    with caplog.at_level('WARNING', logger='decode_monitor.engine.factory'):
        build_decoder(DecoderSettings(**settings, weights='int4'))
        assert 'stored as' not in caplog.text
        build_decoder(DecoderSettings(**settings, backend='hf'))
    assert 'stored as int4; weights=bf16 serves its dequantised weights' in caplog.text
