"""The decoder on a CUDA GPU: graph replay, the pipelined loop, compiled Triton, faults, NVML.

Marked `gpu` and skipped without CUDA: `python -m pytest -m gpu test/test_gpu.py` on a GPU
machine. The model is the `smollm2-135m` preset (SmolLM2-135M's shapes, random weights, built on
the GPU; no checkpoint needed) and the reference is transformers' own `generate()` on that same
model object.

Random weights give flat logits, so rounding decides near-ties. In float32 every token must equal
`generate()`'s. In bfloat16 graph replay must give eager's tokens bit for bit (the same kernels),
and a token that differs from `generate()`'s must be a near-tie in the reference's own logits.
Quantised formats are compared with their own dequantised model: a copy of the model whose
matrices are the dequantised codes the kernels read.
"""
import copy
import gc

import pytest
import torch

from decode_monitor.engine import fused  # noqa: F401  registers backend fused
from decode_monitor.engine.decoder import BACKENDS, Decoder
from decode_monitor.engine.fused import FusedBackend, pdl
from decode_monitor.engine.sampling import SamplingParams
from decode_monitor.engine.sources import load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

PROMPT = list(b'The robot arm picked up the red block and')
NEW = 24
CONTEXT = 128
# (backend, weights) pairs the decoder serves: hf serves the model as loaded
SERVED = [('hf', 'bf16'), ('fused', 'bf16'), ('fused', 'int8'), ('fused', 'int4')]
# bf16 rounds a logit between 2 and 4 to steps of 2^-6; 30 layers of bf16 activations summed in
# another order (other kernels; the reference's bf16-rounded dequantised weights) move a logit
# by several such steps. A gap within 2^-3 is taken as a near-tie.
BF16_TIE = 0.125


@pytest.fixture(scope='module', params=[torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def loaded(request):
    """The preset, its matrices at 3x transformers' initial scale: at 1x the residual stream
    forgets the prompt and every step repeats one token, which would hide a stale cache."""
    loaded = load_model('smollm2-135m', device='cuda', dtype=request.param)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.endswith('_proj.weight'):
                p.mul_(3)
    return loaded


def tokens(decoder, prompt=PROMPT, **kwargs):
    return [s.token for s in decoder.generate(prompt, max_new_tokens=NEW, **kwargs)]


def dequantised_model(model, backend):
    """A copy of `model` whose matrices are the dequantised codes `backend` serves."""
    ref = copy.deepcopy(model)
    dtype = model.dtype
    for block, layer in zip(ref.model.layers, backend.layers):
        attn, mlp = block.self_attn, block.mlp
        for parts, weight in (((attn.q_proj, attn.k_proj, attn.v_proj), layer.wqkv),
                              ((attn.o_proj,), layer.wo),
                              ((mlp.gate_proj, mlp.up_proj), layer.wgu),
                              ((mlp.down_proj,), layer.wd)):
            rows = weight.dequantize(dtype).split([m.out_features for m in parts])
            assert sum(r.shape[0] for r in rows) == weight.shape[0]
            for module, w in zip(parts, rows):
                module.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
    # lm_head is quantised apart from the (dense) embedding it is tied to
    ref.lm_head.weight = torch.nn.Parameter(backend.lm_head.dequantize(dtype),
                                            requires_grad=False)
    return ref.eval()


@torch.no_grad()
def reference(model, prompt=PROMPT):
    out = model.generate(torch.tensor([prompt], device='cuda'), max_new_tokens=NEW,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def assert_equal_up_to_ties(model, ours, expected, tie, prompt=PROMPT):
    """ours == expected, except that from a near-tie in the reference's logits on they may part."""
    if ours == expected:
        return
    i = next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b)
    logits = model(torch.tensor([prompt + expected[:i]], device='cuda')).logits[0, -1].float()
    gap = (logits[expected[i]] - logits[ours[i]]).item()
    assert gap <= tie, f'token {i}: {ours[i]} instead of {expected[i]}, {gap:.4f} below it'


@pytest.mark.parametrize('backend,weights', SERVED)
def test_graph_tokens_equal_eager_tokens_equal_generate(loaded, backend, weights):
    graph = Decoder(loaded, mode='graph', backend=backend, max_context=CONTEXT, weights=weights)
    assert graph.mode == 'graph', graph.fallback_reason
    eager = Decoder(loaded, mode='eager', backend=backend, max_context=CONTEXT, weights=weights)
    ours = tokens(graph)
    assert tokens(eager) == ours
    model = loaded.model if weights == 'bf16' else dequantised_model(loaded.model, graph.backend)
    expected = reference(model)
    if loaded.model.dtype == torch.float32:
        assert ours == expected
    else:
        assert_equal_up_to_ties(model, ours, expected, BF16_TIE)
    # seeded sampling runs its own graph: graph and eager draw the same tokens
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    assert tokens(graph, params=params) == tokens(eager, params=params)


def test_pdl_changes_no_result(loaded, monkeypatch):
    """Kernels launched with programmatic dependent launch compute what they compute without."""
    if not pdl.enabled('cuda'):
        pytest.skip('this GPU has no programmatic dependent launch')
    with_pdl = tokens(Decoder(loaded, mode='graph', backend='fused', max_context=CONTEXT,
                              weights='int4'))
    monkeypatch.setenv('DECODE_MONITOR_PDL', '0')
    pdl._enabled.cache_clear()
    try:
        assert not pdl.enabled('cuda')
        decoder = Decoder(loaded, mode='graph', backend='fused', max_context=CONTEXT,
                          weights='int4')
        assert tokens(decoder) == with_pdl
    finally:
        monkeypatch.undo()
        pdl._enabled.cache_clear()


@pytest.mark.parametrize('backend', ['hf', 'fused'])
def test_stop_and_abandon_with_a_step_in_flight(loaded, backend):
    """The CUDA loop launches step t+1 before it reads token t: a request stopped after token t
    leaves one step in flight, and the next request must not see it."""
    decoder = Decoder(loaded, mode='graph', backend=backend, max_context=CONTEXT)
    other = list(b'A second prompt, longer than the first one was')
    full, full_other = tokens(decoder), tokens(decoder, prompt=other)
    assert full != full_other and len(set(full)) > NEW // 2  # the tokens follow the context
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) >= 5
    stopped = tokens(decoder, should_stop=should_stop)
    assert stopped == full[:6]  # the first token, then 5 steps, each followed by the question
    assert tokens(decoder, prompt=other) == full_other
    # a consumer that walks away (a stop string, a cancelled request) closes the generator
    steps = decoder.generate(PROMPT, max_new_tokens=NEW)
    first = [next(steps).token for _ in range(3)]
    steps.close()
    assert first == full[:3]
    assert tokens(decoder, prompt=other) == full_other
    params = SamplingParams(temperature=1.0, seed=11)
    drawn = tokens(decoder, params=params)
    asked.clear()
    assert tokens(decoder, params=params, should_stop=should_stop) == drawn[:6]
    assert tokens(decoder) == full
    torch.cuda.synchronize()  # nothing left failing on the stream


class TorchPathFused(FusedBackend):
    """The fused backend's torch path on the GPU: it reads the position back to the host every
    step, so it cannot be captured in a graph."""

    def __init__(self, model, max_context, weights='bf16', kernel_configs=None):
        super().__init__(model, max_context, use_triton=False, weights=weights,
                         kernel_configs=kernel_configs)


def test_capture_failure_falls_back_to_eager_and_capture_still_works_after(loaded, monkeypatch):
    monkeypatch.setitem(BACKENDS, 'fused-torch', TorchPathFused)
    decoder = Decoder(loaded, mode='graph', backend='fused-torch', max_context=CONTEXT)
    assert decoder.mode == 'eager' and decoder.graph_fallbacks == 1
    assert decoder.fallback_reason.startswith('graph capture failed: ')
    ours = tokens(decoder)
    expected = reference(loaded.model)
    if loaded.model.dtype == torch.float32:
        assert ours == expected
    else:
        assert_equal_up_to_ties(loaded.model, ours, expected, BF16_TIE)
    # the failed attempt left torch's capture state clean: the next decoder captures
    captured = Decoder(loaded, mode='graph', backend='hf', max_context=CONTEXT)
    assert captured.mode == 'graph', captured.fallback_reason
    assert tokens(captured) == tokens(Decoder(loaded, mode='eager', backend='hf',
                                              max_context=CONTEXT))


@pytest.mark.parametrize('backend', ['hf', 'fused'])
def test_out_of_memory_is_an_error_and_the_running_decoder_keeps_serving(loaded, backend):
    decoder = Decoder(loaded, mode='graph', backend=backend, max_context=CONTEXT)
    before = tokens(decoder)
    gc.collect()
    allocated = torch.cuda.memory_allocated()
    huge = 1 << 31  # a K/V cache of terabytes
    with pytest.raises(torch.OutOfMemoryError, match='out of memory') as info:
        Decoder(loaded, mode='graph', backend=backend, max_context=huge)
    del info
    gc.collect()
    assert torch.cuda.memory_allocated() == allocated  # the failed build holds nothing
    assert decoder.mode == 'graph' and tokens(decoder) == before
    again = Decoder(loaded, mode='graph', backend=backend, max_context=CONTEXT)
    assert tokens(again) == before


# Staged rows (engine/fused/staged.py, staged_qkv.py) for SmolLM2's quantised matrices: q/k/v
# with RoPE (960 x 576), gate/up (N 1536, K 576, groups of 64), o_proj (576 x 576), down_proj
# (576 x 1536, K split in 3) and lm_head (49152 x 576, with the final norm); int4's sub-blocks
# take twice the columns, so twice the rows a row of threads.
STAGED_ROWS = {'int8': {'wqkv': (32, 64, 4, 2, 1), 'wgu': (32, 64, 4, 1, 1),
                        'wo': (32, 64, 4, 2, 1), 'wd': (16, 128, 4, 2, 3),
                        'lm_head': (32, 64, 4, 1, 1)},
               'int4': {'wqkv': (64, 64, 4, 1, 1), 'wgu': (64, 64, 4, 2, 1),
                        'wo': (64, 64, 4, 1, 1), 'wd': (32, 128, 4, 1, 3),
                        'lm_head': (64, 64, 4, 2, 1)}}


@pytest.mark.parametrize('weights', ['int8', 'int4'])
def test_staged_rows_serve_generate_tokens(loaded, weights):
    """A table that sends the quantised q/k/v (with RoPE: staged_qkv.py), gate/up, o_proj,
    down_proj (split K) and lm_head to the staged kernel: the GPU takes it for every one of
    them, graph and eager serve the same tokens, and they are transformers' generate() on the
    dequantised model."""
    from decode_monitor.engine.fused import gemv as G
    from decode_monitor.engine.fused.configs import GemvConfig, KernelConfigs
    plain = Decoder(loaded, mode='eager', backend='fused', max_context=CONTEXT, weights=weights)
    keys = plain.backend.gemv_keys()
    table = KernelConfigs()
    for name, row in STAGED_ROWS[weights].items():
        table = table.with_gemv(keys[name], GemvConfig(*row, None, True))
    graph = Decoder(loaded, mode='graph', backend='fused', max_context=CONTEXT,
                    weights=weights, kernel_configs=table)
    assert graph.mode == 'graph', graph.fallback_reason
    backend = graph.backend
    x = torch.empty(1, device='cuda')
    for name in STAGED_ROWS[weights]:
        key, w = keys[name], getattr(backend, name, None) or getattr(backend.layers[0], name)
        assert G._staged(backend.launch_configs[name], x, weights, key.n, key.k, w.group,
                         plain=name == 'wo' or name == 'wd'), name
    eager = Decoder(loaded, mode='eager', backend='fused', max_context=CONTEXT,
                    weights=weights, kernel_configs=table)
    ours = tokens(graph)
    assert tokens(eager) == ours
    model = dequantised_model(loaded.model, backend)
    expected = reference(model)
    if loaded.model.dtype == torch.float32:
        assert ours == expected
    else:
        assert_equal_up_to_ties(model, ours, expected, BF16_TIE)


def test_split_k_repeats_bit_for_bit():
    """The last program adds the partial sums in split order, so the same input gives the same
    bits on every launch, though the splits finish in an order that varies between launches (a
    sum in arrival order, with atomic adds, would vary with it)."""
    import torch.nn.functional as F
    from decode_monitor.engine.fused import gemv as G
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(2 * 96, 768, generator=gen).cuda()
    x = torch.randn(768, generator=gen).cuda()
    g = torch.rand(768, generator=gen).cuda() + 0.5
    xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g
    gate, up = F.linear(xn, w).chunk(2)
    outs = []
    for _ in range(200):
        out = torch.empty(96, device='cuda')
        G.gemv(w, x, out, norm_weight=g, gated=True, eps=1e-5, config=(16, 64, 4, 1, 6))
        outs.append(out)
    expected = F.silu(gate) * up
    assert ((outs[0] - expected).norm() / expected.norm()).item() < 1e-5
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_nvml_readings_are_sane():
    from decode_monitor.engine.floor import measure_copy_bandwidth
    from decode_monitor.telemetry.gpu import GpuTelemetry
    index = torch.cuda.current_device()
    nvml = GpuTelemetry(index)
    assert nvml.available, nvml.reason
    assert nvml.name == torch.cuda.get_device_name(index)  # NVML and CUDA see the same card
    assert nvml.driver and nvml.uuid.startswith('GPU-')
    # a device-to-device copy reaches a good part of the peak, and never more than the peak
    copy_bw = measure_copy_bandwidth('cuda', size_mib=1024, repeats=10)
    assert 0.4 * nvml.peak_bandwidth < copy_bw <= 1.02 * nvml.peak_bandwidth
    before = nvml.sample()
    a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    for _ in range(200):
        a @ a
    torch.cuda.synchronize()
    after = nvml.sample()
    for s in (before, after):
        assert 100 <= s.sm_clock_mhz <= 4000 and 100 <= s.mem_clock_mhz <= 20000
        assert 5 <= s.temperature_c <= 105 and 10 <= s.power_w <= 2000
        assert isinstance(s.throttle_reasons, list)
    assert after.energy_j > before.energy_j  # the counter runs while the GPU works


def test_the_first_eager_int4_prompts_compile_nothing(loaded):
    """Start-up warms every eager prefill shape: the first prompts of 17-128 tokens run the
    GEMM on int4 codes (qgemm.py, a Triton kernel compiled per tile config) with kernels that
    warming compiled; Triton's cache of either layout's kernel does not grow."""
    from decode_monitor.engine.fused import qgemm

    def compiled():
        return sum(len(entry[0]) for kernel in (qgemm._qgemm, qgemm._qgemm_right)
                   for entry in kernel.device_caches.values())
    decoder = Decoder(loaded, mode='eager', backend='fused', max_context=CONTEXT,
                      weights='int4')
    before = compiled()
    assert before > 0
    for n in (20, 48, 100):
        decoder.generate(list(range(1, n + 1)), max_new_tokens=1)
    assert compiled() == before
