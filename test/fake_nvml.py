"""A stand-in for the pynvml module: the functions GpuTelemetry calls, answering from fields a
test sets, and raising as NVML does where NVML raises (no samples, unsupported query)."""
from types import SimpleNamespace


class NVMLError(Exception):
    pass


class FakeNvml:
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 2, 0

    def __init__(self, max_mem_clock_mhz=2619, bus_width_bits=5120, init_error=None):
        self.init_error = init_error
        self.max_mem_clock_mhz = max_mem_clock_mhz
        self.bus_width_bits = bus_width_bits
        self.clocks = {self.NVML_CLOCK_SM: 1980, self.NVML_CLOCK_MEM: 2619}
        self.power_mw = 412_345
        self.energy_mj = 1_000_000
        self.load = 97
        self.event_mask = 0
        self.event_api = True  # False: an older driver with only the throttle-reasons call
        self.compute = []  # SimpleNamespace(pid, usedGpuMemory)
        self.graphics = []
        self.util_samples = []  # SimpleNamespace(pid, timeStamp, smUtil)
        self.names = {}  # pid -> bytes, as NVML returns it

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self):
        self.initialised = False

    def nvmlDeviceGetHandleByIndex(self, index):
        return ('handle', index)

    def nvmlDeviceGetName(self, h):
        return b'NVIDIA H100 80GB HBM3'

    def nvmlDeviceGetUUID(self, h):
        return 'GPU-0f6d2a8e-1c1b-4c5e-9f3e-7a1d2b3c4d5e'

    def nvmlSystemGetDriverVersion(self):
        return '580.159.04'

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_MEM
        return self.max_mem_clock_mhz

    def nvmlDeviceGetMemoryBusWidth(self, h):
        return self.bus_width_bits

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self.clocks[clock]

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 51

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.energy_mj

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.load, memory=60)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        if not self.event_api:
            raise AttributeError('nvmlDeviceGetCurrentClocksEventReasons')
        return self.event_mask

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self.event_mask

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return list(self.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return list(self.graphics)

    def nvmlDeviceGetProcessUtilization(self, h, last_seen_us):
        newer = [s for s in self.util_samples if s.timeStamp > last_seen_us]
        if not newer:
            raise NVMLError('Not Found')
        return newer

    def nvmlSystemGetProcessName(self, pid):
        if pid not in self.names:
            raise NVMLError('Not Found')
        return self.names[pid]


def proc(pid, used=None):
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def util(pid, ts, sm):
    return SimpleNamespace(pid=pid, timeStamp=ts, smUtil=sm, memUtil=0)
