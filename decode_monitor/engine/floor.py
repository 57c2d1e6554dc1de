"""The analytic memory floor: bytes a batch-1 decode step must move, over memory bandwidth."""
from dataclasses import dataclass
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
    """bytes_per_step(pos) = weights + K/V of the valid prefix + the new K/V written."""

    weight_bytes: int
    kv_bytes_per_token: int  # layers x 2 (K and V) x kv_heads x head_dim x element size

    @classmethod
    def for_model(cls, model, kv_dtype=None):
        config = model.config
        head_dim = getattr(config, 'head_dim', None) or (
            config.hidden_size // config.num_attention_heads)
        elem = torch.empty(0, dtype=kv_dtype or model.dtype).element_size()
        kv = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * elem
        return cls(weight_bytes_per_step(model), kv)

    def bytes_per_step(self, pos):
        """Bytes moved by the step that writes position `pos` (attending to pos + 1 tokens)."""
        return self.weight_bytes + self.kv_bytes_per_token * (pos + 1)

    def floor_ms(self, pos, bandwidth_bytes_per_s):
        return self.bytes_per_step(pos) / bandwidth_bytes_per_s * 1e3


def measure_copy_bandwidth(device, size_mib=1024, repeats=10):
    """Achievable bandwidth in bytes/s of a large device-to-device copy (read + write counted)."""
    device = torch.device(device)
    if device.type == 'cpu':
        size_mib = min(size_mib, 256)
    numel = size_mib * 2**20 // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults and allocator work stay out of the number
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]
