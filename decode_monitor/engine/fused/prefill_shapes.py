"""The eager prefill's shapes: a bounded set, each one run once at start-up.

The first prefill at a prompt length the process had not run before cost tens of ms more than
the next one (benchmarks/NOTES.md, "H200: time to first token"), in two parts:
- attention: SDPA's preferred backend on the GPU, cuDNN's attention, builds an execution plan
  for each new sequence length. Flash and memory-efficient attention are compiled ahead and
  take any length at once, so the prefill ranks them first (`attention()`); cuDNN stays as the
  fallback for inputs neither takes.
- GEMMs: cuBLAS loads a kernel the first time it runs it, and which kernel it runs depends on
  M, the prefill's row count. So an eager prefill pads its rows up to a multiple of a step
  (`rows()`: 16 up to 2048 tokens, 64 beyond: at most 15 or 63 extra rows, a few % of a
  prefill), and `warm_gemms()` runs the four layer matrices at every such M once, at start-up.
The padding is exact: the padded tokens come after the prompt, so no real token attends to them
(causal from position 0; masked by position after a cached prefix); they write K/V past the
prompt, at positions that no query reads before a decode step writes them again; the logits
are the last real token's. Rows that would run past max_context are not padded.

The measured causes, and what warming costs at start-up: benchmarks/NOTES.md.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from decode_monitor.engine.fused.quant import QuantWeight

FINE_STEP, COARSE_STEP, FINE_UP_TO = 16, 64, 2048


def attention(device):
    """A context in which SDPA prefers kernels compiled ahead of time (CUDA only)."""
    if device.type != 'cuda':
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH], set_priority=True)


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
def warm_gemms(backend, matrices, biases):
    """Run each of `matrices` (layer 0's, as the prefill multiplies them) at every row count
    of gemm_rows(backend.max_context), on zeros: cuBLAS then has every kernel a prefill can
    pick loaded. A quantised matrix is multiplied dense, as the prefill does: a scratch
    matrix of its shape stands in. Returns the row counts run."""
    dtype, device = backend.dtype, backend.device
    counts = gemm_rows(backend.max_context)
    shapes = [w.shape for w in matrices]
    quantised = [s for w, s in zip(matrices, shapes) if isinstance(w, QuantWeight)]
    scratch = torch.zeros(max((n * k for n, k in quantised), default=0), dtype=dtype,
                          device=device)
    inputs = {k: torch.zeros((counts[-1], k), dtype=dtype, device=device)
              for _, k in shapes}
    for m in counts:
        for w, (n, k), bias in zip(matrices, shapes, biases):
            if isinstance(w, QuantWeight):
                w = scratch[:n * k].view(n, k)
            F.linear(inputs[k][:m], w, bias)
    del scratch, inputs
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # hold no more memory than serving itself has needed
    return counts
