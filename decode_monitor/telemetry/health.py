"""Health levels from thresholds, in diagnostic_updater's terms (OK / WARN / ERROR)."""
from dataclasses import dataclass

OK, WARN, ERROR = 0, 1, 2


@dataclass(frozen=True)
class Thresholds:
    latency_budget_ms: float = 0.0  # 0 disables; WARN above, ERROR above twice the budget
    min_floor_fraction: float = 0.0  # 0 disables; WARN below


def decode_health(stats, thresholds, fallback_reason=None, load_error=None, worker_error=None):
    """(level, message) for the decode status."""
    if worker_error:
        return ERROR, f'decode worker stopped: {worker_error}'
    if load_error:
        return ERROR, f'model not loaded: {load_error}'
    problems = []
    level = OK
    if fallback_reason:
        level = WARN
        problems.append(f'graph mode unavailable: {fallback_reason}')
    if stats is not None:
        budget = thresholds.latency_budget_ms
        if budget > 0 and stats.p95_ms > 2 * budget:
            level = ERROR
            problems.append(f'step p95 {stats.p95_ms:.2f} ms is over twice the budget '
                            f'{budget:.2f} ms')
        elif budget > 0 and stats.p95_ms > budget:
            level = max(level, WARN)
            problems.append(f'step p95 {stats.p95_ms:.2f} ms over budget {budget:.2f} ms')
        floor_min = thresholds.min_floor_fraction
        fraction = stats.fraction_of_peak
        if fraction is None:
            fraction = stats.fraction_of_measured
        if floor_min > 0 and fraction is not None and fraction < floor_min:
            level = max(level, WARN)
            problems.append(f'achieved {fraction:.1%} of the memory floor, below {floor_min:.0%}')
    if problems:
        return level, '; '.join(problems)
    return OK, 'decoding' if stats is not None else 'idle, no steps yet'


def gpu_health(telemetry, sample):
    if not telemetry.available:
        return OK, telemetry.reason or 'no GPU'
    if sample.throttled:
        return WARN, 'throttled: ' + ', '.join(sample.throttle_reasons)
    return OK, 'ok'
