"""The copy probe (the measured-bandwidth denominator): sized to the device, sane, and it gives
its buffers back (on a unified-memory GPU they are system RAM)."""
import pytest
import torch

from decode_monitor.engine import floor


def _rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096


def test_probe_result_is_sane_and_its_buffers_are_released():
    torch.rand(16)  # torch's own first allocations stay out of the comparison
    before = _rss()
    probe = floor.copy_probe('cpu', size_mib=64, repeats=5, warmup_s=0.05)
    after = _rss()
    assert probe.buffer_bytes == 64 * 2**20
    assert len(probe.times_s) == 5 and probe.warmup_copies >= 2
    assert all(t > 0 for t in probe.times_s)
    median = sorted(probe.times_s)[2]
    assert probe.bandwidth == pytest.approx(2 * 64 * 2**20 / median)
    assert 1e8 < probe.bandwidth < 1e13  # between 0.1 GB/s and 10 TB/s
    assert 0 <= probe.spread
    # two 64 MiB buffers were live; what stays is far less than one
    assert after - before < 16 * 2**20, (before, after)


def test_probe_size_follows_free_memory_within_bounds():
    size = floor.probe_buffer_bytes('cpu')
    free = floor._free_bytes(torch.device('cpu'))
    assert size % 4096 == 0
    assert size <= floor.PROBE_MAX_BYTES['cpu']
    assert size <= free * floor.PROBE_FREE_FRACTION + 4096
    assert size >= min(floor.PROBE_MAX_BYTES['cpu'], free // 64)  # not needlessly small


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_probe_gives_its_memory_back():
    torch.cuda.init()
    reserved = torch.cuda.memory_reserved()
    probe = floor.copy_probe('cuda')
    assert torch.cuda.memory_reserved() == reserved
    assert probe.bandwidth > 1e10
