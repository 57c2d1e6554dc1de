"""NVML telemetry through a stand-in NVML module (no GPU here): the peak-bandwidth formula,
throttle-reason decoding, the listing of other processes, hardware ids, J/token and the
shared-GPU rule, up to the diagnostics values the node publishes."""
import os
from types import SimpleNamespace

import pytest

from decode_monitor.serving.service import Counters
from decode_monitor.telemetry.device import DeviceIdentity, hardware_id, select_telemetry
from decode_monitor.telemetry.gpu import decode_throttle_reasons, GpuTelemetry, peak_bandwidth
from decode_monitor.telemetry.health import OK, Thresholds, WARN
from decode_monitor.telemetry.live import EnergyMeter, LiveTelemetry, ShareWatch
from decode_monitor.telemetry.report import statuses
from decode_monitor.telemetry.window import StepWindow
from fake_nvml import FakeNvml, NVMLError, proc, util

ME = os.getpid()


# -- peak bandwidth: max memory clock x bus width x 2 transfers a clock / 8 bits a byte ---------
@pytest.mark.parametrize('clock_mhz, bus_bits, gbps', [
    (2619, 5120, 3352.32),  # H100 SXM (HBM3): 2619e6 * 5120 / 8 * 2 = 3.35232e12
    (3201, 6016, 4814.304),  # H200: what NVML reported on one (max mem clock, bus width)
    (1593, 5120, 2039.04),  # A100 80GB SXM (HBM2e)
])
def test_peak_bandwidth_formula(clock_mhz, bus_bits, gbps):
    assert peak_bandwidth(clock_mhz, bus_bits) == pytest.approx(gbps * 1e9, rel=1e-12)
    gpu = GpuTelemetry(nvml=FakeNvml(clock_mhz, bus_bits), own_pids={ME})
    assert gpu.available and gpu.peak_bandwidth == pytest.approx(gbps * 1e9, rel=1e-12)
    assert gpu.name == 'NVIDIA H100 80GB HBM3'  # bytes from NVML decoded


def test_peak_bandwidth_unreadable_keeps_the_rest():
    nv = FakeNvml()
    nv.nvmlDeviceGetMemoryBusWidth = lambda h: (_ for _ in ()).throw(NVMLError('Not Supported'))
    gpu = GpuTelemetry(nvml=nv)
    assert gpu.available and gpu.peak_bandwidth is None
    assert 'peak bandwidth unavailable' in gpu.reason and 'Not Supported' in gpu.reason


# -- throttle reasons --------------------------------------------------------------------------
def test_throttle_reason_bits():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x4 | 0x40) == ['sw_power_cap', 'hw_thermal']
    assert decode_throttle_reasons(0x1ff) == [
        'gpu_idle', 'applications_clocks', 'sw_power_cap', 'hw_slowdown', 'sync_boost',
        'sw_thermal', 'hw_thermal', 'hw_power_brake', 'display_clocks']
    assert decode_throttle_reasons(0x200 | 0x8) == ['hw_slowdown']  # unknown bits dropped


@pytest.mark.parametrize('mask, throttled', [
    (0x1, False), (0x10, False), (0x1 | 0x10, False),  # idle and sync boost are benign
    (0x4, True), (0x8, True), (0x20, True), (0x40, True), (0x80, True), (0x1 | 0x20, True)])
def test_sample_throttled_by_mask(mask, throttled):
    nv = FakeNvml()
    nv.event_mask = mask
    assert GpuTelemetry(nvml=nv).sample().throttled is throttled


def test_sample_units_and_older_driver_fallback():
    nv = FakeNvml()
    nv.event_mask, nv.event_api = 0x20, False  # only nvmlDeviceGetCurrentClocksThrottleReasons
    s = GpuTelemetry(nvml=nv).sample()
    assert s.throttle_reasons == ['sw_thermal']
    assert s.power_w == pytest.approx(412.345) and s.energy_j == pytest.approx(1000.0)
    assert s.sm_clock_mhz == 1980 and s.mem_clock_mhz == 2619 and s.gpu_load_percent == 97


def test_nvml_missing_reads_unavailable():
    gpu = GpuTelemetry(nvml=FakeNvml(init_error=OSError('libnvidia-ml.so.1: cannot open')))
    assert not gpu.available and 'libnvidia-ml.so.1' in gpu.reason
    assert gpu.sample().power_w is None and gpu.processes() == []


# -- other processes on the GPU ----------------------------------------------------------------
def test_listing_leaves_this_process_out_and_reads_sm_shares():
    nv = FakeNvml()
    nv.compute = [proc(ME, 30 << 30), proc(4242, 2 << 30), proc(5151)]
    nv.graphics = [proc(5151, 512 << 20)]  # also a graphics context: memory from there
    nv.names = {4242: b'/usr/bin/python3', ME: b'me'}
    nv.util_samples = [util(4242, 100, 80), util(4242, 200, 90), util(ME, 200, 15),
                       util(5151, 150, 0)]
    gpu = GpuTelemetry(nvml=nv, own_pids={ME})
    listing = gpu.processes()
    assert [p.pid for p in listing] == [4242, 5151]
    a, b = listing
    assert (a.name, a.used_memory_bytes, a.sm_percent) == ('python3', 2 << 30, 85.0)
    assert b.used_memory_bytes == 512 << 20 and b.sm_percent == 0.0
    # the next listing averages only samples newer than the ones already read
    nv.util_samples.append(util(4242, 300, 40))
    assert gpu.processes()[0].sm_percent == 40.0
    # no new samples: NVML raises NotFound, the share is unknown rather than stale
    assert gpu.processes()[0].sm_percent is None


def test_listing_name_falls_back_to_proc_comm():
    nv = FakeNvml()
    nv.compute = [proc(ME, 1 << 20)]
    gpu = GpuTelemetry(nvml=nv, own_pids=set())  # this process is "another" here
    with open('/proc/self/comm') as f:
        assert gpu.processes()[0].name == f.read().strip()


# -- hardware id -------------------------------------------------------------------------------
H200 = SimpleNamespace(name='NVIDIA H200', uuid='5e7c2b0a-93f1-4d62-8a0b-1c2d3e4f5a6b')


def test_hardware_id_from_the_decoding_device_without_nvml():
    no_nvml = GpuTelemetry(nvml=FakeNvml(init_error=OSError('no driver library')))
    cuda = DeviceIdentity.from_torch(SimpleNamespace(type='cuda', index=0), H200)
    assert hardware_id(no_nvml, cuda) == 'GPU-5e7c2b0a-93f1-4d62-8a0b-1c2d3e4f5a6b'
    unnamed = DeviceIdentity.from_torch('cuda:1', SimpleNamespace(name='Orin'))
    assert unnamed.index == 1 and hardware_id(no_nvml, unnamed) == 'Orin (cuda:1)'
    assert DeviceIdentity.from_torch('cuda', H200).index == 0
    assert hardware_id(no_nvml, DeviceIdentity.from_torch('cpu')) == 'cpu'
    assert hardware_id(no_nvml) == 'cpu'
    with_nvml = GpuTelemetry(nvml=FakeNvml())
    assert hardware_id(with_nvml, cuda) == with_nvml.uuid  # NVML's own id wins
    assert hardware_id(with_nvml, DeviceIdentity('cpu')) == 'cpu'  # decoding on the CPU


def test_select_telemetry_without_nvml_or_jetson_keeps_both_reasons(tmp_path):
    gpu = select_telemetry(nvml=FakeNvml(init_error=OSError('no driver library')),
                           root=str(tmp_path))
    assert not gpu.available
    assert 'no driver library' in gpu.reason and 'not a Jetson' in gpu.reason
    nv = FakeNvml()
    gpu = select_telemetry(nvml=nv)
    assert gpu.available and nv.initialised
    gpu.close()
    assert not nv.initialised


# -- J/token -----------------------------------------------------------------------------------
def test_energy_meter_joules_per_token_over_its_window():
    meter = EnergyMeter(window_s=10)
    assert meter.update(0.0, 1000.0, 0) is None  # one reading: nothing to divide
    assert meter.update(1.0, 1300.0, 100) == pytest.approx(3.0)
    assert meter.update(2.0, 1600.0, 200) == pytest.approx(3.0)
    assert meter.update(3.0, 1650.0, 200) == pytest.approx(650 / 200)  # idle energy counted
    # 12 s later the first readings have left the window: only 3 -> 15 s counts
    assert meter.update(15.0, 2650.0, 400) == pytest.approx((2650 - 1650) / 200)
    assert meter.update(16.0, 5.0, 450) is None  # counter went back (driver reload): restart
    assert meter.update(17.0, 105.0, 500) == pytest.approx(2.0)
    assert meter.update(18.0, None, 600) is None  # no counter


# -- shared GPU --------------------------------------------------------------------------------
def window_stats(step_ms, bytes_moved=15 * 10**9, n=64):
    window = StepWindow()
    for i in range(n):
        window.add(step_ms, 2048 + i, bytes_moved)
    return window.stats(4.8e12)


def test_share_watch_rule():
    watch = ShareWatch(ratio=1.15, min_steps=32)
    assert not watch.update(window_stats(4.0), others=1).warn  # no baseline alone yet
    assert watch.update(window_stats(4.0), others=0).slowdown == pytest.approx(1.0)
    assert watch.update(window_stats(3.9), others=0).slowdown == pytest.approx(1.0)  # best
    assert watch.baseline == pytest.approx(3.9 / 15e9)
    assert not watch.update(window_stats(4.4), others=2).warn  # 1.13x: within the margin
    v = watch.update(window_stats(5.7), others=2)
    assert v.warn and v.others == 2 and v.slowdown == pytest.approx(5.7 / 3.9)
    assert v.message.startswith('GPU shared with 2 processes')
    assert 'process:' in watch.update(window_stats(5.7), others=1).message
    # slower but alone (clocks, thermals): not sharing
    assert not watch.update(window_stats(5.7), others=0).warn
    # twice the bytes (a long context) in twice the time is not a slowdown
    assert not watch.update(window_stats(7.8, bytes_moved=30 * 10**9), others=1).warn
    # too few steps to judge
    assert watch.update(window_stats(9.0, n=8), others=1).slowdown is None


# -- the diagnostics values --------------------------------------------------------------------
def snapshot():
    return dict(state='ready', load_error=None, queue_depth=0, active=True,
                counters=Counters(), ttft_p50_ms=None)


def test_statuses_warn_when_shared_and_list_the_other_process():
    nv = FakeNvml()
    gpu = GpuTelemetry(nvml=nv, own_pids={ME})
    now = [0.0]
    live = LiveTelemetry(gpu, clock=lambda: now[0])
    info = dict(model='m', peak_bandwidth=4.8e12, queue_size=8)
    cuda = DeviceIdentity.from_torch('cuda:0', H200)

    def tick(step_ms, steps_total, energy_mj):
        now[0] += 1.0
        nv.energy_mj = energy_mj
        stats = window_stats(step_ms)
        reading = live.read(stats, steps_total)
        return statuses(snapshot(), stats, info, gpu, reading.sample, Thresholds(),
                        device=cuda, live=reading)

    decode, gpu_status, _ = tick(3.9, 0, 1_000_000)
    assert decode[1] == OK and decode[2] == 'decoding' and decode[3] == gpu.uuid
    values = dict(gpu_status[4])
    assert values['other processes'] == '0' and gpu_status[2] == 'ok'
    decode, _, _ = tick(3.9, 256, 1_000_000 + 256 * 2_500)  # 2.5 J a token alone
    assert float(dict(decode[4])['energy per token (J)']) == pytest.approx(2.5)

    nv.compute = [proc(ME, 30 << 30), proc(4242, 2 << 30)]
    nv.names = {4242: b'perception'}
    nv.util_samples = [util(4242, 10, 87)]
    decode, gpu_status, _ = tick(5.7, 512, 1_000_000 + 512 * 2_500)
    assert decode[1] == WARN and decode[2].startswith('GPU shared with 1 process')
    d = dict(decode[4])
    assert d['other processes on the GPU'] == '1'
    assert float(d['step vs alone (x)']) == pytest.approx(5.7 / 3.9, rel=1e-3)
    g = dict(gpu_status[4])
    assert gpu_status[2] == 'shared with 1 other process'
    assert g['other processes'] == '1'
    assert g['process 4242'] == 'perception, 2048 MiB, SM 87%'
    assert f'process {ME}' not in g

    # another model loaded: no baseline until a window alone, so no WARN from the old one
    live.reset()
    assert not live.read(window_stats(5.7), 1024).sharing.warn
    assert live.read(window_stats(5.7), 1024).sharing.slowdown is None

    # a budget problem and sharing: both said, the worse level kept
    live.share.baseline = 3.9 / 15e9
    stats = window_stats(5.7)
    reading = live.read(stats, 768)
    level, message = statuses(snapshot(), stats, info, gpu, reading.sample,
                              Thresholds(latency_budget_ms=2.5), device=cuda,
                              live=reading)[0][1:3]
    assert level == 2 and 'over twice the budget' in message and 'GPU shared' in message


def test_statuses_without_live_reading_keep_the_old_shape():
    gpu = GpuTelemetry(nvml=FakeNvml(init_error=OSError('no driver library')))
    decode, gpu_status, _ = statuses(snapshot(), None, {}, gpu, gpu.sample(), Thresholds())
    assert decode[3] == 'cpu' and decode[1] == OK
    values = dict(gpu_status[4])
    assert values['other processes'] == 'unavailable' and values['power (W)'] == 'unavailable'
    assert dict(decode[4])['energy per token (J)'] == 'unavailable'
    cuda = DeviceIdentity.from_torch('cuda:0', H200)
    for status in statuses(snapshot(), None, {}, gpu, gpu.sample(), Thresholds(), device=cuda):
        assert status[3] == 'GPU-5e7c2b0a-93f1-4d62-8a0b-1c2d3e4f5a6b'  # not 'cpu'
