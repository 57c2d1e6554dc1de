"""The fused backend's Triton kernels against transformers/torch references, on the CPU.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are defined). fp32 throughout: the interpreter's bf16 dot is not faithful. Outputs are
poisoned with NaN first, so an element the kernel never writes fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb, repeat_kv)

from decode_monitor.engine.fused import gemv as G  # noqa: E402
from decode_monitor.engine.fused.attention import DecodeAttention  # noqa: E402

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
EPS = 1e-5


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rms_norm(x, weight):
    norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm(x)


# GPU-sized blocks (small BLOCK_N, pipelined), split-K (K in 3 shares, the last one short) and
# the interpreter's large blocks.
CONFIGS = [(4, 64, 4, 1), (2, 128, 4, 3), (4, 32, 4, 1, 3), None]


@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('n,k', [(72, 192), (50, 200)])  # 200: K not a multiple of BLOCK_K
def test_gemv_residual(config, n, k):
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(DEV)
    x = torch.randn(k, generator=gen).to(DEV)
    h = torch.randn(n, generator=gen).to(DEV)
    expected = h + F.linear(x, w)
    G.gemv(w, x, h, residual=h, config=config)  # in place, as o_proj / down_proj run
    assert rel(h, expected) < 1e-5


@pytest.mark.parametrize('config', CONFIGS)
def test_gemv_rmsnorm_input_and_fp32_output(config):
    gen = torch.Generator().manual_seed(1)
    n, k = 90, 160  # 90 rows: the last program is partly outside N
    w = torch.randn(n, k, generator=gen).to(DEV)
    x = torch.randn(k, generator=gen).to(DEV) * 3
    g = torch.rand(k, generator=gen).to(DEV) + 0.5
    out = torch.full((n,), float('nan'), device=DEV)
    G.gemv(w, x, out, norm_weight=g, eps=EPS, config=config, kind='head')
    assert rel(out, F.linear(rms_norm(x, g), w)) < 1e-5


@pytest.mark.parametrize('config', CONFIGS)
def test_gemv_gated_silu(config):
    gen = torch.Generator().manual_seed(2)
    inter, k = 40, 96
    gate = torch.randn(inter, k, generator=gen).to(DEV)
    up = torch.randn(inter, k, generator=gen).to(DEV)
    x = torch.randn(k, generator=gen).to(DEV)
    g = torch.rand(k, generator=gen).to(DEV) + 0.5
    out = torch.full((inter,), float('nan'), device=DEV)
    G.gemv(torch.cat([gate, up]), x, out, norm_weight=g, gated=True, eps=EPS, config=config)
    xn = rms_norm(x, g)
    assert rel(out, F.silu(F.linear(xn, gate)) * F.linear(xn, up)) < 1e-5


@pytest.mark.parametrize('fmt', ['int8', 'int4'])
@pytest.mark.parametrize('config', [(4, 128, 4, 2, 3), (4, 128, 4, 3, 3)])
def test_quantised_prefetch_or_pipeline_with_split_k(fmt, config):
    """Quantised loads one chunk ahead in registers (stages 2) or pipelined (3), with split-K
    whose last share is short (5 chunks in 3 shares): what the H200 table runs for int4 o_proj
    and down_proj (64, 256, 4, 2, 7), against the dequantised matrix."""
    from decode_monitor.engine.fused.quant import quantize
    gen = torch.Generator().manual_seed(5)
    n, k = 24, 640
    qw = quantize(torch.randn(2 * n, k, generator=gen).to(DEV), fmt)
    w = qw.dequantize()
    x = torch.randn(k, generator=gen).to(DEV)
    h = torch.randn(n, generator=gen).to(DEV)
    g = torch.rand(k, generator=gen).to(DEV) + 0.5
    down = quantize(torch.randn(n, k, generator=gen).to(DEV), fmt)
    out = h.clone()
    G.gemv(down, x, out, residual=out, config=config)
    assert rel(out, h + F.linear(x, down.dequantize())) < 1e-5
    out = torch.full((n,), float('nan'), device=DEV)
    G.gemv(qw, x, out, norm_weight=g, gated=True, eps=EPS, config=config)
    xn = rms_norm(x, g)
    assert rel(out, F.silu(F.linear(xn, w[:n])) * F.linear(xn, w[n:])) < 1e-5


def test_split_k_resets_its_tickets():
    """Split-K programs share fp32 scratch and tickets with every launch; each launch must reset
    its tickets, or the next one (next layer, next graph replay) picks the wrong last program
    and is wrong. The partial sums left in the scratch must not leak into the next launch."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(72, 192, generator=gen).to(DEV)
    gate_up = torch.randn(80, 192, generator=gen).to(DEV)
    x = torch.randn(192, generator=gen).to(DEV)
    g = torch.rand(192, generator=gen).to(DEV) + 0.5
    gate, up = F.linear(rms_norm(x, g), gate_up).chunk(2)
    for _ in range(3):
        h = torch.randn(72, generator=gen).to(DEV)
        expected = h + F.linear(x, w)
        G.gemv(w, x, h, residual=h, config=(8, 32, 4, 1, 4))
        assert rel(h, expected) < 1e-5
        out = torch.full((40,), float('nan'), device=DEV)
        G.gemv(gate_up, x, out, norm_weight=g, gated=True, eps=EPS, config=(4, 64, 4, 1, 3))
        assert rel(out, F.silu(gate) * up) < 1e-5
    _, _, tickets = G._SCRATCH[x.device]
    assert not tickets.any()


def test_split_k_sum_is_complete_over_six_splits():
    """Six splits of K = 768 in chunks of 64 (two chunks each): the last program adds every
    split's partial sum and the norm's sum of squares. That the sum comes out the same bits on
    every launch, whatever order the splits finish in, needs a GPU: test_gpu.py."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(2 * 96, 768, generator=gen).to(DEV)
    x = torch.randn(768, generator=gen).to(DEV)
    g = torch.rand(768, generator=gen).to(DEV) + 0.5
    gate, up = F.linear(rms_norm(x, g), w).chunk(2)
    out = torch.full((96,), float('nan'), device=DEV)
    G.gemv(w, x, out, norm_weight=g, gated=True, eps=EPS, config=(16, 64, 4, 1, 6))
    assert rel(out, F.silu(gate) * up) < 1e-5


def test_tuned_rows_with_a_split_reach_the_kernel():
    """A tuned row may carry a split-K (5th value); the lookup returns it (on the CPU too: a
    table's row wins over the interpreter's default), and the launch clamps it to the chunks K
    has."""
    from decode_monitor.engine.fused.configs import DEFAULTS, GemvConfig
    table = DEFAULTS.with_gemv(('gemv', 'bf16', 72, 192), (8, 32, 4, 1, 3)).with_gemv(
        ('gated', 'int4', 40, 192), (16, 64, 4, 3))
    assert table.gemv('gemv', 72, 192, on_cpu=True) == GemvConfig(8, 32, 4, 1, 3)
    assert table.gemv('gated', 40, 192, 'int4') == GemvConfig(16, 64, 4, 3, 1)
    assert table.gemv('gemv', 72, 64) == GemvConfig(4, 64, 4, 1)  # BLOCK_K at most K
    assert G._split_config((8, 32, 4, 1, 9), 192, 1) == (8, 32, 4, 1, 6)
    assert G._split_config((8, 32, 4, 1), 192, 64) == (8, 64, 4, 1, 1)
    gen = torch.Generator().manual_seed(5)
    w, x, h = (torch.randn(*shape, generator=gen).to(DEV) for shape in ((72, 192), (192,), (72,)))
    expected = h + F.linear(x, w)
    G.gemv(w, x, h, residual=h, config=table.gemv('gemv', 72, 192))
    assert rel(h, expected) < 1e-5


@pytest.mark.parametrize('config', [(4, 64, 4, 1), (8, 128, 4, 3), (8, 32, 4, 1, 2), None])
@pytest.mark.parametrize('bias', [False, True])
def test_qkv_rope_writes_q_and_cache_row(config, bias):
    """Against transformers' RMSNorm, Llama-3 scaled rotary tables and apply_rotary_pos_emb."""
    hq, hkv, d, hidden, ctx, pos = 6, 2, 32, 96, 40, 29
    rope = {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0,
            'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
            'original_max_position_embeddings': 16}
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=hq, num_key_value_heads=hkv,
                      head_dim=d, max_position_embeddings=ctx, rope_parameters=rope)
    gen = torch.Generator().manual_seed(3 + bias)
    w = torch.randn((hq + 2 * hkv) * d, hidden, generator=gen).to(DEV)
    b = torch.randn(w.shape[0], generator=gen).to(DEV) if bias else None
    x = torch.randn(hidden, generator=gen).to(DEV)
    g = torch.rand(hidden, generator=gen).to(DEV) + 0.5
    cos, sin = LlamaRotaryEmbedding(cfg).to(DEV)(x, torch.arange(ctx, device=DEV)[None])
    q = torch.full((hq * d,), float('nan'), device=DEV)
    kc = torch.full((hkv, ctx, d), float('nan'), device=DEV)
    vc = torch.full_like(kc, float('nan'))
    G.qkv_rope(w, b, x, g, cos[0, :, :d // 2].contiguous(), sin[0, :, :d // 2].contiguous(),
               torch.tensor([pos], device=DEV), q, kc, vc, hq, hkv, EPS, config=config)

    qkv = F.linear(rms_norm(x, g), w, b)
    q_ref, k_ref, v_ref = qkv.split([hq * d, hkv * d, hkv * d])
    q_ref, k_ref = apply_rotary_pos_emb(q_ref.view(1, hq, 1, d), k_ref.view(1, hkv, 1, d),
                                        cos[:, pos:pos + 1], sin[:, pos:pos + 1])
    assert rel(q, q_ref.flatten()) < 1e-5
    assert rel(kc[:, pos], k_ref.view(hkv, d)) < 1e-5
    assert rel(vc[:, pos], v_ref.view(hkv, d)) < 1e-5
    others = torch.ones(ctx, dtype=torch.bool)
    others[pos] = False
    assert kc[:, others].isnan().all() and vc[:, others].isnan().all()  # only row pos written


@pytest.mark.parametrize('hq,hkv,d,ctx,pos,config', [
    (8, 2, 32, 300, 299, (32, 5, 4, 2)),  # group 4, several splits, full cache
    (28, 4, 32, 300, 137, (64, 4, 4, 1)),  # group 7 (Qwen2.5-7B's), padded to 8 rows
    (4, 4, 64, 200, 3, (16, 7, 4, 1)),  # no GQA; most splits empty at pos 3
    (6, 1, 32, 4200, 4123, (64, 3, 4, 1)),  # past 4096; one KV head for six query heads
    (8, 2, 32, 700, 650, (16, 37, 4, 1)),  # more splits than a merge program holds at once
])
def test_decode_attention_matches_sdpa_over_prefix(hq, hkv, d, ctx, pos, config):
    gen = torch.Generator().manual_seed(pos)
    kc = torch.randn(hkv, ctx, d, generator=gen).to(DEV)
    vc = torch.randn(hkv, ctx, d, generator=gen).to(DEV)
    q = torch.randn(hq * d, generator=gen).to(DEV)
    att = DecodeAttention(hq, hkv, d, ctx, DEV, config=config)
    k = repeat_kv(kc[None, :, :pos + 1], hq // hkv)  # only the valid prefix
    v = repeat_kv(vc[None, :, :pos + 1], hq // hkv)
    expected = F.scaled_dot_product_attention(q.view(1, hq, 1, d), k, v).flatten()
    for _ in range(2):  # a second launch reuses the partials' scratch
        out = torch.full_like(q, float('nan'))
        att(q, kc, vc, torch.tensor([pos], device=DEV), out)
        assert rel(out, expected) < 1e-5


def test_decode_attention_ignores_cache_past_pos():
    """Garbage (inf) beyond pos must not leak into the result."""
    hq, hkv, d, ctx, pos = 4, 2, 32, 128, 50
    gen = torch.Generator().manual_seed(7)
    kc = torch.randn(hkv, ctx, d, generator=gen).to(DEV)
    vc = torch.randn(hkv, ctx, d, generator=gen).to(DEV)
    q = torch.randn(hq * d, generator=gen).to(DEV)
    att = DecodeAttention(hq, hkv, d, ctx, DEV, config=(16, 3, 4, 1))
    clean = att(q, kc, vc, torch.tensor([pos], device=DEV), torch.empty_like(q)).clone()
    kc[:, pos + 1:] = float('inf')
    vc[:, pos + 1:] = float('nan')
    dirty = att(q, kc, vc, torch.tensor([pos], device=DEV), torch.empty_like(q))
    assert torch.equal(clean, dirty)
