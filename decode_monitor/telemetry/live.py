"""What the diagnostics tick adds to a GPU sample: energy per token, and whether a slower step
is the GPU being shared with other processes.

Energy per token: where the GPU has a cumulative energy counter (NVML's total energy
consumption), J/token = (energy now - energy at the oldest reading of the last `window_s`)
/ (steps now - steps then). It is the whole GPU's energy over that window, so it includes
idle time between requests and any other process's work on the same GPU; None when no step
was decoded in the window or the GPU has no counter.

Shared GPU: processes on one GPU take turns (time-slicing between their contexts), so a
co-runner lengthens every step even though nothing in this process changed. The rule, per
diagnostics tick, on the window's step statistics:

    normalised step = window p50 (ms) / mean bytes moved per step

(per byte, so the step's growth with the context length is not taken for sharing);
`baseline` = the smallest normalised step of any window of at least `min_steps` steps read
while no other process was on the GPU. WARN "GPU shared with N processes" when N > 0 other
processes are on the GPU and the window's normalised step is over `ratio` (1.15) x baseline.
Without a baseline (the GPU was shared since start-up) there is nothing to compare with and
the decode status says so in its values, not its level. 1.15 sits well above the spread of a
healthy window's p50 and below the slowdown a co-running copy loop causes (docs/colocation.md).
"""
from collections import deque
from dataclasses import dataclass, field
import time

from decode_monitor.telemetry.gpu import GpuSample


@dataclass(frozen=True)
class Sharing:
    others: int = 0  # other processes on the GPU now
    slowdown: float = None  # normalised step / baseline; None without both
    warn: bool = False
    message: str = None


class ShareWatch:
    def __init__(self, ratio=1.15, min_steps=32):
        self.ratio = ratio
        self.min_steps = min_steps
        self.baseline = None  # ms per byte, best window alone

    def update(self, stats, others):
        """stats: WindowStats or None; others: how many other processes are on the GPU."""
        step = None
        if stats is not None and stats.steps >= self.min_steps and stats.bytes_per_step > 0:
            step = stats.p50_ms / stats.bytes_per_step
        if step is not None and others == 0:
            self.baseline = step if self.baseline is None else min(self.baseline, step)
        if step is None or self.baseline is None:
            return Sharing(others)
        slowdown = step / self.baseline
        if others and slowdown > self.ratio:
            noun = 'process' if others == 1 else 'processes'
            return Sharing(others, slowdown, True,
                           f'GPU shared with {others} {noun}: step {slowdown:.2f}x '
                           f'its time alone')
        return Sharing(others, slowdown)


class EnergyMeter:
    def __init__(self, window_s=10.0):
        self.window_s = window_s
        self._readings = deque()  # (time s, energy J, steps)

    def update(self, now, energy_j, steps):
        """J/token over the readings of the last window_s; None without energy or steps."""
        if energy_j is None or steps is None:
            self._readings.clear()
            return None
        if self._readings and (energy_j < self._readings[-1][1] or steps < self._readings[-1][2]):
            self._readings.clear()  # counter reset (driver reload) or step count restarted
        self._readings.append((now, energy_j, steps))
        while len(self._readings) > 2 and now - self._readings[1][0] >= self.window_s:
            self._readings.popleft()
        t0, e0, s0 = self._readings[0]
        if steps == s0:
            return None
        return (energy_j - e0) / (steps - s0)


@dataclass(frozen=True)
class LiveReading:
    sample: GpuSample
    processes: list = field(default_factory=list)  # GpuProcess, this process left out
    joules_per_token: float = None
    sharing: Sharing = Sharing()


class LiveTelemetry:
    """One `read` per diagnostics tick: the GPU sample, its co-runners, J/token, sharing."""

    def __init__(self, telemetry, ratio=1.15, min_steps=32, energy_window_s=10.0,
                 clock=time.monotonic):
        self.telemetry = telemetry
        self.share = ShareWatch(ratio, min_steps)
        self.energy = EnergyMeter(energy_window_s)
        self._clock = clock

    def reset(self):
        """Forget the baseline alone and the energy readings: call when another model, backend
        or weight format is loaded (its time per byte is not the old one's)."""
        self.share.baseline = None
        self.energy.update(self._clock(), None, None)

    def read(self, stats, steps_total):
        """stats: the step window's WindowStats (or None); steps_total: steps decoded since
        start, a count that only grows."""
        sample = self.telemetry.sample()
        processes = self.telemetry.processes()
        return LiveReading(
            sample=sample, processes=processes,
            joules_per_token=self.energy.update(self._clock(), sample.energy_j, steps_total),
            sharing=self.share.update(stats, len(processes)))
