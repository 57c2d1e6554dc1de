"""Backend `persistent` on a CUDA GPU: logits against fp32, repeatability, no hang.

Marked `gpu` and skipped without CUDA. bf16, and int8 / int4 codes against the fused step on
the same codes. The model is the `smollm2-135m` preset (random weights of
SmolLM2-135M's shapes, matrices at 3x transformers' initial scale as in test_gpu.py). Every
persistent step runs in a child process with a time limit (a watchdog): a kernel that waited
forever would fail the test instead of hanging the suite.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

WATCHDOG_S = 240
ROOT = os.path.join(os.path.dirname(__file__), '..')

CHILD = textwrap.dedent('''
    import copy, json, sys
    import torch
    from decode_monitor.engine.decoder import Decoder
    from decode_monitor.engine.fused import FusedBackend, PersistentBackend
    from decode_monitor.engine.sampling import SamplingParams
    from decode_monitor.engine.sources import load_model

    CTX = 1024
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    loaded = load_model('smollm2-135m', device='cuda', dtype=torch.bfloat16)
    model = loaded.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('_proj.weight'):
                p.mul_(3)
    ref = FusedBackend(copy.deepcopy(model).float(), CTX, use_triton=False)
    fused = FusedBackend(model, CTX)
    persistent = PersistentBackend(model, CTX)
    if persistent.layers_kernel is None:
        sys.exit('fell back: ' + persistent.fallback_reason)
    out = {'fallbacks': persistent.fallbacks,
           'grid': [p.grid[0] for p in persistent.layers_kernel.parts],
           'per_sm': persistent.layers_kernel.per_sm, 'err_fused': [], 'err_persistent': []}
    gen = torch.Generator().manual_seed(0)
    for n in (40, 700):  # attention over one split, and over many
        prompt = torch.randint(0, 49152, (1, n), generator=gen).cuda()
        token = ref.prefill(prompt).argmax(-1, keepdim=True)
        fused.prefill(prompt)
        persistent.prefill(prompt)
        for i in range(4):
            pos = torch.tensor([n + i], device='cuda')
            expected = ref.forward_one(token, pos)
            for buf in (persistent.q, persistent.att, persistent.act, persistent.logits):
                buf.fill_(float('nan'))
            out['err_persistent'].append(rel(persistent.forward_one(token, pos), expected))
            out['err_fused'].append(rel(fused.forward_one(token, pos), expected))
            token = expected.argmax(-1, keepdim=True)
    # every layout of a layer (one launch, two, q/k/v + attention kernels + the rest), tickets of
    # single blocks and of ranges, the next ticket taken ahead or not: one step each vs fp32
    from decode_monitor.engine.fused.persistent_launch import PersistentConfig
    out['variants'] = {}
    prompt = torch.randint(0, 49152, (1, 500), generator=gen).cuda()
    token = ref.prefill(prompt).argmax(-1, keepdim=True)
    pos = torch.tensor([500], device='cuda')
    expected = ref.forward_one(token, pos)
    fused.prefill(prompt)
    e_f = rel(fused.forward_one(token, pos), expected)
    for layout in ('one', 'two', 'split'):
        # 2-row blocks, one program an SM: gate/up's 768 blocks make ranges of 2 on 132 SMs
        for kind, cfg in (('default', PersistentConfig(layout=layout)),
                          ('ranges', PersistentConfig(layout=layout, block_n=2,
                                                      programs_per_sm=1, ticket_blocks=4,
                                                      ahead=True))):
            other = PersistentBackend(model, CTX, persistent_config=cfg)
            other.prefill(prompt)
            for buf in (other.q, other.att, other.act, other.logits):
                buf.fill_(float('nan'))
            e_p = rel(other.forward_one(token, pos), expected)
            ranges = other.layers_kernel.parts[-1].constants['R_GU']
            out['variants'][f'{layout}-{kind}'] = [
                e_p, e_f, other.timeouts(), other.fallbacks, ranges]
            del other
    # int8 / int4: the same codes through the persistent tasks and the fused GEMVs, vs fp32
    out['quantised'] = {}
    for weights in ('int8', 'int4'):
        errors = []
        for cls in (PersistentBackend, FusedBackend):
            other = cls(model, CTX, weights=weights)
            other.prefill(prompt)
            errors.append(rel(other.forward_one(token, pos), expected))
            if cls is PersistentBackend:
                errors += [other.timeouts(), other.fallbacks]
            del other
        out['quantised'][weights] = errors
    # repeatability: the same step replayed in a graph, bit for bit
    pos = torch.tensor([700], device='cuda')
    graph = torch.cuda.CUDAGraph()
    persistent.forward_one(token, pos)
    with torch.cuda.graph(graph):
        logits = persistent.forward_one(token, pos)
    graph.replay()
    first = logits.clone()
    out['bitwise'] = True
    for _ in range(30):
        graph.replay()
        out['bitwise'] &= torch.equal(first, logits)
    # forward progress with four times more programs than fit on the GPU at once
    kernel = persistent.layers_kernel
    kernel.oversubscribe(4)
    out['oversubscribed_equal'] = bool(torch.equal(persistent.forward_one(token, pos), first))
    out['timeouts'] = persistent.timeouts()
    # through the decoder: graph mode gives eager mode's tokens
    prompt = list(b'The robot arm picked up the red block and')
    tokens = {}
    for mode in ('eager', 'graph'):
        decoder = Decoder(loaded, mode=mode, backend='persistent', max_context=256)
        tokens[mode] = [s.token for s in decoder.generate(prompt, SamplingParams(),
                                                          max_new_tokens=16)]
    out['graph_tokens_equal_eager'] = tokens['graph'] == tokens['eager']
    out['decoder_mode'] = decoder.mode
    print('RESULT ' + json.dumps(out))
''')


@pytest.fixture(scope='module')
def child():
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    try:
        proc = subprocess.run([sys.executable, '-c', CHILD], capture_output=True, text=True,
                              timeout=WATCHDOG_S, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f'the persistent step did not finish within {WATCHDOG_S} s (a hang)')
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len('RESULT '):])


def test_persistent_kernel_runs_without_fallback(child):
    assert child['fallbacks'] == 0 and child['per_sm'] >= 1
    assert child['timeouts'] == 0


def test_logits_as_close_to_fp32_as_the_fused_step(child):
    for e_p, e_f in zip(child['err_persistent'], child['err_fused']):
        assert e_p == e_p  # not NaN: every poisoned element was written
        assert e_p <= 1.25 * e_f + 2e-3, (child['err_persistent'], child['err_fused'])


def test_every_layout_and_ticket_range_as_close_to_fp32_as_the_fused_step(child):
    assert len(child['variants']) == 6
    for name, (e_p, e_f, timeouts, fallbacks, ranges) in child['variants'].items():
        assert e_p <= 1.25 * e_f + 2e-3, (name, e_p, e_f)  # NaN fails too
        assert timeouts == 0 and fallbacks == 0, name
        assert ranges == (2 if name.endswith('ranges') else 1), name


def test_quantised_logits_as_close_to_fp32_as_the_fused_step(child):
    assert sorted(child['quantised']) == ['int4', 'int8']
    for weights, (e_p, timeouts, fallbacks, e_f) in child['quantised'].items():
        assert timeouts == 0 and fallbacks == 0, weights
        assert e_p <= 1.25 * e_f + 2e-3, (weights, e_p, e_f)  # NaN fails too


def test_bit_for_bit_repeatable_and_oversubscription_safe(child):
    assert child['bitwise']
    assert child['oversubscribed_equal']


def test_decoder_graph_tokens_equal_eager_tokens(child):
    assert child['decoder_mode'] == 'graph'
    assert child['graph_tokens_equal_eager']
