"""Programmatic dependent launch (Hopper and later): overlap a kernel's launch with the last one.

A decode step is ~170 short kernels in a row; each one's CTAs are normally scheduled only after
the previous kernel has fully drained. Launched with PDL, a kernel's CTAs may become resident
while the previous kernel's last programs still run, and wait there (`griddepcontrol.wait`)
until it has completed and its writes are visible. Every fused kernel waits before touching
anything but its constant inputs, so the step computes exactly what it computes without PDL;
only the launch and scheduling latency overlap. Kernels that are not ours (embedding row,
sampling) are launched without it and keep plain stream order.

When the next kernel may start launching matters. The GEMVs allow it only once their programs
have streamed their weights (`allow_next_kernel` after the K loop): allowed at the top, the next
kernel's waiting CTAs took SM slots from the GEMV's own later programs, and the int8 step got
slower (3.16 -> 3.30 ms on an H100, qwen2.5-7b, 2048); allowed after the loop, both formats got
faster (bf16 5.14 -> 5.06 ms, int8 3.16 -> 3.11; benchmarks/NOTES.md, row 22). What a kernel
may do before its wait is read constant inputs: the quantised GEMVs request their first chunk of
weights there (dequant.quant_dot; row 27). On by default where the GPU has it;
DECODE_MONITOR_PDL=0 turns it off.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Block until the previous kernel has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def allow_next_kernel(PDL: tl.constexpr):
    """Let the next kernel's CTAs start launching (they still wait for this one to finish)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def await_previous_kernel(PDL: tl.constexpr):
    """Both at once, for kernels too short for the difference to matter (attention)."""
    wait_for_previous_kernel(PDL)
    allow_next_kernel(PDL)


def enabled(device):
    """PDL for kernels on this device: CUDA, compute capability >= 9, not the interpreter."""
    device = torch.device(device)
    return _enabled(device.type, device.index)


@functools.lru_cache(maxsize=None)  # asked at every launch; eager mode pays for each call
def _enabled(device_type, index):
    if os.environ.get('DECODE_MONITOR_PDL', '1') != '1' or os.environ.get('TRITON_INTERPRET'):
        return False
    return device_type == 'cuda' and torch.cuda.get_device_capability(index)[0] >= 9


def launch_args(device):
    """Keyword arguments of a fused kernel's launch: the PDL constexpr, and the launch attribute
    where PDL is on."""
    return {'PDL': True, 'launch_pdl': True} if enabled(device) else {'PDL': False}
