"""Eager prefills padded to a bounded set of row counts (prefill_shapes.py), on the CPU: the
greedy tokens are transformers' generate() on the real SmolLM2, fresh and after a cached prefix;
every padded count is one that start-up warms, and none runs past the cache."""
import pytest
import torch

from decode_monitor.engine.decoder import Decoder
from decode_monitor.engine.fused import FusedBackend, prefill_shapes
from decode_monitor.engine.sampling import SamplingParams


def reference(loaded, ids, n):
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def greedy(decoder, ids, n):
    return [s.token for s in decoder.generate(ids, SamplingParams(), n)]


def test_padded_prefills_give_transformers_tokens(smollm2):
    tok = smollm2.tokenizer
    base = tok.encode('The robot in the warehouse picks up a red box and carries it to the')
    # 5 over a multiple of 16: the padding reaches past the 8 positions decoding rewrites
    first = (base * 8)[:37]
    second = first + tok.encode(' loading dock, then it turns around and')
    new = len(second) - len(first)
    assert new % 16 not in (0, 1)
    padded = Decoder(smollm2, mode='eager', backend='fused', max_context=256)
    plain = Decoder(smollm2, mode='eager', backend='fused', max_context=256)
    assert not padded.backend.pad_rows  # the CPU's default: nothing to warm there
    padded.backend.pad_rows = True
    got = greedy(padded, first, 8)
    assert got == greedy(plain, first, 8) == reference(smollm2, first, 8)
    n, rows = len(first), prefill_shapes.rows(len(first), 0, 256)
    assert rows > n + 8
    # the padded rows wrote K/V past the prompt (no decode step reached them); plain did not
    assert padded.backend.k_cache[:, :, n + 8:rows].abs().sum() > 0
    assert plain.backend.k_cache[:, :, n + 8:rows].abs().sum() == 0
    # after a cached prefix: only the new tokens are prefilled, padded, masked by position
    got = greedy(padded, second, 8)
    assert padded.last_cached_tokens == len(first)
    assert got == reference(smollm2, second, 8)


@pytest.mark.parametrize('max_context', [8, 64, 256, 2048, 2049, 3000, 8256])
def test_every_padded_row_count_is_warmed_and_fits(max_context):
    warmed = prefill_shapes.gemm_rows(max_context)
    assert warmed == sorted(set(warmed)) and all(m <= max_context for m in warmed)
    for start in (0, 1, 100, max_context // 2):
        for n in range(1, max_context - start):
            rows = prefill_shapes.rows(n, start, max_context)
            assert n <= rows < n + 64 and start + rows <= max_context
            assert rows == n or rows in warmed
            if start + n + 63 < max_context:  # room for any padding: always padded
                assert rows in warmed


@pytest.mark.parametrize('weights', ['bf16', 'int8'])
def test_warming_runs_every_row_count_and_changes_nothing(tiny, weights):
    backend = FusedBackend(tiny.model, 300, use_triton=False, weights=weights)
    ids = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(3))
    backend.pad_rows = True
    before = backend.prefill(ids, 0).clone()
    assert backend.warm_prefill_shapes() == list(range(16, 289, 16))
    assert backend.attention_buckets == frozenset()  # cuDNN's plans: CUDA only
    assert torch.equal(backend.prefill(ids, 0), before)
    backend.pad_rows = False  # nothing to warm
    assert backend.warm_prefill_shapes() == []
    short = FusedBackend(tiny.model, 8, use_triton=False, weights=weights)
    short.pad_rows = True  # a cache shorter than one step pads nothing
    assert short.warm_prefill_shapes() == []


@pytest.mark.parametrize('use_triton', [False, True])
@pytest.mark.parametrize('n, rows', [(37, 37), (37, 64), (200, 256)])
def test_attention_at_a_bucket_of_rows_is_causal_attention(tiny, use_triton, n, rows):
    """The bucket's queries written token-major (rope's kernel on the Triton path), its keys
    the cache's first rows, another prompt's (or inf) past this one: the logits of SDPA's own
    attention."""
    from torch.nn.attention import SDPBackend
    backend = FusedBackend(tiny.model, 256, use_triton=use_triton)
    ids = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(n))
    expected = backend.prefill(ids, 0).clone()
    stale = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(1))
    backend.prefill(stale, 0)  # keys and values past n from another prompt
    backend.v_cache[:, :, n:].fill_(float('inf'))  # even non-finite ones do not reach it
    got = backend._torch_forward(ids, 0, attend=prefill_shapes.Bucket(rows, (SDPBackend.MATH,)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('max_context', [513, 600, 2113, 4097, 8256])
def test_every_long_fresh_prefill_has_a_bucket_that_start_up_plans(max_context):
    buckets = prefill_shapes.attention_buckets(max_context)
    assert buckets == sorted(set(buckets)) and buckets[-1] <= max_context
    for rows in range(prefill_shapes.CAPTURED_UP_TO + 1, max_context + 1):
        bucket = prefill_shapes.attention_rows(rows, max_context)
        step = 256 if rows <= 4096 else 512
        assert bucket in buckets and rows <= bucket < rows + step


def test_which_attention_a_prefill_takes():
    planned = frozenset({768, 2048, 2113})
    assert prefill_shapes.attention(0, 512, 2113, planned) is None  # as the captured graphs
    assert prefill_shapes.attention(100, 2000, 2113, planned) is None  # masked by position
    assert prefill_shapes.attention(0, 1000, 2113, planned) is prefill_shapes._ahead_of_time
    assert prefill_shapes.attention(0, 2000, 2113, planned).rows == 2048
    assert prefill_shapes.attention(0, 2100, 2113, planned).rows == 2113  # the whole cache
