"""The bench's prompt_tokens axis: grid key and flag, TTFT rows from real sessions on the CPU
(the quick grid), and the floor's FLOP count against torch's own FLOP counter."""
import json
import os
import subprocess
import sys

import pytest
import torch

from decode_monitor.bench import grid as G
from decode_monitor.bench import ttft

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_prompt_tokens_is_a_grid_key_and_a_flag():
    quick = G.load('quick')
    assert quick.prompt_tokens == ()  # no TTFT cells unless asked for
    assert G.with_overrides(quick, prompt_tokens=[128, 2048]).prompt_tokens == (128, 2048)
    with pytest.raises(G.GridError, match=r'prompt_tokens\[1\]: expected a positive integer'):
        G.with_overrides(quick, prompt_tokens=[128, 0])
    with pytest.raises(G.GridError, match='prompt_tokens: expected a list without duplicates'):
        G.with_overrides(quick, prompt_tokens=[64, 64])


@pytest.mark.parametrize('start', [0, 5, 23])
def test_the_flop_count_is_what_torch_counts(tiny, start):
    """One new token attends to every key, so its count is exact against torch's FLOP counter
    (the fused torch path computes attention as one matmul per head); several new tokens are
    counted as the single steps they replace (causal), not as a full rectangle."""
    from torch.utils.flop_counter import FlopCounterMode
    from decode_monitor.engine.decoder import Decoder
    backend = Decoder(tiny, mode='eager', backend='fused', max_context=64).backend
    config = tiny.config
    if start:
        backend.prefill(torch.randint(0, 100, (1, start)), 0)
    with FlopCounterMode(display=False) as counter:
        backend.prefill(torch.randint(0, 100, (1, 8)), start)
    # the matmuls of the layers and lm_head, as torch counts them
    assert counter.get_total_flops() == (ttft.prefill_flops(config, start, 8)
                                         - ttft.attention_flops(config, start, 8))
    per_key = ttft.attention_flops(config, 0, 1)
    assert ttft.attention_flops(config, start, 1) == (start + 1) * per_key
    assert ttft.attention_flops(config, start, 8) == sum(
        ttft.attention_flops(config, start + t, 1) for t in range(8))
    assert ttft.peak_flops('cpu', None, 'float32') is None
    assert ttft.peak_flops('cuda', 'NVIDIA H200', 'float32') is None  # a bf16 rate only


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_ttft')
    cmd = [sys.executable, '-m', 'decode_monitor.bench', '--grid', 'quick', '--device', 'cpu',
           '--contexts', '32', '--modes', 'eager', '--sessions', '1', '--prompt-tokens', '16',
           '96', '--no-progress', '-o', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / 'results.json') as f:
        return out, json.load(f)


def test_ttft_rows_fresh_and_cached(run):
    out, results = run
    rows = results['ttft']
    assert results['grid']['prompt_tokens'] == [16, 96]
    cases = sorted((r['prompt_tokens'], r['cached_tokens']) for r in rows)
    new = ttft.NEW_AFTER_PREFIX
    assert cases == sorted([(16, 0), (96, 0), (16 + new, 16), (96 + new, 96)])
    for r in rows:
        assert r['status'] == 'ok', r
        assert (r['model'], r['backend'], r['mode'], r['weights']) == ('tiny', 'hf', 'eager',
                                                                       'bf16')
        assert len(r['ttft_ms_all']) == ttft.REPEATS and r['ttft_ms'] > 0
        assert r['compute_floor_ms'] is None and 'FLOP floor unknown' in r['floor_bound']
        assert r['bandwidth_source'] == 'copy'
        assert r['floor_ms'] == r['memory_floor_ms'] > 0
        assert r['fraction_of_floor'] == pytest.approx(r['floor_ms'] / r['ttft_ms'])
    by_case = {(r['prompt_tokens'], r['cached_tokens']): r for r in rows}
    # the cached case moves the same weights and more K/V than the fresh prefix alone
    assert by_case[(96 + new, 96)]['bytes'] > by_case[(96, 0)]['bytes']
    report = (out / 'report.md').read_text()
    assert '## Time to first token (prompt_tokens)' in report
    assert '| tiny | hf | eager | bf16 | 160 | 96 |' in report
