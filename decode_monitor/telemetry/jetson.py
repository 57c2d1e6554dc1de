"""GPU readings on a Jetson, where there is no NVML: sysfs first, tegrastats for the rest.

Same interface as `GpuTelemetry` (available, reason, name, uuid, driver, peak_bandwidth,
peak_source, sample(), processes()), so the node reads either the same way.

Where each reading comes from (paths under `root`, '/' on a device; the tests point it at
recorded trees of these files under test/fixtures/jetson/, written in the formats a Jetson
shows, not read from a device):

- module and peak bandwidth: /proc/device-tree/model, looked up in `MODULE_PEAK_GBPS`
  (the vendor's figure for each module's LPDDR5; the node's bandwidth override wins);
- GPU clock: /sys/class/devfreq/<gpu>/cur_freq (Hz), the devfreq device whose of_node is a
  Jetson GPU (ga10b on Orin); GPU load: its device's `load` (per mille);
- EMC clock: /sys/kernel/debug/bpmp/debug/clk/emc/rate (Hz, readable by root only), else
  devfreq `bwmgr` (Thor), else tegrastats' EMC_FREQ;
- temperatures: /sys/class/thermal/thermal_zone*/{type,temp} (millidegrees; a sensor that is
  off reads -256 C and is left out);
- power rails: the INA3221 monitors, /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/
  in<N>_label, in<N>_input (mV) and curr<N>_input (mA); NC channels, and the shunt-sum
  channel (a label without a current), are left out; the GPU's rail (VDD_GPU_SOC on AGX
  Orin, VDD_CPU_GPU_CV on Orin NX/Nano) is the sample's `power_w`;
- throttling: a thermal zone at or above a passive trip point ('sw_thermal'), and the
  soctherm over-current hwmon's event counters (oc1: 'under_voltage'; oc2, oc3:
  'over_current') rising since the previous sample;
- other GPU users: processes with the GPU's device nodes open (/proc/<pid>/fd -> /dev/nvgpu/
  or /dev/nvhost-*gpu*); there is no per-process memory or SM accounting to read.

With a started `TegrastatsReader` (`select_telemetry` starts one where tegrastats is installed),
its newest line fills whatever sysfs did not give.
"""
import glob
import os

from decode_monitor.telemetry.gpu import GpuProcess, GpuSample

# Substring of /proc/device-tree/model -> peak DRAM bandwidth (GB/s), most specific first.
MODULE_PEAK_GBPS = (('AGX Thor', 273.0), ('Thor', 273.0), ('AGX Orin', 204.8),
                    ('Orin NX', 102.4), ('Orin Nano', 68.0))
GPU_NODES = ('ga10b', 'gv11b', 'gp10b', 'gb10b', 'gpu')
GPU_RAILS = ('VDD_GPU_SOC', 'VDD_GPU', 'VDD_CPU_GPU_CV')
GPU_ZONES = ('gpu-thermal', 'GPU-therm', 'tj-thermal')
_OC_REASONS = {'oc1': 'under_voltage', 'oc2': 'over_current', 'oc3': 'over_current'}
_GPU_DEVICE_NODES = ('/dev/nvgpu/', '/dev/nvhost-gpu', '/dev/nvhost-ctrl-gpu',
                     '/dev/nvhost-as-gpu')


def module_peak_bandwidth(model):
    """Bytes/s for a /proc/device-tree/model string; None for a module not in the table."""
    for key, gbps in MODULE_PEAK_GBPS:
        if model and key.lower() in model.lower():
            return gbps * 1e9
    return None


class JetsonTelemetry:
    peak_source = 'Jetson module table'

    def __init__(self, root='/', tegrastats=None):
        self.root = root
        self.tegrastats = tegrastats
        self.uuid = None
        self.name = _read(self._path('proc/device-tree/model'))
        self.name = self.name.rstrip('\x00').strip() if self.name else None
        self.driver = _l4t_release(_read(self._path('etc/nv_tegra_release')))
        self.peak_bandwidth = module_peak_bandwidth(self.name)
        self._gpu_freq_dir = self._find_gpu_devfreq()
        self.available = bool(self.name and 'jetson' in self.name.lower()) or (
            bool(self.name) and self._gpu_freq_dir is not None)
        self.reason = None
        if not self.available:
            self.reason = ('not a Jetson: no /proc/device-tree/model' if not self.name else
                           f'not a Jetson: model {self.name!r} and no Jetson GPU in devfreq')
        elif self.peak_bandwidth is None:
            self.reason = f'peak bandwidth unknown for module {self.name!r}'
        self._oc_counts = self._read_oc_counts()

    def _path(self, rel):
        return os.path.join(self.root, rel)

    def _find_gpu_devfreq(self):
        for d in sorted(glob.glob(self._path('sys/class/devfreq/*'))):
            node = _read(os.path.join(d, 'device/of_node/name'))
            node = node.rstrip('\x00').strip() if node else os.path.basename(d).split('.')[-1]
            if node in GPU_NODES:
                return d
        return None

    def sample(self):
        if not self.available:
            return GpuSample()
        out = GpuSample()
        tegra = self.tegrastats.latest if self.tegrastats is not None else None
        if self._gpu_freq_dir:
            out.sm_clock_mhz = _scaled(self._gpu_freq_dir, 'cur_freq', 1e-6)
            for load in (os.path.join(self._gpu_freq_dir, 'device/load'),
                         self._path('sys/devices/platform/gpu.0/load'),
                         self._path('sys/devices/gpu.0/load')):
                value = _number(_read(load))
                if value is not None:
                    out.gpu_load_percent = value / 10
                    break
        for rate in (self._path('sys/kernel/debug/bpmp/debug/clk/emc/rate'),
                     self._path('sys/class/devfreq/bwmgr/cur_freq')):
            hz = _number(_read(rate))
            if hz is not None:
                out.mem_clock_mhz = hz / 1e6
                break
        zones, passive = self._thermal_zones()
        out.temperatures_c = zones
        out.rails_w = self._rails()
        if tegra is not None:
            out.sm_clock_mhz = _first(out.sm_clock_mhz, tegra.gpu_clock_mhz)
            out.gpu_load_percent = _first(out.gpu_load_percent, tegra.gpu_load_percent)
            out.mem_clock_mhz = _first(out.mem_clock_mhz, tegra.emc_clock_mhz)
            out.temperatures_c = out.temperatures_c or dict(tegra.temperatures_c)
            out.rails_w = out.rails_w or {k: v / 1e3 for k, v in tegra.rails_mw.items()}
        out.temperature_c = next((out.temperatures_c[z] for z in GPU_ZONES
                                  if z in out.temperatures_c), None)
        if out.temperature_c is None:  # tegrastats names: gpu@ / GPU@, tj@
            out.temperature_c = next((t for name, t in out.temperatures_c.items()
                                      if name.lower() in ('gpu', 'tj')), None)
        out.power_w = next((out.rails_w[r] for r in GPU_RAILS if r in out.rails_w), None)
        reasons = ['sw_thermal'] if passive else []
        counts = self._read_oc_counts()
        for name, count in sorted(counts.items()):
            before = self._oc_counts.get(name)
            if before is not None and count > before and _OC_REASONS[name] not in reasons:
                reasons.append(_OC_REASONS[name])
        self._oc_counts = counts
        out.throttle_reasons = reasons
        return out

    def _thermal_zones(self):
        """({zone type: C} for sensors that are on, whether any is at a passive trip point)."""
        temps, passive = {}, False
        for zone in sorted(glob.glob(self._path('sys/class/thermal/thermal_zone*'))):
            name = _read(os.path.join(zone, 'type'))
            milli = _number(_read(os.path.join(zone, 'temp')))
            if not name or milli is None or milli / 1e3 <= -256:
                continue
            temps[name.strip()] = milli / 1e3
            for trip in glob.glob(os.path.join(zone, 'trip_point_*_type')):
                if (_read(trip) or '').strip() != 'passive':
                    continue
                limit = _number(_read(trip[:-len('type')] + 'temp'))
                passive = passive or (limit is not None and milli >= limit)
        return temps, passive

    def _rails(self):
        rails = {}
        pattern = self._path('sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*/in*_label')
        for label_path in sorted(glob.glob(pattern)):
            label = (_read(label_path) or '').strip()
            if not label or label == 'NC':
                continue
            channel = os.path.basename(label_path)[2:-len('_label')]
            folder = os.path.dirname(label_path)
            mv = _number(_read(os.path.join(folder, f'in{channel}_input')))
            ma = _number(_read(os.path.join(folder, f'curr{channel}_input')))
            if mv is not None and ma is not None:
                rails[label] = mv * ma / 1e6
        return rails

    def _read_oc_counts(self):
        for hwmon in sorted(glob.glob(self._path('sys/class/hwmon/hwmon*'))):
            if (_read(os.path.join(hwmon, 'name')) or '').strip() != 'soctherm_oc':
                continue
            counts = {}
            for oc in _OC_REASONS:
                value = _number(_read(os.path.join(hwmon, f'{oc}_event_cnt')))
                if value is not None:
                    counts[oc] = value
            return counts
        return {}

    def close(self):
        if self.tegrastats is not None:
            self.tegrastats.stop()

    def processes(self):
        """Other processes with the GPU's device nodes open (this one left out)."""
        if not self.available:
            return []
        found = []
        for proc in glob.glob(self._path('proc/[0-9]*')):
            pid = int(os.path.basename(proc))
            if pid == os.getpid():
                continue
            try:
                targets = [os.readlink(fd) for fd in glob.glob(os.path.join(proc, 'fd/*'))]
            except OSError:
                continue  # another user's process, or gone
            if any(t.startswith(_GPU_DEVICE_NODES) for t in targets):
                name = (_read(os.path.join(proc, 'comm')) or '').strip() or None
                found.append(GpuProcess(pid, name))
        return sorted(found, key=lambda p: p.pid)


def _l4t_release(text):
    """'# R36 (release), REVISION: 4.4, ...' -> 'L4T R36.4.4'."""
    if not text or not text.startswith('# R'):
        return None
    major = text[2:].split()[0]
    revision = text.split('REVISION:')[1].split(',')[0].strip() if 'REVISION:' in text else ''
    return f'L4T {major}.{revision}' if revision else f'L4T {major}'


def _read(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError:
        return None


def _number(text):
    try:
        return float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def _scaled(folder, name, factor):
    value = _number(_read(os.path.join(folder, name)))
    return None if value is None else value * factor


def _first(value, fallback):
    return fallback if value is None else value
