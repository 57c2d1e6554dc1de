"""The analytic memory floor: bytes a decode step must move, over memory bandwidth.

A step of b sequences reads the weights once and the K/V of every sequence: batching shares the
weight traffic, never the cache's.
"""
from dataclasses import dataclass
import os
import time

import torch


def weight_bytes_per_step(model):
    """Bytes of weights one step reads: every parameter, the input embedding as a single row.

    A tied lm_head is the embedding table read in full, so it is counted once, in full.
    """
    embedding = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    # parameters() yields a shared (tied) tensor once
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if embedding is not lm_head:
        row = embedding.shape[1] * embedding.element_size()
        total -= embedding.numel() * embedding.element_size() - row
    return total


@dataclass(frozen=True)
class FloorModel:
    """bytes_per_step(pos) = weights + batch x (K/V of the valid prefix + the new K/V written).

    Every sequence of a batch sits at the same position (a step at context ctx per sequence).
    """

    weight_bytes: int
    kv_bytes_per_token: int  # of one sequence: layers x 2 (K, V) x kv_heads x head_dim x elem
    batch: int = 1

    @classmethod
    def for_model(cls, model, kv_dtype=None, batch=1):
        config = model.config
        head_dim = getattr(config, 'head_dim', None) or (
            config.hidden_size // config.num_attention_heads)
        elem = torch.empty(0, dtype=kv_dtype or model.dtype).element_size()
        kv = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * elem
        return cls(weight_bytes_per_step(model), kv, batch)

    def bytes_per_step(self, pos):
        """Bytes moved by the step that writes position `pos` of each sequence (each attending
        to pos + 1 tokens)."""
        return self.weight_bytes + self.batch * self.kv_bytes_per_token * (pos + 1)

    def floor_ms(self, pos, bandwidth_bytes_per_s):
        return self.bytes_per_step(pos) / bandwidth_bytes_per_s * 1e3


# The copy probe: the achievable bandwidth that "% of floor (measured bw)" divides by. Its
# buffers are a small share of free memory (a unified-memory GPU's memory is system RAM), large
# enough to stream past the caches, and the copies run long enough beforehand for the clocks to
# leave idle: a probe of a few milliseconds from a cold start moved with the clock ramp.
PROBE_FREE_FRACTION = 1 / 32  # of free memory, for each of the two buffers
PROBE_MAX_BYTES = {'cuda': 512 * 2**20, 'cpu': 128 * 2**20}
PROBE_MIN_CACHE_MULTIPLE = 4  # each buffer at least 4x the last-level cache, where memory allows
PROBE_WARMUP_S = 0.25
PROBE_REPEATS = {'cuda': 50, 'cpu': 10}


@dataclass(frozen=True)
class CopyProbe:
    """One probe: the median bandwidth in bytes/s (read + write counted) and what it rests on."""

    bandwidth: float
    buffer_bytes: int
    times_s: tuple  # every timed copy, in order
    warmup_copies: int

    @property
    def spread(self):
        """(slowest - fastest) / median time of the timed copies."""
        times = sorted(self.times_s)
        return (times[-1] - times[0]) / times[len(times) // 2]


def _free_bytes(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError):
        return None


def probe_buffer_bytes(device):
    """Bytes of each probe buffer on `device`: a share of free memory, bounded."""
    device = torch.device(device)
    cap = PROBE_MAX_BYTES.get(device.type, PROBE_MAX_BYTES['cpu'])
    free = _free_bytes(device)
    if free is None:
        return cap
    size = min(cap, int(free * PROBE_FREE_FRACTION))
    if device.type == 'cuda':  # small free memory: still past L2 where a quarter of it allows
        l2 = getattr(torch.cuda.get_device_properties(device), 'L2_cache_size', 0)
        size = max(size, min(PROBE_MIN_CACHE_MULTIPLE * l2, free // 4))
    return max(size // 4096 * 4096, 4096)


def copy_probe(device, size_mib=None, repeats=None, warmup_s=PROBE_WARMUP_S):
    """Time device-to-device copies between two buffers; the median gives the bandwidth.

    size_mib: each buffer's size (default: probe_buffer_bytes). The copies repeat for at least
    `warmup_s` before `repeats` timed ones (CUDA events on a GPU). The buffers are freed and, on
    CUDA, the allocator's cache emptied, so the memory goes back to the driver.
    """
    device = torch.device(device)
    cuda = device.type == 'cuda'
    nbytes = size_mib * 2**20 if size_mib else probe_buffer_bytes(device)
    repeats = repeats or PROBE_REPEATS.get(device.type, PROBE_REPEATS['cpu'])
    src = torch.rand(nbytes // 4, device=device)  # random data, never zeros
    dst = torch.empty_like(src)
    try:
        warmup = 0
        t0 = time.perf_counter()
        while warmup < 2 or time.perf_counter() - t0 < warmup_s:
            dst.copy_(src)
            if cuda:
                torch.cuda.synchronize(device)
            warmup += 1
        times = [_timed_copy(dst, src, cuda) for _ in range(repeats)]
        moved = 2 * src.numel() * src.element_size()
    finally:
        del src, dst
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    median = sorted(times)[len(times) // 2]
    return CopyProbe(moved / median, moved // 2, tuple(times), warmup)


def _timed_copy(dst, src, cuda):
    if not cuda:
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure_copy_bandwidth(device, size_mib=None, repeats=None):
    """Achievable bandwidth in bytes/s of a large device-to-device copy (read + write counted)."""
    return copy_probe(device, size_mib, repeats).bandwidth
