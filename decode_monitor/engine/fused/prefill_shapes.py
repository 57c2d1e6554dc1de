"""The eager prefill's shapes: a bounded set, each one run once at start-up.

The first eager prefill at a prompt length the process had not run before cost 30-60 ms more
than the next one at that length, and a robot's prompts seldom repeat a length. Two causes:
- attention: cuDNN's attention, SDPA's choice on an H200, builds an execution plan the first
  time it sees a sequence length (tens of ms), and once planned it is the fastest (about
  twice flash attention's speed at 2048-8192 tokens on an H200). So an eager prefill from
  position 0 longer than the captured short prefills attends at a bucket of rows (`Bucket`,
  `attention_rows()`: a multiple of 256 up to 4096 tokens, of 512 beyond), each bucket
  planned once at start-up (`warm_attention()`), and keeps the real rows.
  Where cuDNN cannot run (another GPU, no cuDNN attention) such prefills take flash
  attention, which is compiled ahead and takes any length at once. The captured short
  prefills (prefill_graphs.py), whose lengths are fixed, and eager prefills of those lengths
  keep SDPA's own choice (the same kernels in both modes). After a cached prefix (a mask by
  position) SDPA's own choice stays.
- GEMMs: the first time cuBLAS runs one of its kernels it costs a few ms, and which kernel it
  runs depends on M, the prefill's row count (dozens of kernels over M = 16..2200 for one
  matrix). So an eager prefill pads its rows up to a multiple of a step (`rows()`: 16 up to
  2048 tokens, 64 beyond: at most 15 or 63 extra rows) and `warm_gemms()` runs the four layer
  matrices at every such M once, at start-up. int4 MLP matrices of short prompts go through
  the GEMM on their codes (qgemm.py), a Triton kernel compiled per tile config: warming runs it
  too, so the first eager prompt of 17-128 tokens compiles nothing.
The caching allocator's growth and CUDA's lazy module loading were measured too: neither costs.
Warming the GEMMs (and the decoder's WARM_PREFILL prefills) takes about 0.8 s on an H200 for
qwen2.5-7b at max_context 8256, less for a shorter cache (the GEMMs scale with M); each of
cuDNN's plans adds tens of ms, one per attention bucket up to max_context.

The padding is exact: the padded tokens come after the prompt, so no real token attends to them
(causal from position 0; masked by position after a cached prefix); they write K/V past the
prompt, at positions that no query reads before a decode step writes them again; the logits
are the last real token's. Rows that would run past max_context are not padded.
Measurements: benchmarks/NOTES.md ("H200: time to first token").
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from decode_monitor.engine.fused.prefill import quant_linear, reads_codes
from decode_monitor.engine.fused.prefill_graphs import FRESH
from decode_monitor.engine.fused.quant import QuantWeight

FINE_STEP, COARSE_STEP, FINE_UP_TO = 16, 64, 2048
ATTENTION_FINE_STEP, ATTENTION_COARSE_STEP, ATTENTION_FINE_UP_TO = 256, 512, 4096
CAPTURED_UP_TO = FRESH[-1]  # the longest prompt a captured prefill serves


def attention_rows(rows, max_context):
    """The bucket a fresh eager prefill of `rows` attends at (cuDNN plans once per bucket): a
    multiple of 256 up to 4096, of 512 beyond, or max_context where that is less. The padding
    costs the causal attention at most (1 + step / rows)^2 of its time: large just past the
    captured lengths, where attention is a small share of the prefill, and small from a few
    thousand tokens on, where cuDNN's margin over flash attention is about 2x."""
    step = ATTENTION_FINE_STEP if rows <= ATTENTION_FINE_UP_TO else ATTENTION_COARSE_STEP
    return min(-(-rows // step) * step, max_context)


def attention_buckets(max_context):
    """Every bucket a fresh eager prefill past the captured lengths can attend at."""
    return sorted({attention_rows(r, max_context)
                   for r in range(CAPTURED_UP_TO + 1, max_context + 1)})


class Bucket(NamedTuple):
    """Causal GQA attention at `rows` query and key rows, by the given SDPA backends.

    prefill.torch_forward writes a prompt's T queries into the first T rows of a token-major
    (rows, Hq, D) buffer, passed as its (1, Hq, rows, D) view, and the cache's first `rows`
    keys and values: those past T zeroed, and no real query sees them (causal); the other
    rows of the output are dropped. So a bucket's shapes and strides are the same
    for every prompt it serves, and cuDNN's plan for them is made once."""
    rows: int
    backends: tuple

    def __call__(self, q, k, v, scale):
        return _causal(q, k, v, scale, self.backends)


def _causal(q, k, v, scale, backends):
    """Causal GQA attention by the given SDPA backends only."""
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(list(backends)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=True)


def _cudnn(rows):
    from torch.nn.attention import SDPBackend
    return Bucket(rows, (SDPBackend.CUDNN_ATTENTION,))


def _ahead_of_time(q, k, v, scale):
    """Causal attention by the SDPA backends compiled ahead of time (flash first)."""
    from torch.nn.attention import SDPBackend
    return _causal(q, k, v, scale, (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                    SDPBackend.MATH))


def attention(start, rows, max_context, planned):
    """How an eager prefill of `rows` written at `start` attends: None for SDPA's own choice
    (after a cached prefix, and up to the captured lengths, as the captured graphs do, so
    that an eager and a graph decoder prefill a prompt with the same kernels and give the
    same tokens); else cuDNN at its bucket where start-up planned it (`planned`, from
    warm_attention), flash attention otherwise."""
    if start != 0 or rows <= CAPTURED_UP_TO:
        return None
    bucket = attention_rows(rows, max_context)
    return _cudnn(bucket) if bucket in planned else _ahead_of_time


@torch.no_grad()
def warm_attention(backend):
    """Plan cuDNN's attention at every bucket of attention_buckets(backend.max_context), with
    the prefill's shapes and strides (the cache's own keys); the buckets planned (none where
    cuDNN's attention does not run: those prefills take flash attention)."""
    if backend.device.type != 'cuda':
        return frozenset()
    planned, buckets = set(), attention_buckets(backend.max_context)
    if not buckets:
        return frozenset()
    # token-major queries: a slice of the largest bucket has every bucket's strides
    queries = torch.zeros((buckets[-1], backend.q_heads, backend.head_dim), dtype=backend.dtype,
                          device=backend.device)
    for rows in buckets:
        q = queries[:rows].transpose(0, 1)[None]
        keys, values = backend.k_cache[0, None, :, :rows], backend.v_cache[0, None, :, :rows]
        try:
            _cudnn(rows)(q, keys, values, backend.scale)
        except RuntimeError:  # no cuDNN attention for these shapes or on this GPU
            break
        planned.add(rows)
    return frozenset(planned)


def rows(n, start, max_context):
    """The rows an eager prefill of n tokens written at start.. runs: n rounded up to its
    step, or n itself where the padded rows would not fit in the cache."""
    step = FINE_STEP if n <= FINE_UP_TO else COARSE_STEP
    padded = -(-n // step) * step
    return padded if start + padded <= max_context else n


def gemm_rows(max_context):
    """Every padded row count a prefill can run in a cache of max_context positions."""
    fine = range(FINE_STEP, min(FINE_UP_TO, max_context) + 1, FINE_STEP)
    return list(fine) + list(range(FINE_UP_TO + COARSE_STEP, max_context + 1, COARSE_STEP))


@torch.no_grad()
def warm_gemms(backend, matrices, biases, mlp):
    """Run each of `matrices` (layer 0's, as the prefill multiplies them; `mlp` flags gate/up
    and down) at every row count of gemm_rows(backend.max_context), on zeros: cuBLAS then has
    every kernel a prefill can pick loaded, and the GEMM on int4 codes (qgemm.py) every
    variant compiled. A quantised matrix is multiplied as the prefill does: on its codes where
    `prefill.reads_codes`, else dense, a scratch matrix of its shape standing in for the
    buffer. Returns the row counts run."""
    dtype, device = backend.dtype, backend.device
    counts = gemm_rows(backend.max_context)
    if not counts:  # a cache shorter than one step: nothing is padded
        return counts
    shapes = [w.shape for w in matrices]
    quantised = [s for w, s in zip(matrices, shapes) if isinstance(w, QuantWeight)]
    scratch = torch.zeros(max((n * k for n, k in quantised), default=0), dtype=dtype,
                          device=device)
    inputs = {k: torch.zeros((counts[-1], k), dtype=dtype, device=device)
              for _, k in shapes}
    for m in counts:
        for w, (n, k), bias, is_mlp in zip(matrices, shapes, biases, mlp):
            if reads_codes(backend, w, m, is_mlp):
                quant_linear(backend, inputs[k][:m], w, bias, mlp=True)
                continue
            if isinstance(w, QuantWeight):
                w = scratch[:n * k].view(n, k)
            F.linear(inputs[k][:m], w, bias)
    del scratch, inputs
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # hold no more memory than serving itself has needed
    return counts
