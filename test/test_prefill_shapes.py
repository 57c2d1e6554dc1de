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
    assert torch.equal(backend.prefill(ids, 0), before)
    backend.pad_rows = False  # nothing to warm
    assert backend.warm_prefill_shapes() == []
    short = FusedBackend(tiny.model, 8, use_triton=False, weights=weights)
    short.pad_rows = True  # a cache shorter than one step pads nothing
    assert short.warm_prefill_shapes() == []
