"""Token sampling that runs on the device and can be captured in a CUDA graph.

Parameters live in device tensors (`SamplingState`), so one captured graph serves every request.
Randomness comes from a counter-based hash of (seed, position, token id): no generator state, the
same tokens on any device for the same seed, and nothing for graph capture to trip over.
"""
from dataclasses import dataclass

import torch

_MASK24 = (1 << 24) - 1
# splitmix64 constants, written as signed int64 (torch has no uint64 arithmetic on every device)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int = 0

    @property
    def greedy(self):
        return self.temperature <= 0.0


class SamplingState:
    """Device-resident copies of SamplingParams, updated in place between requests."""

    def __init__(self, device):
        self.temperature = torch.ones(1, device=device)
        self.top_p = torch.ones(1, device=device)
        self.top_k = torch.zeros(1, dtype=torch.long, device=device)
        self.seed = torch.zeros(1, dtype=torch.long, device=device)

    def load(self, params):
        self.temperature.fill_(max(params.temperature, 1e-6))
        self.top_p.fill_(params.top_p)
        self.top_k.fill_(params.top_k)
        self.seed.fill_(params.seed)


def _logical_shift(z, bits):
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seed, pos, n):
    """n values in (0, 1), a pure function of (seed, pos, index)."""
    z = torch.arange(n, device=seed.device) + (seed * _GOLDEN + pos * 0x632BE59BD9B4E019)
    z = (z ^ _logical_shift(z, 30)) * _MIX1
    z = (z ^ _logical_shift(z, 27)) * _MIX2
    z = z ^ _logical_shift(z, 31)
    return ((_logical_shift(z, 40) & _MASK24).float() + 0.5) / float(1 << 24)


def sample_greedy(logits):
    """logits: (1, vocab) -> (1, 1) token ids."""
    return logits.argmax(dim=-1, keepdim=True)


def sample_stochastic(logits, state, pos):
    """Temperature, then top-k, then top-p (nucleus), then a Gumbel-max draw; (1, 1) ids."""
    scaled = logits.float() / state.temperature
    # stable: tied logits must sort the same way every run, or a seed would not fix the tokens
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # (1, vocab)
    vocab = sorted_logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(state.top_k > 0, state.top_k, vocab)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (rank < k) & (mass_before < state.top_p)
    keep[..., 0] = True  # the most likely token always survives
    # noise belongs to token ids, not ranks, so the draw does not depend on the sort order
    gumbel = -torch.log(-torch.log(uniform_noise(state.seed, pos, vocab)))[order]
    choice = torch.where(keep, sorted_logits + gumbel, float('-inf')).argmax(dim=-1, keepdim=True)
    return order.gather(-1, choice)
