"""The captured prefill's body on the CPU (the capture itself needs CUDA: test_gpu.py's GPU runs
and the bench cover it): a prompt padded to a bucket, its start a device tensor, its logits
picked by a device index, computes what the plain prefill computes, and the cache holds the
same K/V at the prompt's positions."""
import pytest
import torch

from decode_monitor.engine.fused import FusedBackend


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_a_padded_prefill_with_device_start_and_index_is_the_prefill(tiny):
    plain = FusedBackend(tiny.model, 64, use_triton=False)
    padded = FusedBackend(tiny.model, 64, use_triton=False)
    generator = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 512, (1, 20), generator=generator)
    ids = torch.randint(0, 512, (1, 5), generator=generator)
    bucket = torch.zeros((1, 16), dtype=torch.long)
    bucket[:, :5] = ids
    last = torch.tensor([4])
    # fresh: from position 0, SDPA's causal mask over the bucket
    want = plain.prefill(ids, 0)
    got = padded._torch_forward(bucket, 0, last=last)
    assert rel(got, want) < 1e-5
    assert torch.allclose(padded.k_cache[:, :, :5], plain.k_cache[:, :, :5], atol=1e-6)
    # after a cached prefix: the start a device tensor, every key masked by position
    plain.prefill(prefix, 0)
    padded.prefill(prefix, 0)
    want = plain.prefill(ids, 20)
    got = padded._torch_forward(bucket, torch.tensor([20]), last=last, keys=64)
    assert rel(got, want) < 1e-5
    assert torch.allclose(padded.v_cache[:, :, :25], plain.v_cache[:, :, :25], atol=1e-6)
    # the index matters: another real token's logits are not these
    other = padded._torch_forward(bucket, torch.tensor([20]), last=torch.tensor([3]), keys=64)
    assert rel(other, want) > 1e-2


@pytest.mark.gpu
def test_captured_prefills_give_the_eager_prefills_tokens(tiny):
    """On a GPU, graph mode captures the short prefills; greedy tokens after a fresh prompt,
    after cached prefixes of two key buckets and after a prompt longer than every bucket are
    the eager decoder's."""
    import copy
    from decode_monitor.engine.decoder import Decoder
    from decode_monitor.engine.fused.prefill_graphs import KEYS_STEP
    loaded = copy.copy(tiny)
    loaded.model = copy.deepcopy(tiny.model).to('cuda')
    graph = Decoder(loaded, mode='graph', backend='fused', max_context=2500)
    eager = Decoder(loaded, mode='eager', backend='fused', max_context=2500)
    assert graph.prefill_fallback_reason is None
    assert graph.backend.prefill_graphs.keys == [KEYS_STEP, 2 * KEYS_STEP, 2500]
    assert eager.backend.prefill_graphs is None
    prompt = torch.randint(0, 512, (1400,), generator=torch.Generator().manual_seed(5)).tolist()
    cases = ((prompt[:9], 0), (prompt[:9] + prompt[100:140], 9), (prompt[:1200], 9),
             (prompt[:1200] + prompt[1300:1320], 1200))
    for ids, cached in cases:
        got = [s.token for s in graph.generate(ids, max_new_tokens=6)]
        want = [s.token for s in eager.generate(ids, max_new_tokens=6)]
        assert got == want
        assert graph.last_cached_tokens == eager.last_cached_tokens == cached


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_the_prefill_kernels_compute_the_torch_functions(dtype):
    """prefill_ops (Triton; the interpreter without a GPU) against model.py's torch functions:
    RMSNorm, RoPE on a strided slice of q/k/v, SiLU gate; float32 to rounding, bf16 to one
    step of bf16 per rounding (the interpreter truncates where the GPU rounds)."""
    import torch.nn.functional as F
    from decode_monitor.engine.fused import prefill_ops
    from decode_monitor.engine.fused.prefill import apply_rope, rms_norm
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    g = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    # bf16: two roundings (normalised, then weighted), each one step where the GPU rounds
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-3)
    x, weight = randn(7, 96), randn(96)
    torch.testing.assert_close(prefill_ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5),
                               **tol)
    qkv = randn(7, 6 * 16 + 2 * 2 * 16)  # 6 query heads and 2 KV heads of 16
    q = qkv[:, :96]
    angles = torch.rand(7, 8, generator=g).to(device) * 6
    cos, sin = angles.cos(), angles.sin()
    got = prefill_ops.apply_rope(q, cos, sin, 6)
    assert got.shape == (7, 6, 16) and got.is_contiguous()
    torch.testing.assert_close(got, apply_rope(q.reshape(7, 6, 16), cos, sin), **tol)
    gate_up = randn(5, 2 * 1100)  # more than one block of the intermediate size
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(prefill_ops.silu_mul(gate_up), F.silu(gate) * up, **tol)
