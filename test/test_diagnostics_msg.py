"""DiagnosticArray building with no ROS graph (diagnostic_updater's testing style)."""
import pytest

pytest.importorskip('diagnostic_msgs')
from builtin_interfaces.msg import Time  # noqa: E402

from decode_monitor.node.diagnostics import build_array  # noqa: E402
from decode_monitor.node.watch import format_array  # noqa: E402
from decode_monitor.serving.service import Counters  # noqa: E402
from decode_monitor.telemetry.gpu import GpuSample, GpuTelemetry  # noqa: E402
from decode_monitor.telemetry.health import Thresholds  # noqa: E402
from decode_monitor.telemetry.window import StepWindow  # noqa: E402


def snapshot(state='ready', queue_depth=0, load_error=None):
    return dict(state=state, load_error=load_error, queue_depth=queue_depth, active=False,
                counters=Counters(received=5, served=3, rejected=1, cancelled=1),
                ttft_p50_ms=12.5)


def stats():
    window = StepWindow()
    for i in range(20):
        window.add(8.0, 100 + i, 14 * 10**9)
    return window.stats(3.352e12, 3.0e12)


def test_array_has_three_named_statuses_with_string_values():
    info = dict(model='m', dtype='bfloat16', backend='hf', mode='graph', mode_requested='graph',
                graph_fallbacks=0, queue_size=4, peak_bandwidth=3.352e12,
                measured_bandwidth=3.0e12)
    array = build_array(Time(sec=5), snapshot(), stats(), info, GpuTelemetry(), GpuSample(),
                        Thresholds(latency_budget_ms=7.0))
    assert array.header.stamp.sec == 5
    names = [s.name for s in array.status]
    assert names == ['llm_decoder: decode', 'llm_decoder: gpu', 'llm_decoder: requests']
    renamed = build_array(Time(), snapshot(), None, info, GpuTelemetry(), GpuSample(),
                          Thresholds(), prefix='left_decoder')
    assert [s.name for s in renamed.status] == [
        'left_decoder: decode', 'left_decoder: gpu', 'left_decoder: requests']
    decode = {kv.key: kv.value for kv in array.status[0].values}
    assert array.status[0].level == b'\x01'  # p95 8 ms over a 7 ms budget: WARN
    assert float(decode['step p95 (ms)']) == pytest.approx(8.0)
    assert float(decode['floor (ms)']) == pytest.approx(14e9 / 3.352e12 * 1e3, rel=1e-3)
    assert float(decode['achieved fraction of floor (peak bw)']) == pytest.approx(
        14e9 / 3.352e12 * 1e3 / 8.0, rel=1e-3)
    assert float(decode['peak bandwidth (GB/s)']) == pytest.approx(3352.0)
    requests = {kv.key: kv.value for kv in array.status[2].values}
    assert requests['served'] == '3' and requests['cancelled'] == '1'
    assert all(isinstance(kv.value, str) for s in array.status for kv in s.values)
    assert 'step p95 (ms)' in format_array(array)


def test_load_error_is_an_error_and_full_queue_a_warning():
    info = dict(queue_size=2)
    array = build_array(Time(), snapshot('failed', 2, 'ModelLoadError: no such dir'), None,
                        info, GpuTelemetry(), GpuSample(), Thresholds())
    assert array.status[0].level == b'\x02' and 'no such dir' in array.status[0].message
    assert array.status[2].level == b'\x01' and array.status[2].message == 'queue full'
    gpu = {kv.key: kv.value for kv in array.status[1].values}
    assert gpu['power (W)'] == 'unavailable'


def test_a_dead_worker_is_an_error_whatever_else_holds():
    dead = dict(snapshot(), worker_error='RuntimeError: boom')
    array = build_array(Time(), dead, stats(), dict(queue_size=4), GpuTelemetry(), GpuSample(),
                        Thresholds())
    assert array.status[0].level == b'\x02' and 'boom' in array.status[0].message
