"""Statistics for step timings: summaries, bootstrap confidence intervals, ratios.

Pure numpy/scipy. The bench's rule: per-session medians first (one number per fresh process),
then a mean over sessions with a bootstrap CI, so one noisy session counts once and the CI
reflects session-to-session spread, the variance that matters for a fleet of machines.
"""
from dataclasses import dataclass
import math
import warnings

import numpy as np
from scipy import stats as _scipy_stats

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 9999


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval (lo/hi are NaN when it cannot be formed)."""

    value: float
    lo: float
    hi: float
    n: int

    @property
    def has_ci(self):
        return not (math.isnan(self.lo) or math.isnan(self.hi))

    def covers(self, x):
        return self.has_ci and self.lo <= x <= self.hi

    def as_dict(self):
        return {'value': _json_float(self.value), 'lo': _json_float(self.lo),
                'hi': _json_float(self.hi), 'n': self.n}


def _json_float(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def summarize(values):
    """Count, mean, median, p90, p99, min, max, standard deviation and CV of `values`."""
    a = _as_array(values)
    if a.size == 0:
        raise ValueError('cannot summarize an empty sample')
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {'n': int(a.size), 'mean': mean, 'median': float(np.median(a)),
            'p90': float(np.percentile(a, 90)), 'p99': float(np.percentile(a, 99)),
            'min': float(a.min()), 'max': float(a.max()), 'std': std,
            'cv': std / mean if mean else float('nan')}


def _as_array(values):
    a = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError('sample contains NaN or infinite values')
    return a


def _check_confidence(confidence):
    if not 0.0 < confidence < 1.0:
        raise ValueError(f'confidence must be in (0, 1), not {confidence!r}')


def _bootstrap(data, statistic, paired, confidence, n_resamples, seed):
    """scipy.stats.bootstrap, BCa first; percentile where BCa degenerates (tiny, tied samples)."""
    rng = np.random.default_rng(seed)
    for method in ('BCa', 'percentile'):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            kwargs = dict(paired=paired, vectorized=True, confidence_level=confidence,
                          n_resamples=n_resamples, method=method)
            try:
                res = _scipy_stats.bootstrap(data, statistic, rng=rng, **kwargs)
            except TypeError:  # scipy < 1.15 names the generator random_state
                res = _scipy_stats.bootstrap(data, statistic, random_state=rng, **kwargs)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            return lo, hi
    return float('nan'), float('nan')


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def mean_ci(values, confidence=DEFAULT_CONFIDENCE, n_resamples=DEFAULT_RESAMPLES, seed=0):
    """Mean of `values` with a bootstrap CI. One value: no CI; identical values: zero width."""
    _check_confidence(confidence)
    a = _as_array(values)
    if a.size == 0:
        raise ValueError('cannot estimate the mean of an empty sample')
    point = float(a.mean())
    if a.size < 2:
        return Estimate(point, float('nan'), float('nan'), 1)
    if np.all(a == a[0]):
        return Estimate(point, point, point, int(a.size))
    lo, hi = _bootstrap((a,), _mean, False, confidence, n_resamples, seed)
    return Estimate(point, lo, hi, int(a.size))


def _ratio_of_means(a, b, axis=-1):
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


def paired_ratio_ci(numerator, denominator, confidence=DEFAULT_CONFIDENCE,
                    n_resamples=DEFAULT_RESAMPLES, seed=0):
    """mean(numerator) / mean(denominator) over paired observations, paired bootstrap CI.

    Pairs (e.g. eager and graph medians of the same session) are resampled together, so what
    the pair shares (a session's clocks, its placement in memory) cancels out of the interval.
    Speedup of graph over eager = paired_ratio_ci(eager_ms, graph_ms).
    """
    _check_confidence(confidence)
    a, b = _as_array(numerator), _as_array(denominator)
    if a.size != b.size:
        raise ValueError(f'paired samples differ in length: {a.size} vs {b.size}')
    if a.size == 0:
        raise ValueError('cannot estimate a ratio from empty samples')
    if np.any(b == 0):
        raise ValueError('denominator sample contains zeros')
    point = float(a.mean() / b.mean())
    if a.size < 2:
        return Estimate(point, float('nan'), float('nan'), 1)
    if np.all(a / b == (a / b)[0]) and np.all(b == b[0]):
        return Estimate(point, point, point, int(a.size))
    lo, hi = _bootstrap((a, b), _ratio_of_means, True, confidence, n_resamples, seed)
    return Estimate(point, lo, hi, int(a.size))


def ratio_ci(numerator, denominator, confidence=DEFAULT_CONFIDENCE,
             n_resamples=DEFAULT_RESAMPLES, seed=0):
    """mean(numerator) / mean(denominator) of independent samples, each resampled on its own.

    For comparing two runs (two machines, two days): their sessions are not paired.
    """
    _check_confidence(confidence)
    a, b = _as_array(numerator), _as_array(denominator)
    if a.size == 0 or b.size == 0:
        raise ValueError('cannot estimate a ratio from empty samples')
    if np.any(b == 0):
        raise ValueError('denominator sample contains zeros')
    point = float(a.mean() / b.mean())
    n = int(min(a.size, b.size))
    if a.size < 2 or b.size < 2:
        return Estimate(point, float('nan'), float('nan'), n)
    if np.all(a == a[0]) and np.all(b == b[0]):
        return Estimate(point, point, point, n)
    lo, hi = _bootstrap((a, b), _ratio_of_means, False, confidence, n_resamples, seed)
    return Estimate(point, lo, hi, n)


def format_estimate(est, digits=2, unit=''):
    """'24.51 [24.40, 24.63]' (or '24.51' without a CI)."""
    return _format(est, f'.{digits}f', unit)


def format_percent(est, digits=1):
    """'81.8% [81.6%, 82.0%]' of a fraction (or '81.8%' without a CI)."""
    return _format(est, f'.{digits}%')


def _format(est, spec, unit=''):
    """The value in `spec` (+ unit), then its CI's bounds in `spec`; '—' for no estimate."""
    if est is None:
        return '—'
    body = f'{est.value:{spec}}{unit}'
    if not est.has_ci:
        return body
    return f'{body} [{est.lo:{spec}}, {est.hi:{spec}}]'


def format_ratio(est, digits=3):
    """The study's format: '1.259× [1.253, 1.267]'."""
    return format_estimate(est, digits=digits, unit='×')
