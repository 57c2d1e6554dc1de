"""Bootstrap statistics on synthetic samples whose true values are known."""
import numpy as np
import pytest

from decode_monitor.telemetry import stats


def _coverage(draw, true_value, repeats, estimator, **kw):
    rng = np.random.default_rng(12345)
    hits = 0
    for i in range(repeats):
        est = estimator(*draw(rng), n_resamples=2000, seed=i, **kw)
        hits += est.covers(true_value)
    return hits / repeats


def test_mean_ci_covers_true_mean_at_nominal_rate():
    # 300 draws of 30 skewed (lognormal) step times; a 95 % CI must cover the true mean in
    # about 95 % of them (binomial sd at 300 draws is 1.3 points).
    mu, sigma = np.log(20.0), 0.1
    true_mean = float(np.exp(mu + sigma ** 2 / 2))
    rate = _coverage(lambda rng: (rng.lognormal(mu, sigma, 30),), true_mean, 300,
                     stats.mean_ci)
    assert 0.90 <= rate <= 0.99


def test_confidence_level_is_honoured():
    # A 50 % interval must miss about half the time: the level is not ignored.
    rate = _coverage(lambda rng: (rng.normal(10.0, 1.0, 30),), 10.0, 300, stats.mean_ci,
                     confidence=0.5)
    assert 0.38 <= rate <= 0.62


def test_paired_speedup_covers_true_ratio_and_beats_unpaired():
    # Sessions differ a lot from each other (shared offset); graph is exactly 1.25x faster
    # within a session up to 0.3 % noise. Pairing cancels the session effect.
    true_speedup = 1.25

    def draw(rng):
        session = rng.normal(25.0, 2.0, 10)
        eager = session * rng.normal(1.0, 0.003, 10)
        graph = session / true_speedup * rng.normal(1.0, 0.003, 10)
        return eager, graph

    rate = _coverage(draw, true_speedup, 200, stats.paired_ratio_ci)
    assert rate >= 0.85
    rng = np.random.default_rng(7)
    eager, graph = draw(rng)
    paired = stats.paired_ratio_ci(eager, graph)
    unpaired = stats.ratio_ci(eager, graph)
    assert paired.covers(true_speedup)
    assert (paired.hi - paired.lo) * 5 < unpaired.hi - unpaired.lo


def test_unpaired_ratio_covers_true_ratio():
    rate = _coverage(lambda rng: (rng.normal(30.0, 1.0, 20), rng.normal(20.0, 1.0, 20)),
                     1.5, 200, stats.ratio_ci)
    assert 0.88 <= rate <= 0.99


def test_point_estimates_are_the_plain_formulas():
    a = [10.0, 12.0, 11.0, 13.0]
    b = [8.0, 9.0, 9.5, 10.0]
    assert stats.mean_ci(a).value == pytest.approx(np.mean(a))
    assert stats.paired_ratio_ci(a, b).value == pytest.approx(np.mean(a) / np.mean(b))
    est = stats.mean_ci(a)
    assert est.lo <= est.value <= est.hi


def test_degenerate_samples():
    one = stats.mean_ci([4.2])
    assert one.value == 4.2 and not one.has_ci
    same = stats.mean_ci([3.0, 3.0, 3.0])
    assert (same.lo, same.value, same.hi) == (3.0, 3.0, 3.0)
    two = stats.mean_ci([1.0, 2.0])  # BCa degenerates at n=2; an interval still comes back
    assert two.has_ci and 1.0 <= two.lo <= two.hi <= 2.0


@pytest.mark.parametrize('call', [
    lambda: stats.mean_ci([]),
    lambda: stats.mean_ci([1.0, float('nan')]),
    lambda: stats.mean_ci([1.0, 2.0], confidence=1.5),
    lambda: stats.paired_ratio_ci([1.0, 2.0], [1.0]),
    lambda: stats.paired_ratio_ci([1.0, 2.0], [1.0, 0.0]),
    lambda: stats.ratio_ci([], [1.0]),
    lambda: stats.summarize([]),
])
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()


def test_summarize():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s['n'] == 5 and s['median'] == 3.0 and s['max'] == 100.0 and s['min'] == 1.0
    assert s['mean'] == pytest.approx(22.0)
    assert s['cv'] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1) / 22.0)


def test_study_format():
    est = stats.Estimate(1.2591, 1.2534, 1.2668, 10)
    assert stats.format_ratio(est) == '1.259× [1.253, 1.267]'
    assert stats.format_estimate(est, 2) == '1.26 [1.25, 1.27]'
    assert stats.format_ratio(stats.Estimate(1.5, float('nan'), float('nan'), 1)) == '1.500×'
