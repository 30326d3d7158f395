"""The lifecycle's statistics against plain references (hypothesis) and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from server.lifecycle.stats import (
    Direction,
    Trend,
    direction_of,
    msprt,
    sample_ratio_mismatch,
    trend,
    welch,
)

values = st.lists(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=3, max_size=40
)


def mk_s(y: list[float]) -> int:
    """Mann-Kendall S: sum of sign(y_j - y_i) over i < j."""
    return sum(int(np.sign(y[j] - y[i])) for i in range(len(y)) for j in range(i + 1, len(y)))


def theil_sen(y: list[float]) -> float:
    slopes = [(y[j] - y[i]) / (j - i) for i in range(len(y)) for j in range(i + 1, len(y))]
    return float(np.median(slopes))


@settings(max_examples=200, deadline=None)
@given(values)
def test_trend_agrees_with_the_plain_definitions(y: list[float]) -> None:
    r = trend(np.array(y), Direction.HIGHER)
    if len(set(y)) == 1:
        assert r.trend is Trend.STABLE and r.p_value == 1.0
        return
    s = mk_s(y)
    assert np.sign(r.tau) == np.sign(s)
    assert r.slope == pytest.approx(theil_sen(y), rel=1e-9, abs=1e-9)
    if r.trend is not Trend.STABLE:
        assert r.p_value < 0.05
        assert (r.trend is Trend.IMPROVING) == (s > 0)
    # Lower-is-better swaps the verdict, never the statistics.
    low = trend(np.array(y), Direction.LOWER)
    assert (low.tau, low.p_value) == (r.tau, r.p_value)
    flip = {Trend.IMPROVING: Trend.DEGRADING, Trend.DEGRADING: Trend.IMPROVING}
    assert low.trend is flip.get(r.trend, Trend.STABLE)


def test_trend_of_noisy_series() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(200)
    assert trend(0.01 * x + rng.normal(0, 0.3, 200), Direction.HIGHER).trend is Trend.IMPROVING
    assert trend(0.01 * x + rng.normal(0, 0.3, 200), Direction.LOWER).trend is Trend.DEGRADING
    flat = [trend(rng.normal(0, 1, 100), Direction.HIGHER).trend for _ in range(200)]
    # A stationary series is called a trend about alpha of the time, not more.
    assert flat.count(Trend.STABLE) >= 180
    big = trend(0.5 * np.arange(100_000) + rng.normal(0, 1000, 100_000), Direction.HIGHER)
    assert big.trend is Trend.IMPROVING and big.slope == pytest.approx(0.5, rel=0.05)
    assert trend(np.array([1.0, 2.0]), Direction.HIGHER).trend is Trend.STABLE


def test_directions() -> None:
    assert direction_of("loss") is Direction.LOWER
    assert direction_of("inference_latency") is Direction.LOWER
    assert direction_of("round_seconds") is Direction.LOWER
    assert direction_of("dropouts") is Direction.LOWER
    assert direction_of("accuracy") is Direction.HIGHER
    assert direction_of("user_satisfaction") is Direction.HIGHER


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-100, 100), min_size=2, max_size=30),
    st.lists(st.floats(-100, 100), min_size=2, max_size=30),
)
def test_welch_matches_the_textbook_formula(a: list[float], b: list[float]) -> None:
    va, vb = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    r = welch(len(a), float(np.mean(a)), va, len(b), float(np.mean(b)), vb)
    se = math.sqrt(va / len(a) + vb / len(b))
    assert r.difference == pytest.approx(np.mean(b) - np.mean(a), abs=1e-9)
    if se < 1e-9:
        return
    from scipy import stats

    ref = stats.ttest_ind(b, a, equal_var=False)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    half = stats.t.ppf(0.975, r.df) * se
    assert (r.ci_low, r.ci_high) == pytest.approx((r.difference - half, r.difference + half))
    assert (r.ci_low <= 0 <= r.ci_high) == (r.p_value >= 0.05 - 1e-9)


def test_welch_coverage_of_the_confidence_interval() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        a, b = rng.normal(0, 1, 30), rng.normal(0.3, 2, 50)
        r = welch(30, a.mean(), a.var(ddof=1), 50, b.mean(), b.var(ddof=1))
        hits += r.ci_low <= 0.3 <= r.ci_high
    assert 0.92 <= hits / 400 <= 0.98


def test_sample_ratio_mismatch() -> None:
    assert sample_ratio_mismatch(5000, 5000, 0.5) == pytest.approx(1.0)
    assert sample_ratio_mismatch(5200, 4800, 0.5) < 0.001
    assert sample_ratio_mismatch(900, 100, 0.9) == pytest.approx(1.0)
    assert sample_ratio_mismatch(0, 0, 0.5) == 1.0


def test_welch_degrees_of_freedom_survive_tiny_variances() -> None:
    # Squared, variances this small underflow to zero (the unscaled formula divided by it).
    r = welch(3, 0.0, 1e-170, 4, 1.0, 2e-170)
    u, w = 1 / 3, 2 / 4  # the same terms scaled by 1e170: Welch-Satterthwaite is scale-free
    assert r.df == pytest.approx((u + w) ** 2 / (u**2 / 2 + w**2 / 3), rel=1e-12)


def mixture_log_lr(d: float, v: float, tau2: float) -> float:
    """log of the integral over theta of N(d; theta, V) / N(d; 0, V) x N(theta; 0, tau^2)."""
    centre = d * tau2 / (v + tau2)
    sd = math.sqrt(v * tau2 / (v + tau2))

    def log_f(theta: float) -> float:
        return (
            (d * d - (d - theta) ** 2) / (2 * v)
            - theta * theta / (2 * tau2)
            - 0.5 * math.log(2 * math.pi * tau2)
        )

    top = log_f(centre)
    area, _ = integrate.quad(
        lambda t: math.exp(log_f(t) - top), centre - 40 * sd, centre + 40 * sd, points=[centre]
    )
    return top + math.log(area)


arm = st.lists(st.floats(-100, 100), min_size=2, max_size=200)


@settings(max_examples=200, deadline=None)
@given(arm, arm)
def test_msprt_matches_the_mixture_integral(a: list[float], b: list[float]) -> None:
    xa, xb = np.array(a), np.array(b)
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    r = msprt(len(a), float(xa.mean()), va, len(b), float(xb.mean()), vb)
    v = va / len(a) + vb / len(b)
    if v <= 1e-12:
        return
    pooled = ((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2)
    tau2 = 0.01 * pooled
    d = float(xb.mean() - xa.mean())
    expected = mixture_log_lr(d, v, tau2)
    assert r.log_likelihood_ratio == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert r.p_value == pytest.approx(min(1.0, math.exp(-expected)), rel=1e-6, abs=1e-12)
    # The confidence sequence is the set of differences the test does not reject.
    assert r.ci_low <= d <= r.ci_high
    if abs(r.p_value - 0.05) > 1e-6:
        assert (r.p_value < 0.05) == (not r.ci_low <= 0 <= r.ci_high)


def _peeking(test: str, sims: int, seed: int = 7) -> float:
    """Share of A/A tests declared significant at any of 50 looks (every 20 results per arm)."""
    rng = np.random.default_rng(seed)
    n_max, step, hits = 1000, 20, 0
    for _ in range(sims):
        a, b = rng.normal(3, 1, n_max), rng.normal(3, 1, n_max)
        sa, sb, qa, qb = np.cumsum(a), np.cumsum(b), np.cumsum(a * a), np.cumsum(b * b)
        for n in range(step, n_max + 1, step):
            ma, mb = sa[n - 1] / n, sb[n - 1] / n
            va, vb = (qa[n - 1] - n * ma * ma) / (n - 1), (qb[n - 1] - n * mb * mb) / (n - 1)
            f = welch if test == "welch" else msprt
            if f(n, ma, va, n, mb, vb).p_value < 0.05:
                hits += 1
                break
    return hits / sims


def test_sequential_test_survives_peeking_where_welch_does_not() -> None:
    """Fixed seed: Welch checked 50 times declares ~30% false winners, the mSPRT under 5%."""
    assert _peeking("welch", 200) > 0.2
    assert _peeking("msprt", 200) <= 0.05


def test_msprt_edges() -> None:
    assert math.isnan(msprt(1, 0.0, 1.0, 5, 1.0, 1.0).p_value)
    assert msprt(5, 2.0, 0.0, 5, 2.0, 0.0).p_value == 1.0
    assert msprt(5, 2.0, 0.0, 5, 3.0, 0.0).p_value == 0.0
    # A large true difference is found; a tiny sample of it is not yet.
    assert msprt(2000, 0.0, 1.0, 2000, 0.3, 1.0).p_value < 1e-6
    assert msprt(3, 0.0, 1.0, 3, 0.3, 1.0).p_value == 1.0


def test_msprt_with_vanishing_variances_does_not_divide_by_zero() -> None:
    # Found by hypothesis: V x (V + tau^2) underflowed to 0 for V near 1e-197.
    a, b = np.array([0.0, 0.0]), np.array([0.0, 1.4890731303617704e-98])
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    r = msprt(2, 0.0, va, 2, float(b.mean()), vb)
    # Scale-free: the same arms scaled by 1e98 give the same likelihood ratio and p-value.
    s = msprt(2, 0.0, va * 1e196, 2, float(b.mean()) * 1e98, vb * 1e196)
    assert r.log_likelihood_ratio == pytest.approx(s.log_likelihood_ratio, rel=1e-9)
    assert r.p_value == pytest.approx(s.p_value, rel=1e-9)
    assert r.ci_low <= r.difference <= r.ci_high
    assert r.ci_high - r.ci_low == pytest.approx((s.ci_high - s.ci_low) * 1e-98, rel=1e-9)
