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
    after a cached prefix and after a prompt longer than every bucket are the eager decoder's."""
    import copy
    from decode_monitor.engine.decoder import Decoder
    model = copy.deepcopy(tiny.model).to('cuda')
    loaded = copy.copy(tiny)
    loaded.model = model
    graph = Decoder(loaded, mode='graph', backend='fused', max_context=1024)
    eager = Decoder(loaded, mode='eager', backend='fused', max_context=1024)
    assert graph.prefill_fallback_reason is None and graph.backend.prefill_graphs.graphs
    assert eager.backend.prefill_graphs is None
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 512, (700,), generator=generator).tolist()
    for ids in (prompt[:9], prompt[:9] + prompt[100:140], prompt):
        got = [s.token for s in graph.generate(ids, max_new_tokens=6)]
        want = [s.token for s in eager.generate(ids, max_new_tokens=6)]
        assert got == want
    assert graph.last_cached_tokens == 9  # 691 new tokens: longer than every bucket
