import numpy as np
import pytest

from decode_monitor.telemetry.health import decode_health, ERROR, OK, Thresholds, WARN
from decode_monitor.telemetry.window import StepWindow


def test_window_statistics_match_numpy():
    rng = np.random.default_rng(0)
    ms = rng.uniform(4, 9, size=300)
    window = StepWindow(size=256)
    for i, t in enumerate(ms):
        window.add(t, pos=i, bytes_moved=10**9 + i * 1000)
    kept = ms[-256:]
    moved = 10**9 + np.arange(44, 300) * 1000
    s = window.stats(peak_bandwidth=2e12, measured_bandwidth=1e12)
    assert s.steps == 256 and s.context == 299
    assert s.p50_ms == pytest.approx(np.median(kept))
    assert s.p99_ms == pytest.approx(np.percentile(kept, 99))
    assert s.max_ms == kept.max()
    assert s.tokens_per_s == pytest.approx(1000 / kept.mean())
    assert s.fraction_of_peak == pytest.approx((moved / 2e12 * 1e3).sum() / kept.sum())
    assert s.fraction_of_measured == pytest.approx(2 * s.fraction_of_peak)
    assert StepWindow().stats(1e12) is None


def test_health_levels():
    window = StepWindow()
    for _ in range(10):
        window.add(10.0, 0, 10**10)  # 10 GB in 10 ms at 2 TB/s peak: floor 5 ms, 50 %
    s = window.stats(2e12)
    assert decode_health(s, Thresholds())[0] == OK
    assert decode_health(s, Thresholds(latency_budget_ms=9))[0] == WARN
    assert decode_health(s, Thresholds(latency_budget_ms=4.9))[0] == ERROR
    level, message = decode_health(s, Thresholds(min_floor_fraction=0.6))
    assert level == WARN and '50.0%' in message
    assert decode_health(s, Thresholds(), fallback_reason='no CUDA')[0] == WARN
    assert decode_health(None, Thresholds(), load_error='bad path')[0] == ERROR
