"""The eager prefill's shapes: a bounded set, each one run once at start-up.

The first eager prefill at a prompt length the process had not run before cost 30-60 ms more
than the next one at that length, and a robot's prompts seldom repeat a length. Two causes:
- attention: cuDNN's attention, SDPA's choice on an H200, builds an execution plan the first
  time it sees a sequence length (about 40 ms). Flash attention is compiled ahead and takes any
  length at once, so an eager prefill from position 0 longer than the captured short prefills
  runs without cuDNN (`attention()`). It is slower once warm (twice cuDNN's time at 8000
  tokens); the captured short prefills (prefill_graphs.py), whose lengths are fixed, and eager
  prefills of those lengths keep cuDNN (the same kernels in both modes). After a cached
  prefix (a mask by position) SDPA's own choice stays: flash takes no mask.
- GEMMs: the first time cuBLAS runs one of its kernels it costs a few ms, and which kernel it
  runs depends on M, the prefill's row count (dozens of kernels over M = 16..2200 for one
  matrix). So an eager prefill pads its rows up to a multiple of a step (`rows()`: 16 up to
  2048 tokens, 64 beyond: at most 15 or 63 extra rows) and `warm_gemms()` runs the four layer
  matrices at every such M once, at start-up. int4 MLP matrices of short prompts go through
  the GEMM on their codes (qgemm.py), a Triton kernel compiled per tile config: warming runs it
  too, so the first eager prompt of 17-128 tokens compiles nothing.
The caching allocator's growth and CUDA's lazy module loading were measured too: neither costs.
Warming (this and the decoder's WARM_PREFILL prefills) takes about 0.8 s on an H200 for
qwen2.5-7b at max_context 8256, less for a shorter cache (the GEMMs scale with M).

The padding is exact: the padded tokens come after the prompt, so no real token attends to them
(causal from position 0; masked by position after a cached prefix); they write K/V past the
prompt, at positions that no query reads before a decode step writes them again; the logits
are the last real token's. Rows that would run past max_context are not padded.
Measurements: benchmarks/NOTES.md ("H200: time to first token").
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from decode_monitor.engine.fused.prefill import quant_linear, reads_codes
from decode_monitor.engine.fused.prefill_graphs import FRESH
from decode_monitor.engine.fused.quant import QuantWeight

FINE_STEP, COARSE_STEP, FINE_UP_TO = 16, 64, 2048
CAPTURED_UP_TO = FRESH[-1]  # the longest prompt a captured prefill serves


def attention(start, rows):
    """The SDPA backends an eager prefill of `rows` written at `start` may use: from position 0
    (SDPA's own causal mask) and past the captured lengths (CAPTURED_UP_TO), those compiled
    ahead of time, whatever the length. Up to the captured lengths SDPA's own choice, as in the
    captured graphs, so that an eager decoder and a graph decoder prefill a prompt with the same
    kernels and give the same tokens (an eager decoder pays cuDNN's plan at a new length there);
    after a cached prefix (a mask by position, which flash attention does not take) SDPA's own
    choice. Only the enabled flags change, and they are restored on exit: SDPA's priority
    order is left alone."""
    if start != 0 or rows <= CAPTURED_UP_TO:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


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
