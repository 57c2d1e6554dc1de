"""Weight-only int8 / int4 on the fused backend, on the CPU.

- Quantise / dequantise round trip: codes in range, every weight within half a step of its
  dequantised value, weights already on the grid come back exactly.
- The quantised Triton kernels (interpreter) against torch's F.linear on the dequantised matrix,
  for every fusion (residual, RMSNorm input, SiLU gate, fp32 logits, QKV + RoPE + cache write).
- The backend: Triton path = torch path on a tiny model, in both formats; the floor counts the
  bytes as stored, checked against a count from the model's shapes alone.
"""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decode_monitor.engine.decoder import Decoder  # noqa: E402
from decode_monitor.engine.floor import FloorModel  # noqa: E402
from decode_monitor.engine.fused import FusedBackend  # noqa: E402
from decode_monitor.engine.fused import gemv as G  # noqa: E402
from decode_monitor.engine.fused.quant import group_size_for, quantize  # noqa: E402

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
FORMATS = ('int8', 'int4')
# GPU-like small blocks, split-K in 2-3 shares (the last one short at K = 576); the interpreter's
CONFIGS = [(4, 128, 4, 1), (2, 256, 4, 2), (4, 128, 4, 1, 3), None]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantize_int4_minmax(w, group=128):
    """Plain min/max asymmetric int4, written out here: the baseline the range search beats."""
    wg = w.view(w.shape[0], -1, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-30)
    return (torch.round((wg - lo) / s).clamp(0, 15) * s + lo).view_as(w)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def prefill_then_steps(backend, prompt, steps):
    """Logits of the prompt's prefill, then of `steps` greedy steps after it."""
    logits = [backend.prefill(prompt).clone()]
    token = logits[0].argmax(-1, keepdim=True)
    for i in range(steps):
        pos = torch.tensor([prompt.shape[1] + i], device=DEV)
        logits.append(backend.forward_one(token, pos).clone())
        token = logits[-1].argmax(-1, keepdim=True)
    return logits


# -- round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_round_trip_within_half_a_step(fmt, dtype):
    w = (randn(48, 256, seed=1) * 0.05).to(dtype)
    w[3, :128] = 0  # an all-zero group: scale 0, must come back as zeros
    qw = quantize(w, fmt)
    assert qw.group == 128 and qw.shape == (48, 256)
    deq = qw.dequantize(torch.float32)
    step = qw.scale.float().repeat_interleave(128, dim=1)
    err = (deq - w.float()).abs()
    if fmt == 'int4':  # the range may clip a group's extremes, when that lowers its error
        low = qw.offset.float().repeat_interleave(128, dim=1)
        inside = (w.float() >= low) & (w.float() <= low + 15 * step)
        err = torch.where(inside, err, 0)
        minmax = quantize_int4_minmax(w.float())
        group_sse = (deq - w.float()).square().view(48, 2, 128).sum(-1)
        minmax_sse = (minmax - w.float()).square().view(48, 2, 128).sum(-1)
        assert dtype != torch.float32 or (group_sse <= minmax_sse * 1.0001 + 1e-9).all()
    assert err.le(step / 2 * 1.001 + 1e-6).all()
    assert deq[3, :128].eq(0).all()
    if fmt == 'int8':
        assert qw.q.dtype == torch.int8 and qw.q.abs().max() <= 127
        assert qw.nbytes == 48 * 256 + 48 * 2 * qw.scale.element_size()
    else:
        assert qw.q.dtype == torch.uint8 and qw.q.shape == (48, 128)
        assert qw.nbytes == 48 * 128 + 2 * 48 * 2 * qw.scale.element_size()
    assert rel(deq, w) < (0.01 if fmt == 'int8' else 0.12)


@pytest.mark.parametrize('fmt', FORMATS)
def test_weights_on_the_grid_come_back_exactly(fmt):
    gen = torch.Generator().manual_seed(2)
    n, k, group = 8, 128, 64
    scale = torch.rand(n, k // group, generator=gen) + 0.5
    if fmt == 'int8':
        codes = torch.randint(-127, 128, (n, k), generator=gen)
        codes[:, ::group] = 127  # each group reaches the top code, so max|w| / 127 = scale
        w = codes.float() * scale.repeat_interleave(group, 1)
    else:
        codes = torch.randint(0, 16, (n, k), generator=gen)
        codes[:, ::group], codes[:, 1::group] = 0, 15  # min and max of each group on the grid
        offset = torch.randn(n, k // group, generator=gen)
        w = codes.float() * scale.repeat_interleave(group, 1) + offset.repeat_interleave(group, 1)
    qw = quantize(w, fmt, group=group)
    assert torch.allclose(qw.dequantize(), w, rtol=1e-5, atol=1e-5)


def test_group_size_and_bad_input():
    assert group_size_for(3584) == 128 and group_size_for(576) == 64 and group_size_for(96) == 32
    with pytest.raises(ValueError, match='group size'):
        group_size_for(100)
    with pytest.raises(ValueError, match='int8 or int4'):
        quantize(torch.zeros(4, 128), 'int3')


# -- kernels --------------------------------------------------------------------------------
@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('n,k', [(72, 256), (50, 384), (90, 576)])  # K % BLOCK_K != 0 too
def test_quant_gemv_residual_and_norm(fmt, config, n, k):
    qw = quantize(randn(n, k, seed=n), fmt)
    w = qw.dequantize()
    x, h, g = randn(k, seed=3), randn(n, seed=4), randn(k, seed=5).abs() + 0.5
    out = h.clone()
    G.gemv(qw, x, out, residual=out, config=config)
    assert rel(out, h + F.linear(x, w)) < 1e-5
    xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g
    logits = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, logits, norm_weight=g, eps=1e-5, config=config, kind='head')
    assert rel(logits, F.linear(xn, w)) < 1e-5


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('config', CONFIGS)
def test_quant_gated(fmt, config):
    n, k = 40, 256
    qw = quantize(randn(2 * n, k, seed=6), fmt)
    x, g = randn(k, seed=7), randn(k, seed=8).abs() + 0.5
    gate, up = F.linear(x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g, qw.dequantize()).chunk(2)
    out = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, out, norm_weight=g, gated=True, eps=1e-5, config=config)
    assert rel(out, F.silu(gate) * up) < 1e-5


# The staged gate/up kernel (staged.py) on a GPU; elsewhere these configs must fall back to the
# Triton kernel at the same rows, chunk and warps. Tail rows (N not a multiple of BLOCK_N), one
# and several chunks, 1-4 rows a thread, K of 1-8 groups.
STAGED = [('int4', (16, 256, 4), 40, 256), ('int4', (16, 512, 8), 72, 1024),
          ('int4', (64, 256, 4), 64, 768), ('int4', (32, 512, 4), 50, 512),
          ('int8', (16, 256, 4), 40, 256), ('int8', (8, 512, 8), 72, 1024),
          ('int8', (16, 128, 4), 64, 384), ('int8', (32, 256, 4), 50, 512)]


@pytest.mark.parametrize('fmt,config,n,k', STAGED)
def test_staged_gated(fmt, config, n, k):
    from decode_monitor.engine.fused.configs import GemvConfig
    config = GemvConfig(*config, 1, 1, None, True)
    qw = quantize(randn(2 * n, k, seed=n + k), fmt)
    x, g = randn(k, seed=9), randn(k, seed=10).abs() + 0.5
    gate, up = F.linear(x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g, qw.dequantize()).chunk(2)
    out = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, out, norm_weight=g, gated=True, eps=1e-5, config=config)
    assert rel(out, F.silu(gate) * up) < 1e-5
    again = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, again, norm_weight=g, gated=True, eps=1e-5, config=config)
    assert torch.equal(out, again)  # the same bits run to run
    assert G.staged_fits(config, fmt, n, k, qw.group)
    assert G._staged(config, x, fmt, n, k, qw.group) == (DEV == 'cuda')


# The same kernel as a plain GEMV with the residual added (o_proj, down_proj), K split into
# shares that are whole chunks, the last share shorter where the split does not divide them
# (shares of 5 + 4, 3 + 3 + 1, 2 + 1, 1 x 4 chunks), one or two chunks of codes in flight.
STAGED_PLAIN = [('int8', (16, 512, 4, 1, 2), 40, 4608), ('int8', (8, 256, 4, 2, 3), 72, 1792),
                ('int8', (8, 512, 4, 2, 1), 72, 1024), ('int4', (16, 512, 4, 2, 2), 50, 1536),
                ('int4', (16, 256, 4, 1, 1), 50, 768), ('int4', (32, 512, 8, 2, 4), 64, 2048),
                ('int8', (16, 512, 4, 2, 2), 40, 4608)]


@pytest.mark.parametrize('fmt,config,n,k', STAGED_PLAIN)
def test_staged_plain(fmt, config, n, k):
    from decode_monitor.engine.fused.configs import GemvConfig
    config = GemvConfig(*config[:3], config[3], config[4], None, True)
    qw = quantize(randn(n, k, seed=n + k), fmt)
    x, r = randn(k, seed=11), randn(n, seed=12)
    want = F.linear(x, qw.dequantize()) + r
    runs = []
    for _ in range(2):  # the second launch finds the split tickets reset by the first
        out = r.clone()
        G.gemv(qw, x, out, residual=out, config=config)  # in place, as the model adds it
        runs.append(out)
    assert rel(runs[0], want) < 1e-5
    assert torch.equal(runs[0], runs[1])  # the same bits run to run
    assert G.staged_fits(config, fmt, n, k, qw.group, plain=True)
    assert G._staged(config, x, fmt, n, k, qw.group, plain=True) == (DEV == 'cuda')


@pytest.mark.parametrize('fmt,config', [('int8', (32, 256, 4, 2)), ('int4', (64, 256, 4, 1))])
def test_staged_head(fmt, config):
    """lm_head through the staged kernel: RMSNorm over all of K, no gate, fp32 logits."""
    from decode_monitor.engine.fused.configs import GemvConfig
    n, k = 300, 768
    config = GemvConfig(*config, 1, None, True)
    qw = quantize(randn(n, k, seed=5), fmt)
    x, g = randn(k, seed=6), randn(k, seed=7).abs() + 0.5
    want = F.linear(x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g, qw.dequantize())
    out = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, out, norm_weight=g, eps=1e-5, config=config, kind='head')
    assert rel(out, want) < 1e-5
    assert G.staged_fits(config, fmt, n, k, qw.group)
    assert G._staged(config, x, fmt, n, k, qw.group) == (DEV == 'cuda')


def test_staged_kernel_takes_only_the_shapes_it_fits():
    """`fits` decides which launches reach the GPU-only kernel: whole chunks on group
    boundaries, whole rows of threads, x' of a program's share of K within 64 KB of shared
    memory, every share non-empty, and split K only for a plain GEMV."""
    from decode_monitor.engine.fused.configs import GemvConfig
    from decode_monitor.engine.fused.staged import fits

    def staged(block_n, block_k, warps):
        return GemvConfig(block_n, block_k, warps, 1, 1, None, True)
    assert fits(staged(16, 512, 8), 'int4', 18944, 3584, 128)  # qwen2.5-7b's gate/up
    assert fits(staged(16, 256, 4), 'int8', 14336, 4096, 128)  # llama-3-8b's
    assert not fits(staged(16, 512, 8), 'int4', 3584, 18944, 128)  # 128 KB of x'
    assert not fits(staged(16, 1024, 8), 'int4', 18944, 3584, 128)  # 3.5 chunks
    assert not fits(staged(8, 256, 4), 'int4', 18944, 3584, 128)  # 16 threads on rows
    assert not fits(staged(16, 1024, 8), 'int8', 18944, 4096, 128)  # 64 sub-blocks a chunk
    assert not fits(staged(16, 64, 4), 'int8', 40, 256, 128)  # a chunk inside a group

    def split(block_n, block_k, warps, shares):
        return GemvConfig(block_n, block_k, warps, 1, shares, None, True)
    assert fits(split(16, 512, 4, 8), 'int8', 3584, 18944, 128, plain=True)  # 37 chunks: 5 a share
    assert not fits(split(16, 512, 4, 8), 'int8', 3584, 18944, 128)  # norm or gate: all of K
    assert not fits(split(16, 512, 4, 1), 'int8', 3584, 18944, 128, plain=True)  # 128 KB of x'
    assert not fits(split(16, 512, 4, 8), 'int8', 3584, 3584, 128, plain=True)  # a share empty


@pytest.mark.parametrize('magnitude', [2.0 ** 25, 2.0 ** -60])
def test_int4_kernel_over_the_x_range_it_documents(magnitude):
    """int4 products go through denormals scaled by 2^-48: exact for |x| in [2^-78, 2^26]."""
    n, k = 24, 256
    qw = quantize(randn(n, k, seed=13), 'int4')
    x = randn(k, seed=14) * magnitude / 4  # |x| up to ~magnitude
    out = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, out, config=(4, 128, 4, 1), kind='head')
    assert torch.isfinite(out).all()
    assert rel(out, F.linear(x.double(), qw.dequantize(torch.float64))) < 1e-5


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('config', [(4, 128, 4, 1), (2, 256, 4, 2), (4, 128, 4, 1, 2)])
def test_quant_qkv_rope_equals_dense_kernel_on_dequantised_weights(fmt, config):
    q_heads, kv_heads, d, k, t = 4, 2, 32, 256, 16
    rows = (q_heads + 2 * kv_heads) * d
    qw = quantize(randn(rows, k, seed=9), fmt)
    x, g, bias = randn(k, seed=10), randn(k, seed=11).abs() + 0.5, randn(rows, seed=12)
    angles = torch.arange(t, device=DEV)[:, None] * torch.rand(d // 2, device=DEV)
    cos, sin, pos = angles.cos(), angles.sin(), torch.tensor([5], device=DEV)
    outs = []
    for w in (qw, qw.dequantize()):  # the dense kernel is checked against transformers
        q = torch.full((q_heads * d,), float('nan'), device=DEV)
        kc, vc = (torch.zeros(kv_heads, t, d, device=DEV) for _ in range(2))
        G.qkv_rope(w, bias, x, g, cos, sin, pos, q, kc, vc, q_heads, kv_heads, 1e-5,
                   config=config)
        outs.append((q, kc, vc))
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-5
    assert outs[0][1][:, 5].abs().sum() > 0 and outs[0][1][:, 4].abs().sum() == 0


@pytest.mark.parametrize('fmt,config', [
    ('int8', (16, 128, 4, 2)), ('int8', (8, 256, 4, 1)), ('int4', (16, 256, 4, 1)),
    ('int4', (32, 256, 8, 2))])
def test_staged_qkv_rope(fmt, config):
    """q/k/v + RoPE through staged_qkv.py on a GPU (the Triton kernel elsewhere): the same q and
    cache rows as the dense kernel on the dequantised weights, with a bias and (120 pairs, for
    16 and 32 pairs a program) tail pairs, the same bits run to run. The configs are ones the
    staged kernel takes, so on a GPU it is that kernel that is checked."""
    from decode_monitor.engine.fused.configs import GemvConfig
    config = GemvConfig(*config, 1, None, True)
    q_heads, kv_heads, d, k, t = 7, 4, 16, 512, 16
    rows = (q_heads + 2 * kv_heads) * d
    qw = quantize(randn(rows, k, seed=21), fmt)
    x, g, bias = randn(k, seed=22), randn(k, seed=23).abs() + 0.5, randn(rows, seed=24)
    angles = torch.arange(t, device=DEV)[:, None] * torch.rand(d // 2, device=DEV)
    cos, sin, pos = angles.cos(), angles.sin(), torch.tensor([9], device=DEV)
    outs = []
    for w, cfg in ((qw, config), (qw, config), (qw.dequantize(), None)):
        q = torch.full((q_heads * d,), float('nan'), device=DEV)
        kc, vc = (torch.zeros(kv_heads, t, d, device=DEV) for _ in range(2))
        G.qkv_rope(w, bias, x, g, cos, sin, pos, q, kc, vc, q_heads, kv_heads, 1e-5,
                   config=cfg)
        outs.append((q, kc, vc))
    for a, again, want in zip(*outs):
        assert rel(a, want) < 1e-5
        assert torch.equal(a, again)
    assert outs[0][2][:, 9].abs().sum() > 0 and outs[0][2][:, 8].abs().sum() == 0
    assert G.staged_fits(config, fmt, rows, k, qw.group)
    assert G._staged(config, x, fmt, rows, k, qw.group) == (DEV == 'cuda')


# -- backend --------------------------------------------------------------------------------
@pytest.mark.parametrize('fmt', FORMATS)
def test_triton_path_equals_torch_path(tiny, fmt):
    model = copy.deepcopy(tiny.model).to(DEV)  # the kernels run where the weights are
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3)).to(DEV)
    outs = []
    for use_triton in (False, True):
        backend = FusedBackend(model, 64, use_triton=use_triton, weights=fmt)
        outs.append(prefill_then_steps(backend, prompt, 3))
    for a, b in zip(*outs):
        assert rel(b, a) < 1e-4
    dense = FusedBackend(model, 64, use_triton=False).prefill(prompt)
    assert rel(outs[0][0], dense) > 1e-4  # the quantised model is a different model...
    assert rel(outs[0][0], dense) < (0.05 if fmt == 'int8' else 0.5)  # ...but close


@pytest.mark.parametrize('fmt', FORMATS)
def test_release_dense_frees_the_matrices_and_keeps_the_answers(tiny, fmt):
    """After quantising, the model's dense matrices can go; the kernels' results must not move,
    and whatever would need the dense weights must refuse clearly."""
    from decode_monitor.engine.hf_backend import HFBackend
    model = copy.deepcopy(tiny.model).to(DEV)
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(5)).to(DEV)

    def param_bytes():
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for p in model.parameters()}
        return sum(storages.values())

    backend = FusedBackend(model, 64, use_triton=True, weights=fmt)
    before, bytes_before = prefill_then_steps(backend, prompt, 2), param_bytes()
    freed = backend.release_dense(model)
    cfg = model.config
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d = cfg.head_dim
    per_layer = hidden * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d  # q, k, v
    per_layer += cfg.num_attention_heads * d * hidden + 3 * hidden * inter  # o, gate, up, down
    expected = layers * per_layer * 4  # fp32
    if not cfg.tie_word_embeddings:
        expected += cfg.vocab_size * hidden * 4
    assert freed == expected and param_bytes() == bytes_before - expected
    for a, b in zip(before, prefill_then_steps(backend, prompt, 2)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match='released'):
        HFBackend(model, 64)
    with pytest.raises(ValueError, match='released'):
        FusedBackend(model, 64, weights='bf16')
    again = FusedBackend(model, 64, use_triton=True, weights=fmt)  # shares the quantised copies
    assert torch.equal(again.prefill(prompt), before[0])


def _count_bytes(config, fmt, dtype_bytes):
    """Bytes per step from the model's shapes alone: what the stored formats must add up to.
    Every K of the tiny preset (128, 256) is a multiple of 128: groups of 128 weights."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = config.hidden_size // config.num_attention_heads
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    matrices = [(qkv_rows, h), (h, config.num_attention_heads * d), (2 * i, h), (h, i)]
    matrices = matrices * config.num_hidden_layers + [(v, h)]
    assert all(k % 128 == 0 for _, k in matrices)
    per_weight, per_group = {'int8': (1, 1), 'int4': (0.5, 2)}[fmt]  # int4: scale and offset
    total = sum(n * k * per_weight + n * (k // 128) * per_group * dtype_bytes
                for n, k in matrices)
    norms = (2 * config.num_hidden_layers + 1) * h * dtype_bytes
    return int(total + norms + h * dtype_bytes)  # + one embedding row


@pytest.mark.parametrize('fmt', FORMATS)
def test_floor_counts_stored_bytes(tiny, fmt):
    model = tiny.model
    dense = Decoder(tiny, mode='eager', backend='fused', max_context=64)
    assert dense.floor == FloorModel.for_model(model)  # unquantised: the model's own count
    quant = Decoder(tiny, mode='eager', backend='fused', max_context=64, weights=fmt)
    assert quant.floor.weight_bytes == _count_bytes(model.config, fmt, 4)
    assert quant.floor.kv_bytes_per_token == dense.floor.kv_bytes_per_token
    ratio = dense.floor.weight_bytes / quant.floor.weight_bytes
    assert 3.0 < ratio < 4.0 if fmt == 'int8' else 6.0 < ratio < 8.0  # from fp32 weights


def test_quantised_weights_need_the_fused_backend(tiny):
    with pytest.raises(ValueError, match='need backend fused'):
        Decoder(tiny, mode='eager', backend='hf', max_context=64, weights='int4')
    with pytest.raises(ValueError, match='weights must be one of'):
        FusedBackend(tiny.model, 64, weights='fp8')


def dequantised_by_hand(qw):
    """The (N, K) matrix of a QuantWeight, read from its documented storage alone (quant.py)."""
    n, k, group = qw.q.shape[0], qw.shape[1], qw.group
    scale = qw.scale.float().repeat_interleave(group, 1)
    if qw.fmt == 'int8':
        return qw.q.float() * scale
    # int4: a group's G / 2 bytes are G / 8 little-endian 32-bit words; nibble i of word c (byte
    # i // 2 of the word, its high half when i is odd) holds weight c + i G / 8 of the group
    words = qw.q.view(n, k // group, group // 8, 4).long()  # (row, group, word c, byte)
    lanes = torch.stack([(words[..., i // 2] >> 4 * (i % 2)) & 15 for i in range(8)], dim=-2)
    codes = lanes.reshape(n, k)  # (row, group, lane i, word c): weight i G / 8 + c
    return codes.float() * scale + qw.offset.float().repeat_interleave(group, 1)


@pytest.mark.parametrize('fmt', FORMATS)
def test_built_decoder_serves_the_codes_without_the_dense_weights(fmt):
    """The node's path (build_decoder): a quantised decoder owns its model, so the dense
    matrices are released; what it generates is the model of its codes, read here by hand."""
    from decode_monitor.engine.factory import DecoderSettings, build_decoder
    from decode_monitor.engine.sources import load_model
    settings = DecoderSettings(model='tiny', device='cpu', dtype='float32', mode='eager',
                               backend='fused', max_context=64, weights=fmt)
    built = build_decoder(settings)
    model = built.loaded.model
    modules = [m for block in model.model.layers
               for m in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                         block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
                         block.mlp.down_proj)] + [model.lm_head]
    assert all(m.weight.numel() == 0 for m in modules)
    # tiny: 2 layers of q, k, v, o (128 x 128, 2 x 64 x 128, 128 x 128) and gate, up, down
    # (3 x 256 x 128), and the untied 512 x 128 lm_head, in float32
    assert built.released_bytes == (2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)
                                    + 512 * 128) * 4
    reference = load_model('tiny', dtype=torch.float32).model  # the same seed: the same weights
    prompt = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        dense_logits = reference(prompt).logits[0, -1]
        for block, layer in zip(reference.model.layers, built.backend.layers):
            attn, mlp = block.self_attn, block.mlp
            q, k, v = dequantised_by_hand(layer.wqkv).split([128, 64, 64])
            gate, up = dequantised_by_hand(layer.wgu).split([256, 256])
            for module, w in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                              (attn.o_proj, dequantised_by_hand(layer.wo)),
                              (mlp.gate_proj, gate), (mlp.up_proj, up),
                              (mlp.down_proj, dequantised_by_hand(layer.wd))):
                module.weight.copy_(w)
        reference.lm_head.weight.copy_(dequantised_by_hand(built.backend.lm_head))
        logits = reference(prompt).logits[0, -1]
        expected = reference.generate(prompt, max_new_tokens=8, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert rel(built.backend.prefill(prompt)[0], logits) < 1e-5
    assert rel(dense_logits, logits) > 1e-3  # the codes' model is not the dense one
    assert [step.token for step in built.generate(prompt[0].tolist(), max_new_tokens=8)] \
        == expected


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('k, group', [(1280, 128), (192, 64), (96, 32)])
def test_the_prefill_unpack_kernel_is_dequantize(fmt, k, group):
    """unpack.dense_into (the prefill's dequantisation, Triton) against QuantWeight.dequantize:
    every lane of int4, group sizes 32-128, a K that is not a multiple of the kernel's block,
    a buffer longer than the matrix; int4 with row and group tails in its (rows x groups)
    blocks."""
    from decode_monitor.engine.fused.unpack import BLOCK, buffer_for, dense_into, Int4Blocks
    w = quantize(randn(6, k, seed=k).to(torch.bfloat16), fmt, group)
    assert k % BLOCK or k < BLOCK
    buffer = buffer_for([w, quantize(randn(7, k, seed=1).to(torch.bfloat16), fmt, group)],
                        torch.bfloat16, DEV)
    buffer.fill_(7.0)
    out = dense_into(w, buffer)
    assert out.shape == (6, k) and out.data_ptr() == buffer.data_ptr()
    # the same float32 value, rounded once to bf16 (the interpreter truncates: one ulp)
    torch.testing.assert_close(out, w.dequantize(torch.bfloat16), rtol=2 ** -7, atol=0)
    assert (buffer[6 * k:] == 7.0).all()  # nothing written past the matrix
    exact = dense_into(w, torch.empty(6 * k, device=DEV))  # float32: no rounding at all
    torch.testing.assert_close(exact, w.dequantize(torch.float32), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match='too small'):
        dense_into(w, buffer[:10])
    if fmt == 'int4':  # 6 rows and 3 or 10 groups in blocks of 4 x 4 (the default) and 8 x 8
        buffer.fill_(7.0)
        out = dense_into(w, buffer, Int4Blocks(rows=8, groups=8, num_warps=2))
        torch.testing.assert_close(out, w.dequantize(torch.bfloat16), rtol=2 ** -7, atol=0)
        assert (buffer[6 * k:] == 7.0).all()


_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from decode_monitor.engine.fused.staged import staged_kernel as fn
block_n, block_k, warps, k, int4, split, ahead = (int(a) for a in sys.argv[1:8])
kind = sys.argv[8]  # gated (RMSNorm, gate), plain (residual) or head (RMSNorm)
types = {'W': '*i32', 'S': '*bf16', 'Z': '*bf16', 'X': '*bf16', 'NW': '*bf16', 'R': '*bf16',
         'Y': '*bf16', 'ACC': '*fp32', 'CNT': '*i32', 'N': 'i32', 'stride_w': 'i32',
         'stride_s': 'i32', 'eps': 'fp32'}
per = -(-(k // block_k) // split)
consts = dict(K=k, GATED=kind == 'gated', NORM=kind != 'plain', RESIDUAL=kind == 'plain',
              INT4=bool(int4),
              GROUP=128, BLOCK_N=block_n, BLOCK_K=block_k, CH2=triton.next_power_of_2(per),
              SPLIT=split, AHEAD=ahead, WARPS=warps, PDL=True)
names = fn.arg_names
src = GluonASTSource(fn, {n: types.get(n, 'constexpr') for n in names},
                     {(names.index(c),): v for c, v in consts.items()},
                     {(names.index(a),): [['tt.divisibility', 16]]
                      for a in ('W', 'S', 'Z', 'X', 'NW', 'R', 'Y', 'ACC', 'CNT', 'stride_w')})
out = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': warps})
print(int('griddepcontrol.wait' in out.asm['ptx']), int('.local' in out.asm['ptx']),
      out.metadata.shared)
"""


_COMPILE_QKV = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from decode_monitor.engine.fused.staged_qkv import staged_qkv_kernel as fn
block_n, block_k, warps, k, int4, ahead = (int(a) for a in sys.argv[1:7])
types = {'W': '*i32', 'S': '*bf16', 'Z': '*bf16', 'B': '*bf16', 'X': '*bf16', 'NW': '*bf16',
         'COS': '*fp32', 'SIN': '*fp32', 'POS': '*i64', 'Q': '*bf16', 'KC': '*bf16',
         'VC': '*bf16', 'n_pairs': 'i32', 'q_pairs': 'i32', 'k_pairs': 'i32',
         'cache_head_stride': 'i32', 'stride_w': 'i32', 'stride_s': 'i32', 'eps': 'fp32'}
consts = dict(K=k, HALF=64, HAS_BIAS=True, INT4=bool(int4), GROUP=128, BLOCK_N=block_n,
              BLOCK_K=block_k, CH2=triton.next_power_of_2(k // block_k), AHEAD=ahead,
              WARPS=warps, PDL=True)
names = fn.arg_names
src = GluonASTSource(fn, {n: types.get(n, 'constexpr') for n in names},
                     {(names.index(c),): v for c, v in consts.items()},
                     {(names.index(a),): [['tt.divisibility', 16]]
                      for a in ('W', 'S', 'Z', 'B', 'X', 'NW', 'Q', 'KC', 'VC', 'stride_w')})
out = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': warps})
print(int('griddepcontrol.wait' in out.asm['ptx']), int('.local' in out.asm['ptx']),
      out.metadata.shared)
"""


@pytest.mark.parametrize('fmt,block_n,block_k,warps,k,split,ahead,kind', [
    ('int4', 16, 512, 8, 3584, 1, 1, 'gated'), ('int4', 16, 256, 4, 3584, 1, 2, 'gated'),
    ('int8', 16, 256, 8, 3584, 1, 1, 'gated'), ('int8', 8, 512, 8, 3584, 1, 2, 'gated'),
    ('int8', 32, 512, 8, 18944, 8, 2, 'plain'), ('int4', 16, 512, 4, 18944, 4, 1, 'plain'),
    ('int8', 16, 512, 4, 3584, 1, 1, 'plain'), ('int4', 32, 512, 4, 3584, 1, 1, 'head')])
def test_staged_kernel_compiles_for_hopper_without_spills(fmt, block_n, block_k, warps, k, split,
                                                          ahead, kind):
    """What a machine without a GPU can check of the GPU-only kernel: it builds for sm_90
    (ptxas) with the PDL wait, nothing spilled to local memory, x' of a program's share of K in
    shared memory (gate/up with RMSNorm, a plain GEMV with its residual, split or not, and
    lm_head's RMSNorm without a gate). In a process
    of its own: here Triton runs its interpreter, which compiles nothing."""
    import subprocess
    import sys
    pytest.importorskip('triton.experimental.gluon')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', _COMPILE, str(block_n), str(block_k),
                          str(warps), str(k), str(int(fmt == 'int4')), str(split),
                          str(ahead), kind], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    pdl_wait, local, shared = (int(v) for v in run.stdout.split())
    assert pdl_wait == 1 and local == 0
    per = -(-(k // block_k) // split)
    assert shared >= (1 << (per - 1).bit_length()) * block_k * 4


@pytest.mark.parametrize('fmt,block_n,block_k,warps,ahead', [
    ('int8', 16, 512, 4, 2), ('int4', 16, 512, 8, 1), ('int8', 32, 256, 8, 1),
    ('int4', 16, 512, 4, 2)])
def test_staged_qkv_kernel_compiles_for_hopper_without_spills(fmt, block_n, block_k, warps,
                                                              ahead):
    """staged_qkv.py's kernel at qwen2.5-7b's K builds for sm_90 with the PDL wait, nothing
    spilled, all of x' in shared memory (in a process of its own, as above)."""
    import subprocess
    import sys
    pytest.importorskip('triton.experimental.gluon')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', _COMPILE_QKV, str(block_n), str(block_k),
                          str(warps), '3584', str(int(fmt == 'int4')), str(ahead)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    pdl_wait, local, shared = (int(v) for v in run.stdout.split())
    assert pdl_wait == 1 and local == 0
    assert shared >= 4096 * 4  # x' of K = 3584, padded to 4096 fp32
