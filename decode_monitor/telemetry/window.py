"""A sliding window of decode steps and the statistics diagnostics report from it."""
from collections import deque
from dataclasses import dataclass
import threading

import numpy as np


@dataclass(frozen=True)
class StepRecord:
    step_ms: float
    pos: int
    bytes_moved: int


@dataclass(frozen=True)
class WindowStats:
    steps: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    tokens_per_s: float
    context: int  # position of the most recent step
    bytes_per_step: float  # mean over the window
    floor_ms: float  # at the peak bandwidth, mean over the window
    fraction_of_peak: float  # achieved fraction of the floor, peak bandwidth
    fraction_of_measured: float  # same against the measured copy bandwidth (None if unknown)


class StepWindow:
    """Thread-safe: the decode thread appends, the diagnostics timer reads."""

    def __init__(self, size=512):
        self._records = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0  # steps added since start: a count that only grows

    def add(self, step_ms, pos, bytes_moved):
        with self._lock:
            self._records.append(StepRecord(step_ms, pos, bytes_moved))
            self.total += 1

    def __len__(self):
        with self._lock:
            return len(self._records)

    def stats(self, peak_bandwidth, measured_bandwidth=None):
        """None when no step has been recorded; bandwidths in bytes/s."""
        with self._lock:
            records = list(self._records)
        if not records:
            return None
        ms = np.array([r.step_ms for r in records], dtype=float)
        moved = np.array([r.bytes_moved for r in records], dtype=float)
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        floor_ms = moved / peak_bandwidth * 1e3
        # Achieved fraction of the window = total floor time / total measured time.
        fraction_peak = float(floor_ms.sum() / ms.sum())
        fraction_measured = None
        if measured_bandwidth:
            fraction_measured = float((moved / measured_bandwidth * 1e3).sum() / ms.sum())
        return WindowStats(
            steps=len(records), p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
            max_ms=float(ms.max()), tokens_per_s=float(1e3 / ms.mean()),
            context=records[-1].pos, bytes_per_step=float(moved.mean()),
            floor_ms=float(floor_ms.mean()), fraction_of_peak=fraction_peak,
            fraction_of_measured=fraction_measured)
