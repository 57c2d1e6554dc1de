"""Weight-only quantisation of the fused backend's matrices: int8 and int4, group-wise along K.

A batch-1 step streams every weight once, so its time is bytes over bandwidth: storing a matrix
in 8 or 4 bits cuts the step's traffic to about a half or a quarter. The kernels dequantise in
registers, right after the load, so the bytes saved are bytes never read.

- int8, symmetric: w ~ q * s, q in [-127, 127] (int8), one scale s per group of G weights of a
  row.
- int4, asymmetric: w ~ q * s + m, q in [0, 15], one scale s and one offset m (the group's
  minimum) per group; two weights per byte, stored in *lanes*: a group's G codes fill G / 8
  32-bit words, and nibble i (bits 4i..4i+3) of word c holds weight c + i G / 8. The kernels
  load whole words and take lane i out with one mask (dequant.py), and the weights of a lane
  meet a contiguous slice of x.

Scales and offsets are stored in the model's dtype and rounded *before* q is chosen, so q is the
best code for the scale the kernel will actually use. (A checkpoint that arrives quantised keeps
its own scales and codes: engine/checkpoints.py; the kernels read scales and offsets of any
float dtype.) Groups run along K inside one row, so any
row slice (the q/k/v and gate/up parts of a packed matrix) quantises and dequantises alone.
"""
from dataclasses import dataclass

import torch

from decode_monitor.engine.fused.configs import FORMATS  # noqa: F401  (bf16: not quantised)

GROUP_SIZES = (128, 64, 32)


def group_size_for(k):
    """The largest supported group size dividing K (128 for every study model)."""
    for group in GROUP_SIZES:
        if k % group == 0:
            return group
    raise ValueError(f'no quantisation group size in {GROUP_SIZES} divides K = {k}')


@dataclass
class QuantWeight:
    """A quantised (N, K) matrix; `q` is (N, K) int8 or (N, K / 2) uint8 (int4 pairs)."""

    fmt: str
    q: torch.Tensor
    scale: torch.Tensor  # (N, K / group), the model's dtype
    offset: torch.Tensor  # int4: (N, K / group); int8: None
    group: int

    @property
    def shape(self):
        n = self.q.shape[0]
        return (n, self.q.shape[1] * (2 if self.fmt == 'int4' else 1))

    @property
    def nbytes(self):
        tensors = [self.q, self.scale] + ([self.offset] if self.offset is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def codes(self):
        """(N, K) codes in weight order: int8 in [-127, 127], or uint8 in [0, 15] for int4."""
        if self.fmt == 'int8':
            return self.q
        n, k = self.shape
        pairs = self.q.view(n, k // self.group, self.group // 8, 4)  # (.., word, byte)
        lanes = torch.stack((pairs & 15, pairs >> 4), dim=-1).flatten(-2)  # (.., word, lane)
        return lanes.transpose(-1, -2).reshape(n, k)

    def dequantize(self, dtype=None):
        """The (N, K) matrix the kernels multiply by, in `dtype` (default: the scales')."""
        dtype = dtype or self.scale.dtype
        s = self.scale.float().repeat_interleave(self.group, dim=1)  # (N, K)
        codes = self.codes().float()
        if self.fmt == 'int8':
            return (codes * s).to(dtype)
        m = self.offset.float().repeat_interleave(self.group, dim=1)
        return (codes * s + m).to(dtype)


def _to_lanes(codes, group):
    """(N, K) int4 codes -> stored order: word c of a group holds weights c + i G / 8, i < 8."""
    n, k = codes.shape
    return codes.view(n, k // group, 8, group // 8).transpose(-1, -2).reshape(n, k)


def quantize(w, fmt, group=None):
    """Quantise an (N, K) matrix to `fmt` ('int8' or 'int4') with groups of `group` along K."""
    if fmt not in ('int8', 'int4'):
        raise ValueError(f'quantize: format must be int8 or int4, not {fmt!r}')
    n, k = w.shape
    group = group or group_size_for(k)
    if k % group:
        raise ValueError(f'quantize: K = {k} is not a multiple of the group size {group}')
    dtype = w.dtype
    wg = w.detach().float().view(n, k // group, group)
    if fmt == 'int8':
        scale = (wg.abs().amax(dim=-1) / 127).to(dtype)  # rounded as stored
        s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        q = torch.round(wg / s).clamp_(-127, 127).to(torch.int8).view(n, k)
        return QuantWeight('int8', q.contiguous(), scale.contiguous(), None, group)
    scale, offset, codes = _int4_best_range(wg, dtype)
    return QuantWeight('int4', pack_int4(codes.view(n, k), group), scale.contiguous(),
                       offset.contiguous(), group)


def pack_int4(codes, group):
    """(N, K) int4 codes in weight order (uint8, 0-15) -> the stored (N, K / 2) uint8 pairs."""
    n, k = codes.shape
    lanes = _to_lanes(codes, group).view(n, k // 2, 2)
    return (lanes[..., 0] | (lanes[..., 1] << 4)).contiguous()  # lane 2j: low nibble of byte j


def cat_rows(weights):
    """The rows of several QuantWeights of one format and group size, as one (q/k/v, gate/up)."""
    first = weights[0]
    if any(w.fmt != first.fmt or w.group != first.group for w in weights):
        raise ValueError('cat_rows: the matrices differ in format or group size')
    offset = None if first.offset is None else torch.cat([w.offset for w in weights])
    return QuantWeight(first.fmt, torch.cat([w.q for w in weights]),
                       torch.cat([w.scale for w in weights]), offset, first.group)


# Fractions of each group's [min, max] range tried for int4. With 16 levels, giving up the
# extremes of a group buys a finer step for everything else; per group, the range with the least
# squared error wins (min/max itself is the first candidate, so it never gets worse).
INT4_RANGE_SHRINK = tuple(1.0 - 0.02 * i for i in range(13))


def _int4_codes(wg, lo, hi, dtype):
    offset = lo.to(dtype)
    scale = ((hi - offset.float()) / 15).to(dtype)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    codes = torch.round((wg - offset.float()[..., None]) / s).clamp_(0, 15)
    error = (codes * scale.float()[..., None] + offset.float()[..., None] - wg).square().sum(-1)
    return scale, offset, codes, error


def _int4_best_range(wg, dtype):
    """Scale, offset and codes (uint8) per group of wg (N, groups, G), least squared error."""
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    mid = (lo + hi) / 2
    best = _int4_codes(wg, lo, hi, dtype)
    for shrink in INT4_RANGE_SHRINK[1:]:
        cand = _int4_codes(wg, mid + (lo - mid) * shrink, mid + (hi - mid) * shrink, dtype)
        better = cand[3] < best[3]
        best = tuple(torch.where(better[..., None] if c.dim() == 3 else better, c, b)
                     for c, b in zip(cand, best))
    scale, offset, codes, _ = best
    return scale, offset, codes.to(torch.uint8)


def weight_nbytes(w):
    """Bytes a step reads for a weight: a dense tensor or a QuantWeight."""
    if isinstance(w, QuantWeight):
        return w.nbytes
    return w.numel() * w.element_size()


def dense(w, dtype=None):
    """The dense matrix of a weight, for the torch path (dequantised when quantised)."""
    if isinstance(w, QuantWeight):
        return w.dequantize(dtype)
    return w
