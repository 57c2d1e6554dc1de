"""Jetson telemetry without NVML, against the trees and lines under test/fixtures/jetson/.

The fixtures are recorded formats, not a device run: sysfs trees laid out as a Jetson's
(JetPack 6 paths on an AGX Orin read as root; an Orin Nano read without root, so no debugfs,
and the older gpu.0 load path) and tegrastats lines as JetPack 5 and 6 print them, with
values written for the tests. No Jetson was used.
"""
import os
import shutil
import sys
import time

import pytest

from decode_monitor.telemetry.device import DeviceIdentity, hardware_id, select_telemetry
from decode_monitor.telemetry.jetson import JetsonTelemetry, module_peak_bandwidth
from decode_monitor.telemetry.tegrastats import parse_tegrastats, TegrastatsReader
from fake_nvml import FakeNvml

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'jetson')
AGX, NANO = os.path.join(FIXTURES, 'agx_orin'), os.path.join(FIXTURES, 'orin_nano')
NO_NVML = FakeNvml(init_error=OSError('libnvidia-ml.so.1: cannot open shared object file'))


def lines(name):
    with open(os.path.join(FIXTURES, 'tegrastats', name)) as f:
        return [line for line in f.read().splitlines() if line.strip()]


@pytest.mark.parametrize('model, gbps', [
    ('NVIDIA Jetson AGX Orin Developer Kit', 204.8),
    ('NVIDIA Jetson AGX Orin 32GB', 204.8),
    ('NVIDIA Jetson Orin NX Engineering Reference Developer Kit', 102.4),
    ('NVIDIA Jetson Orin Nano Developer Kit', 68.0),
    ('NVIDIA Jetson AGX Thor Developer Kit', 273.0),
    ('NVIDIA Jetson Xavier NX Developer Kit', None),
    (None, None)])
def test_peak_bandwidth_by_module(model, gbps):
    peak = module_peak_bandwidth(model)
    assert peak == (None if gbps is None else pytest.approx(gbps * 1e9))


def test_agx_orin_sysfs():
    jetson = JetsonTelemetry(root=AGX)
    assert jetson.available and jetson.reason is None
    assert jetson.name == 'NVIDIA Jetson AGX Orin Developer Kit'  # NUL of the device tree gone
    assert jetson.driver == 'L4T R36.4.3' and jetson.uuid is None
    assert jetson.peak_bandwidth == pytest.approx(204.8e9)
    s = jetson.sample()
    assert s.sm_clock_mhz == pytest.approx(1300.5)  # the ga10b devfreq, not the VIC's
    assert s.gpu_load_percent == pytest.approx(74.2)  # 742 per mille
    assert s.mem_clock_mhz == pytest.approx(3199.0)  # bpmp debugfs EMC rate
    assert s.temperature_c == pytest.approx(50.718)
    assert set(s.temperatures_c) == {'cpu-thermal', 'gpu-thermal', 'soc0-thermal',
                                     'soc1-thermal', 'soc2-thermal', 'tj-thermal'}  # cv* off
    assert set(s.rails_w) == {'VDD_GPU_SOC', 'VDD_CPU_CV', 'VIN_SYS_5V0', 'VDDQ_VDD2_1V8AO'}
    assert s.rails_w['VDD_GPU_SOC'] == pytest.approx(4.984 * 1.856)  # mV x mA
    assert s.power_w == s.rails_w['VDD_GPU_SOC']
    assert s.throttle_reasons == [] and not s.throttled  # 52 C, and OC counters not rising


def test_over_current_events_since_the_last_sample(tmp_path):
    root = tmp_path / 'agx'
    shutil.copytree(AGX, root, symlinks=True)
    jetson = JetsonTelemetry(root=str(root))
    assert jetson.sample().throttle_reasons == []  # 27 events since boot: history, not now
    oc = root / 'sys/devices/platform/soctherm-oc-event/hwmon/hwmon3'
    (oc / 'oc3_event_cnt').write_text('31\n')
    s = jetson.sample()
    assert s.throttle_reasons == ['over_current'] and s.throttled
    (oc / 'oc1_event_cnt').write_text('1\n')
    assert jetson.sample().throttle_reasons == ['under_voltage']
    assert jetson.sample().throttle_reasons == []  # counters unchanged since


def test_orin_nano_without_root_takes_emc_and_more_from_tegrastats():
    class Latest:
        latest = parse_tegrastats(lines('orin_nano_jp6.txt')[0])

    alone = JetsonTelemetry(root=NANO).sample()
    assert alone.mem_clock_mhz is None  # no debugfs for a non-root reader
    assert alone.gpu_load_percent == 0.0  # the gpu.0 load path
    assert alone.throttle_reasons == ['sw_thermal'] and alone.throttled  # 99.5 C >= 99 C trip
    assert alone.power_w == pytest.approx(5.064 * 0.111)  # VDD_CPU_GPU_CV
    jetson = JetsonTelemetry(root=NANO, tegrastats=Latest())
    assert jetson.peak_bandwidth == pytest.approx(68e9) and jetson.driver == 'L4T R35.4.1'
    s = jetson.sample()
    assert s.mem_clock_mhz == 2133.0  # from tegrastats' EMC_FREQ
    assert s.sm_clock_mhz == pytest.approx(306.0) and s.gpu_load_percent == 0.0  # sysfs first
    assert s.rails_w['VDD_IN'] == pytest.approx(5.072 * 1.312)


def test_gpu_users_from_open_device_nodes():
    procs = JetsonTelemetry(root=AGX).processes()
    assert [(p.pid, p.name) for p in procs] == [(4242, 'perception_node')]
    assert procs[0].used_memory_bytes is None and procs[0].sm_percent is None


def test_not_a_jetson():
    jetson = JetsonTelemetry(root=os.path.join(FIXTURES, 'not_jetson'))
    assert not jetson.available and 'not a Jetson' in jetson.reason
    assert jetson.sample().power_w is None and jetson.processes() == []


def test_select_telemetry_order():
    assert type(select_telemetry(nvml=FakeNvml(), root=AGX)).__name__ == 'GpuTelemetry'
    jetson = select_telemetry(nvml=NO_NVML, root=AGX)
    assert isinstance(jetson, JetsonTelemetry) and jetson.available
    assert jetson.peak_source == 'Jetson module table'
    none = select_telemetry(nvml=NO_NVML, root=os.path.join(FIXTURES, 'not_jetson'))
    assert not none.available and 'libnvidia-ml' in none.reason and 'Jetson' in none.reason
    # hardware id on a Jetson without NVML: the CUDA device's uuid, else the module
    cuda = DeviceIdentity('cuda', 0, 'Orin', 'GPU-1a2b3c4d-0000-1111-2222-333344445555')
    assert hardware_id(jetson, cuda) == cuda.uuid
    assert hardware_id(jetson) == 'NVIDIA Jetson AGX Orin Developer Kit'


# -- tegrastats lines --------------------------------------------------------------------------
def test_parse_agx_orin_lines():
    idle, busy = (parse_tegrastats(line) for line in lines('agx_orin_jp6.txt'))
    assert idle.gpu_load_percent == 0 and idle.emc_clock_mhz == 2133
    assert 'GPU' not in idle.temperatures_c and 'CV0' not in idle.temperatures_c  # -256C: off
    assert busy.gpu_load_percent == 99 and busy.gpu_clock_mhz == 1300
    assert busy.emc_load_percent == 71 and busy.emc_clock_mhz == 3199
    assert busy.temperatures_c['GPU'] == pytest.approx(50.718)
    assert busy.temperatures_c['tj'] == pytest.approx(52.562)
    assert 'CPU' in busy.temperatures_c and busy.temperatures_c['Tboard'] == 34
    assert busy.rails_mw == {'VDD_GPU_SOC': 25614, 'VDD_CPU_CV': 1607, 'VIN_SYS_5V0': 4707,
                             'VDDQ_VDD2_1V8AO': 1295}  # instantaneous, NC dropped
    assert (busy.ram_used_mb, busy.ram_total_mb) == (22408, 62801)


def test_parse_lines_that_leave_fields_out():
    nx = parse_tegrastats(lines('orin_nx_jp5.txt')[0])  # no date, no clocks
    assert nx.gpu_load_percent == 88 and nx.gpu_clock_mhz is None
    assert nx.emc_load_percent == 25 and nx.emc_clock_mhz is None
    assert nx.rails_mw['VDD_CPU_GPU_CV'] == 6500 and nx.temperatures_c['GPU'] == 61
    nano = parse_tegrastats(lines('orin_nano_jp6.txt')[0])
    assert nano.gpu_clock_mhz == 624 and nano.temperatures_c['gpu'] == pytest.approx(58.031)
    with pytest.raises(ValueError, match='not a tegrastats line'):
        parse_tegrastats(lines('bad.txt')[0])


def test_reader_keeps_the_newest_line_and_counts_bad_ones():
    script = ('import sys, time\n'
              'for line in open(sys.argv[1]).read().splitlines() + ["garbage"]:\n'
              '    print(line, flush=True)\n'
              'time.sleep(30)\n')
    now = [0.0]
    reader = TegrastatsReader([sys.executable, '-c', script,
                               os.path.join(FIXTURES, 'tegrastats', 'agx_orin_jp6.txt')],
                              max_age_s=5.0, clock=lambda: now[0])
    with reader:
        for _ in range(500):
            if reader.bad_lines:
                break
            time.sleep(0.01)
        assert reader.bad_lines == 1 and 'garbage' in reader.last_error
        assert reader.latest == parse_tegrastats(lines('agx_orin_jp6.txt')[1])
        now[0] = 6.0  # nothing new for longer than max_age_s: no reading rather than a stale one
        assert reader.latest is None
    assert reader._proc.poll() is not None  # stopped with the context


def test_select_telemetry_starts_tegrastats_on_a_jetson_and_close_stops_it():
    script = ('import sys, time\n'
              'print(open(sys.argv[1]).read(), flush=True)\n'
              'time.sleep(30)\n')
    command = [sys.executable, '-c', script,
               os.path.join(FIXTURES, 'tegrastats', 'orin_nano_jp6.txt')]
    jetson = select_telemetry(nvml=NO_NVML, root=NANO, tegrastats_command=command)
    try:
        for _ in range(500):
            if jetson.tegrastats.latest is not None:
                break
            time.sleep(0.01)
        assert jetson.sample().mem_clock_mhz == 2133.0  # EMC from the tegrastats line
    finally:
        jetson.close()
    assert jetson.tegrastats._proc.poll() is not None
    assert select_telemetry(nvml=NO_NVML, root=NANO, tegrastats_command=[
        '/nonexistent/tegrastats']).tegrastats is None  # not installed: sysfs only
    assert select_telemetry(nvml=NO_NVML, root=NANO, tegrastats_command=None).tegrastats is None


def test_reader_without_the_binary():
    with pytest.raises(FileNotFoundError):
        TegrastatsReader(['/nonexistent/tegrastats']).start()
