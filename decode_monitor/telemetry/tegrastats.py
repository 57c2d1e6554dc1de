"""tegrastats, the Jetson's own monitor: one line parsed into a typed reading, and a reader
that runs it and keeps the newest line.

The line's format (JetPack 5 and 6 put a date first; earlier releases do not), e.g. on an
AGX Orin and an Orin Nano:

    04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB)
    CPU [0%@729,...] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C
    CPU@44.562C ... tj@44.343C VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW ...
    RAM 3162/7620MB (lfb 8x4MB) ... EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] ... gpu@46.093C
    tj@47.437C VDD_IN 4621mW/4621mW VDD_CPU_GPU_CV 564mW/564mW VDD_SOC 1371mW/1371mW

GR3D_FREQ is the GPU: its load relative to the current clock, then the clock in MHz (one
per GPC in brackets on Orin); EMC_FREQ is the memory controller the same way (some
releases leave out the percentage or the clock). `NAME@TC` is a temperature sensor, -256C
one that is off; `NAME cur mW/avg mW` a power rail, NC an unconnected channel.
"""
from dataclasses import dataclass, field
import re
import subprocess
import threading
import time

_ENGINE = re.compile(r'\b(EMC_FREQ|GR3D_FREQ)\s+(?:(\d+)%)?(?:@\[?([\d,]+)\]?)?')
_TEMP = re.compile(r'(?<![\w%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b')
_RAIL = re.compile(r'\b([A-Z][A-Z0-9_]*)\s+(\d+)mW/(\d+)mW')
_RAM = re.compile(r'\bRAM (\d+)/(\d+)MB')
_SENSOR_OFF_C = -256.0


@dataclass(frozen=True)
class TegrastatsReading:
    gpu_load_percent: float = None
    gpu_clock_mhz: float = None  # the fastest GPC's clock
    emc_load_percent: float = None
    emc_clock_mhz: float = None
    temperatures_c: dict = field(default_factory=dict)  # sensors that are on
    rails_mw: dict = field(default_factory=dict)  # instantaneous, connected rails only
    ram_used_mb: int = None
    ram_total_mb: int = None


def parse_tegrastats(line):
    """One tegrastats line -> TegrastatsReading; ValueError if it holds none of its fields."""
    engines = {}
    for name, load, clocks in _ENGINE.findall(line):
        mhz = [float(c) for c in clocks.split(',') if c] if clocks else []
        engines[name] = (float(load) if load else None, max(mhz) if mhz else None)
    temps = {name: float(t) for name, t in _TEMP.findall(line) if float(t) != _SENSOR_OFF_C}
    rails = {name: float(cur) for name, cur, _avg in _RAIL.findall(line) if name != 'NC'}
    ram = _RAM.search(line)
    if not (engines or temps or rails or ram):
        raise ValueError(f'not a tegrastats line: {line.strip()[:80]!r}')
    gpu_load, gpu_mhz = engines.get('GR3D_FREQ', (None, None))
    emc_load, emc_mhz = engines.get('EMC_FREQ', (None, None))
    return TegrastatsReading(
        gpu_load_percent=gpu_load, gpu_clock_mhz=gpu_mhz, emc_load_percent=emc_load,
        emc_clock_mhz=emc_mhz, temperatures_c=temps, rails_mw=rails,
        ram_used_mb=int(ram.group(1)) if ram else None,
        ram_total_mb=int(ram.group(2)) if ram else None)


class TegrastatsReader:
    """Runs `command` (tegrastats by default) and keeps its newest parsed line.

    A line that does not parse is counted and its error kept; the reader goes on. `latest`
    is None until the first good line and after `max_age_s` without one (tegrastats stopped
    printing), so a stale reading is never shown as live.
    """

    def __init__(self, command=('tegrastats', '--interval', '1000'), max_age_s=5.0,
                 clock=time.monotonic):
        self.command = list(command)
        self.max_age_s = max_age_s
        self.bad_lines = 0
        self.last_error = None
        self._clock = clock
        self._latest = None
        self._at = None
        self._lock = threading.Lock()
        self._proc = None
        self._thread = None

    def start(self):
        """Starts the command; FileNotFoundError if it is not installed."""
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, name='tegrastats', daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            if not line.strip():
                continue
            try:
                reading = parse_tegrastats(line)
            except ValueError as exc:
                self.bad_lines += 1
                self.last_error = str(exc)
                continue
            with self._lock:
                self._latest, self._at = reading, self._clock()

    @property
    def latest(self):
        with self._lock:
            if self._latest is None or self._clock() - self._at > self.max_age_s:
                return None
            return self._latest

    def stop(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
