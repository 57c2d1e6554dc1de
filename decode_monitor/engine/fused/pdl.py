"""Programmatic dependent launch (Hopper and later): overlap a kernel's launch with the last one.

A decode step is ~160 short kernels in a row; each one's CTAs are normally scheduled only after
the previous kernel has fully drained. Launched with PDL, a kernel's CTAs may become resident
while the previous kernel's last wave still runs, and wait there (`griddepcontrol.wait`) until
it has completed and its writes are visible. Every fused kernel waits before touching anything
but its constant inputs, so the step computes exactly what it computes without PDL; only the
launch and scheduling latency overlap. Kernels that are not ours (embedding row, sampling) are
launched without it and keep plain stream order.

Off by default: measured on an H100 (benchmarks/NOTES.md) it did not shorten the graphed step,
whose launch gaps are already ~0.03 ms, and with the trigger before the wait it made the
quantised steps slower. DECODE_MONITOR_PDL=1 turns it on, for the next experiment: prefetching
each GEMV's first weight tiles before the wait, which is where the gain would be.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def await_previous_kernel(PDL: tl.constexpr):
    """Wait for the previous kernel to complete, then let the next one start launching.

    Triggering only after the wait keeps at most one kernel's CTAs waiting ahead of the one that
    runs; triggering first let a chain of waiting kernels take SM slots.
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def enabled(device):
    """PDL for kernels on this device: CUDA, compute capability >= 9, not the interpreter."""
    device = torch.device(device)
    return _enabled(device.type, device.index)


@functools.lru_cache(maxsize=None)  # asked at every launch; eager mode pays for each call
def _enabled(device_type, index):
    if os.environ.get('DECODE_MONITOR_PDL', '0') != '1' or os.environ.get('TRITON_INTERPRET'):
        return False
    return device_type == 'cuda' and torch.cuda.get_device_capability(index)[0] >= 9


def launch_args(device):
    """Keyword arguments of a fused kernel's launch: the PDL constexpr, and the launch attribute
    where PDL is on."""
    return {'PDL': True, 'launch_pdl': True} if enabled(device) else {'PDL': False}
