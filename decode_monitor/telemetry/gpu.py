"""GPU readings through NVML; every field says "unavailable" rather than failing.

NVML is optional: on a CPU machine, or where the driver library is missing, `GpuTelemetry`
reports `available = False` and the reason, and every reading is None.
"""
from dataclasses import dataclass, field

_THROTTLE_NAMES = {
    0x1: 'gpu_idle', 0x2: 'applications_clocks', 0x4: 'sw_power_cap', 0x8: 'hw_slowdown',
    0x10: 'sync_boost', 0x20: 'sw_thermal', 0x40: 'hw_thermal', 0x80: 'hw_power_brake',
    0x100: 'display_clocks',
}
# Reasons that mean the GPU ran slower than it could (idle and sync boost are benign).
PERFORMANCE_THROTTLES = {'sw_power_cap', 'hw_slowdown', 'sw_thermal', 'hw_thermal',
                         'hw_power_brake'}


@dataclass
class GpuSample:
    sm_clock_mhz: float = None
    mem_clock_mhz: float = None
    temperature_c: float = None
    power_w: float = None
    energy_j: float = None  # cumulative since driver load
    throttle_reasons: list = field(default_factory=list)

    @property
    def throttled(self):
        return bool(PERFORMANCE_THROTTLES.intersection(self.throttle_reasons))


def decode_throttle_reasons(mask):
    return [name for bit, name in sorted(_THROTTLE_NAMES.items()) if mask & bit]


class GpuTelemetry:
    def __init__(self, index=0):
        self.available = False
        self.reason = None
        self.name = None
        self.uuid = None
        self.driver = None
        self.peak_bandwidth = None  # bytes/s from the max memory clock and bus width
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self.uuid = _text(pynvml.nvmlDeviceGetUUID(self._handle))
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
            self.available = True
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.reason = f'NVML unavailable: {type(exc).__name__}: {exc}'.strip().rstrip(':')
            return
        try:
            clock = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_MEM)
            bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(self._handle)
            self.peak_bandwidth = clock * 1e6 * bus_bits * 2 / 8  # DDR: two transfers a clock
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
        mask = _try(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h))
        if mask is None:
            mask = _try(lambda: nv.nvmlDeviceGetCurrentClocksThrottleReasons(h))
        out.throttle_reasons = decode_throttle_reasons(mask or 0)
        return out


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _try(read):
    try:
        return read()
    except Exception:
        return None
