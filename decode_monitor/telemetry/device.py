"""Which device decodes, what names it in diagnostics, and which telemetry reads it.

`hardware_id` is the GPU's UUID wherever one is known: from NVML, else from the decoding
device itself (the caller passes torch's device properties, so this package stays free of
torch), else the module's name (a Jetson without NVML), else 'cpu'. A decoder on CUDA is
therefore never reported as 'cpu' because NVML is missing.

`select_telemetry` picks the reader: NVML where it answers, else the Jetson's sysfs and
tegrastats, else an unavailable NVML reader that carries both reasons.
"""
from dataclasses import dataclass
import shutil

from decode_monitor.telemetry.gpu import GpuTelemetry
from decode_monitor.telemetry.jetson import JetsonTelemetry
from decode_monitor.telemetry.tegrastats import TegrastatsReader

TEGRASTATS = ('tegrastats', '--interval', '1000')


@dataclass(frozen=True)
class DeviceIdentity:
    kind: str  # 'cuda' | 'cpu'
    index: int = None
    name: str = None
    uuid: str = None  # NVML's spelling: 'GPU-' + the 128-bit UUID in hex groups

    @classmethod
    def from_torch(cls, device, properties=None):
        """device: a torch.device (or 'cpu' / 'cuda:N'); properties: what
        torch.cuda.get_device_properties(device) returned, for a CUDA device."""
        if isinstance(device, str):
            kind, _, number = device.partition(':')
            index = int(number) if number else None
        else:
            kind, index = device.type, device.index
        if kind != 'cuda' or properties is None:
            return cls(kind)
        uuid = getattr(properties, 'uuid', None)
        uuid = None if uuid is None else str(uuid)
        if uuid and not uuid.startswith('GPU-'):
            uuid = 'GPU-' + uuid
        return cls(kind, 0 if index is None else index, getattr(properties, 'name', None), uuid)

    @property
    def label(self):
        if self.kind != 'cuda':
            return self.kind
        return self.uuid or f'{self.name or "CUDA device"} (cuda:{self.index})'


def hardware_id(telemetry, device=None):
    """telemetry: GpuTelemetry or JetsonTelemetry; device: DeviceIdentity or None (unknown)."""
    if device is not None and device.kind != 'cuda':
        return device.kind
    if telemetry.available and telemetry.uuid:
        return telemetry.uuid
    if device is not None:
        return device.label
    if telemetry.available and telemetry.name:
        return telemetry.name
    return 'cpu'


def select_telemetry(index=0, nvml=None, root='/', tegrastats_command=TEGRASTATS):
    """NVML's reader if it answers, else the Jetson's, else NVML's (unavailable, both reasons).

    root: where the Jetson reader finds /proc and /sys. On a Jetson, `tegrastats_command` is
    started (when its program is on PATH) to fill what sysfs does not give a non-root reader;
    None starts nothing. Call `close()` on the result when done: it stops tegrastats.
    """
    nv = GpuTelemetry(index, nvml=nvml)
    if nv.available:
        return nv
    jetson = JetsonTelemetry(root=root)
    if jetson.available:
        if tegrastats_command and shutil.which(tegrastats_command[0]):
            try:
                jetson.tegrastats = TegrastatsReader(tegrastats_command).start()
            except OSError as exc:
                jetson.reason = f'tegrastats not started: {exc}'
        return jetson
    nv.reason = f'{nv.reason}; {jetson.reason}'
    return nv
