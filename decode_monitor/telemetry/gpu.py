"""GPU readings through NVML; every field says "unavailable" rather than failing.

NVML is optional: on a CPU machine, or where the driver library is missing, `GpuTelemetry`
reports `available = False` and the reason, and every reading is None. The NVML module is a
constructor argument (default: `pynvml`), so the decoding of its answers (throttle masks, the
peak-bandwidth formula, the process listing) runs in tests against a stand-in with the same
functions, and the node can hand a Jetson reader the same interface (see `device.py`).

The other processes on the GPU are listed from NVML's compute and graphics process tables,
with their share of the SMs from `nvmlDeviceGetProcessUtilization` (the driver's per-process
samples since the previous listing). This process is left out by pid; inside a container
without the host's pid namespace NVML reports host pids, which this process cannot recognise
as its own, so there it may list itself.
"""
from dataclasses import dataclass, field
import os

_THROTTLE_NAMES = {
    0x1: 'gpu_idle', 0x2: 'applications_clocks', 0x4: 'sw_power_cap', 0x8: 'hw_slowdown',
    0x10: 'sync_boost', 0x20: 'sw_thermal', 0x40: 'hw_thermal', 0x80: 'hw_power_brake',
    0x100: 'display_clocks',
}
# Reasons that mean the GPU ran slower than it could (idle and sync boost are benign).
# under_voltage and over_current are the Jetson's over-current/under-voltage throttle events.
PERFORMANCE_THROTTLES = {'sw_power_cap', 'hw_slowdown', 'sw_thermal', 'hw_thermal',
                         'hw_power_brake', 'under_voltage', 'over_current'}


@dataclass(frozen=True)
class GpuProcess:
    """Another process with a context on the GPU. None where the driver does not say."""

    pid: int
    name: str = None
    used_memory_bytes: int = None
    sm_percent: float = None  # mean SM utilisation of its samples since the last listing


@dataclass
class GpuSample:
    sm_clock_mhz: float = None
    mem_clock_mhz: float = None  # on a Jetson: the EMC (memory controller) clock
    temperature_c: float = None
    power_w: float = None  # board power (NVML); on a Jetson the GPU rail
    energy_j: float = None  # cumulative since driver load
    throttle_reasons: list = field(default_factory=list)
    gpu_load_percent: float = None
    temperatures_c: dict = field(default_factory=dict)  # every sensor by name (Jetson)
    rails_w: dict = field(default_factory=dict)  # every power rail by name (Jetson)

    @property
    def throttled(self):
        return bool(PERFORMANCE_THROTTLES.intersection(self.throttle_reasons))


def decode_throttle_reasons(mask):
    """Names of the bits set in NVML's clocks-event (throttle) reason mask, lowest bit first."""
    return [name for bit, name in sorted(_THROTTLE_NAMES.items()) if mask & bit]


def peak_bandwidth(max_mem_clock_mhz, bus_width_bits):
    """Bytes/s from the maximum memory clock and the bus width: two transfers a clock (DDR)."""
    return max_mem_clock_mhz * 1e6 * bus_width_bits * 2 / 8


class GpuTelemetry:
    peak_source = 'NVML'

    def __init__(self, index=0, nvml=None, own_pids=None):
        self.available = False
        self.reason = None
        self.name = None
        self.uuid = None
        self.driver = None
        self.peak_bandwidth = None  # bytes/s from the max memory clock and bus width
        self._own_pids = set(own_pids) if own_pids is not None else _own_pids()
        self._util_seen_us = 0  # timestamp of the newest process-utilisation sample read
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            self._nvml = nvml
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self.name = _text(nvml.nvmlDeviceGetName(self._handle))
            self.uuid = _text(nvml.nvmlDeviceGetUUID(self._handle))
            self.driver = _text(nvml.nvmlSystemGetDriverVersion())
            self.available = True
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.reason = f'NVML unavailable: {type(exc).__name__}: {exc}'.strip().rstrip(':')
            return
        try:
            clock = nvml.nvmlDeviceGetMaxClockInfo(self._handle, nvml.NVML_CLOCK_MEM)
            bus_bits = nvml.nvmlDeviceGetMemoryBusWidth(self._handle)
            self.peak_bandwidth = peak_bandwidth(clock, bus_bits)
        except Exception as exc:
            self.reason = f'peak bandwidth unavailable from NVML: {exc}'

    def sample(self):
        if not self.available:
            return GpuSample()
        nv, h = self._nvml, self._handle
        out = GpuSample()
        out.sm_clock_mhz = _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        out.mem_clock_mhz = _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM))
        out.temperature_c = _try(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        power_mw = _try(lambda: nv.nvmlDeviceGetPowerUsage(h))
        out.power_w = None if power_mw is None else power_mw / 1e3
        energy_mj = _try(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h))
        out.energy_j = None if energy_mj is None else energy_mj / 1e3
        rates = _try(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        out.gpu_load_percent = None if rates is None else float(rates.gpu)
        mask = _try(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h))
        if mask is None:
            mask = _try(lambda: nv.nvmlDeviceGetCurrentClocksThrottleReasons(h))
        out.throttle_reasons = decode_throttle_reasons(mask or 0)
        return out

    def close(self):
        if self.available:
            _try(self._nvml.nvmlShutdown)

    def processes(self):
        """The other processes on this GPU (this one left out), by pid; [] without NVML."""
        if not self.available:
            return []
        nv, h = self._nvml, self._handle
        memory = {}
        for table in ('nvmlDeviceGetComputeRunningProcesses',
                      'nvmlDeviceGetGraphicsRunningProcesses'):
            for proc in _try(lambda: getattr(nv, table)(h)) or []:
                if proc.pid in self._own_pids:
                    continue
                used = getattr(proc, 'usedGpuMemory', None)
                memory[proc.pid] = used if memory.get(proc.pid) is None else memory[proc.pid]
        shares = self._sm_shares()
        return [GpuProcess(pid, self._process_name(pid), memory[pid], shares.get(pid))
                for pid in sorted(memory)]

    def _sm_shares(self):
        """pid -> mean SM utilisation (%) over the driver's samples newer than the last read."""
        samples = _try(lambda: self._nvml.nvmlDeviceGetProcessUtilization(
            self._handle, self._util_seen_us)) or []  # NVML raises NotFound when there are none
        per_pid = {}
        for s in samples:
            per_pid.setdefault(s.pid, []).append(s.smUtil)
        self._util_seen_us = max([self._util_seen_us] + [s.timeStamp for s in samples])
        return {pid: sum(v) / len(v) for pid, v in per_pid.items()}

    def _process_name(self, pid):
        name = _try(lambda: _text(self._nvml.nvmlSystemGetProcessName(pid)))
        if name:
            return os.path.basename(name)
        try:
            with open(f'/proc/{pid}/comm') as f:
                return f.read().strip() or None
        except OSError:
            return None


def _own_pids():
    """This process's pid in every pid namespace /proc shows (NSpid), so a listing read from
    outside a nested namespace still recognises it."""
    pids = {os.getpid()}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('NSpid:'):
                    pids.update(int(p) for p in line.split()[1:])
    except (OSError, ValueError):
        pass
    return pids


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _try(read):
    try:
        return read()
    except Exception:
        return None
