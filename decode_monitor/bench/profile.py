"""Decode-step anatomy: a few steps under torch.profiler, time by kernel class and idle gaps.

On a GPU the events are the device's kernels, copies and fills; on a CPU they are the leaf aten
operators. Either way: busy time is the union of the event intervals, idle time is the rest of
the span from the first event's start to the last event's end (on a GPU: the device waiting for
the host to launch the next kernel, the gap CUDA graphs close).
"""
import re

CLASSES = ('gemm', 'attention', 'norm', 'elementwise', 'copy', 'other')
CLASS_LABELS = {'gemm': 'GEMV/GEMM', 'attention': 'attention', 'norm': 'norm/reduce',
                'elementwise': 'elementwise', 'copy': 'copy', 'other': 'other'}

# First match wins: attention kernels are often cutlass-based, so attention comes before gemm.
_RULES = (
    ('copy', re.compile(r'memcpy|memset|copy|scatter|index_put|catarraybatched|(^|::)cat$')),
    ('attention', re.compile(r'flash|fmha|attention|attn|sdpa|softmax')),
    ('gemm', re.compile(r'gemm|gemv|cutlass|cublas|xmma|nvjet|matmul|splitk|hmma|'
                        r'(^|::)(mm|addmm|bmm|baddbmm|linear)$')),
    ('norm', re.compile(r'norm(?!al)|reduce|(^|::)(mean|sum|var|argmax|max)$')),
    ('elementwise', re.compile(r'elementwise|vectorized|pointwise|unrolled|triton_poi|silu|gelu|'
                               r'(^|::)(mul|add|sub|div|rsqrt|pow|neg|where|sin|cos|exp|fill_|'
                               r'arange|normal_|embedding|index_select|to|_to_copy)$|'
                               r'functor|index|fill|distribution')),
)


def classify(name):
    """Kernel (or aten operator) name -> one of CLASSES."""
    lowered = name.lower()
    for label, pattern in _RULES:
        if pattern.search(lowered):
            return label
    return 'other'


def merge_intervals(intervals):
    """Sorted, non-overlapping union of (start, end) intervals."""
    merged = []
    for start, end in sorted(intervals):
        if end < start:
            raise ValueError(f'interval ends before it starts: ({start}, {end})')
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(iv) for iv in merged]


def anatomy(events, steps=1, top=8, self_times=None):
    """events: (name, start_us, end_us) -> per-step time by class, busy and idle (ms).

    Busy time is a union, so overlapping kernels (two streams) are not counted twice; the
    per-class sums are of event durations and can add up to more than busy time.
    self_times: (name, self_us) to attribute by class instead of the events' durations (nested
    CPU operators: the span comes from the outermost ones, the attribution from self time).
    """
    if not events:
        raise ValueError('the profile holds no events')
    if steps < 1:
        raise ValueError('steps must be >= 1')
    per_class = dict.fromkeys(CLASSES, 0.0)
    per_name = {}
    if self_times is None:
        self_times = [(name, end - start) for name, start, end in events]
    for name, duration in self_times:
        per_class[classify(name)] += duration
        total, count = per_name.get(name, (0.0, 0))
        per_name[name] = (total + duration, count + 1)
    merged = merge_intervals([(s, e) for _, s, e in events])
    span = merged[-1][1] - merged[0][0]
    busy = sum(e - s for s, e in merged)
    gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
    scale = 1e-3 / steps  # us -> ms per step
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        'steps': steps,
        'events_per_step': len(events) / steps,
        'span_ms': span * scale,
        'busy_ms': busy * scale,
        'idle_ms': (span - busy) * scale,
        'idle_fraction': (span - busy) / span if span > 0 else 0.0,
        'gaps_per_step': len(gaps) / steps,
        'largest_gap_ms': max(gaps) * 1e-3 if gaps else 0.0,
        'by_class_ms': {k: v * scale for k, v in per_class.items()},
        'top': [{'name': n, 'class': classify(n), 'ms_per_step': t * scale,
                 'calls_per_step': c / steps} for n, (t, c) in ranked],
    }


def device_events(prof, device_type):
    """The profiled work as (events, self_times).

    GPU: every kernel, copy and fill on the device (self_times None: a kernel's duration is its
    own). CPU: the outermost aten operators give the intervals; every operator's self time
    gives the attribution by class.
    """
    from torch.autograd import DeviceType
    if device_type == 'cuda':
        events = [(e.name, float(e.time_range.start), float(e.time_range.end))
                  for e in prof.events() if e.device_type == DeviceType.CUDA]
        return events, None
    ops = [e for e in prof.events()
           if e.device_type == DeviceType.CPU and e.name.startswith('aten::')]
    outer = [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in ops
             if e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')]
    return outer, [(e.name, float(e.self_cpu_time_total)) for e in ops]


def profile_steps(decoder, pos, steps, warmup=3, trace_path=None):
    """Warm up at `pos`, then run `steps` greedy decode steps under torch.profiler.

    trace_path: also write the profile there as a Chrome trace (gzipped when it ends in .gz),
    the events on their time axis (the kernel-timeline figure reads it).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = decoder.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    decoder.time_steps(pos, 0, warmup)  # randomised cache, warm kernels, caches and clocks
    if cuda:
        torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=activities) as prof:
        for _ in range(steps):
            # One decode step exactly as time_steps runs it (graph replay or eager forward).
            decoder.step()
        if cuda:
            torch.cuda.synchronize()
    if trace_path is not None:
        prof.export_chrome_trace(trace_path)
    events, self_times = device_events(prof, 'cuda' if cuda else 'cpu')
    result = anatomy(events, steps, self_times=self_times)
    result['source'] = 'gpu kernels' if cuda else 'cpu operators'
    return result
