"""Statistics of the model lifecycle: trend tests and two-sample comparisons (pure functions).

- `trend`: Mann-Kendall (Kendall's tau of the values against their order, scipy's
  `kendalltau`, which handles ties) with the Theil-Sen slope (`theilslopes`); a
  trend is "improving" or "degrading" only when p < alpha, in the metric's good
  direction or against it, else "stable". Theil-Sen needs every pair of points
  (n^2 / 2 slopes), so above `THEIL_SEN_MAX_POINTS` points the slope is estimated
  on that many evenly strided points; the test itself always uses every point.
- `welch`: Welch's unequal-variance t-test of two arms from their counts, means and
  variances (scipy's `ttest_ind_from_stats`) with the 95% confidence interval of
  the difference (Welch-Satterthwaite degrees of freedom).
- `msprt`: the mixture sequential probability ratio test (Robbins 1970; Johari,
  Koomen, Pekelis and Walsh, "Peeking at A/B tests", KDD 2017) of the same
  difference: an always-valid p-value and confidence sequence, so an analysis may be
  run after every result and stopped at the first significant one with the error
  rate still at most alpha. Welch's p-value holds only at a horizon fixed in advance:
  looking repeatedly and stopping when it dips below 0.05 declares far more false
  winners (tests/test_lifecycle_stats.py measures both).
- `sample_ratio_mismatch`: chi-square goodness of fit of the arm counts against
  the configured split (a broken assignment shows as p < 0.001).
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "THEIL_SEN_MAX_POINTS",
    "Direction",
    "MsprtResult",
    "Trend",
    "TrendResult",
    "WelchResult",
    "direction_of",
    "msprt",
    "sample_ratio_mismatch",
    "trend",
    "welch",
]

THEIL_SEN_MAX_POINTS = 2000


def _scipy_stats() -> Any:
    # Imported on first use: scipy.stats costs about a second, and the server starts
    # (and restarts after a crash) without needing it.
    from scipy import stats

    return stats


class Direction(enum.Enum):
    """Which way a metric gets better."""

    HIGHER = "higher"
    LOWER = "lower"


class Trend(enum.Enum):
    IMPROVING = "improving"
    DEGRADING = "degrading"
    STABLE = "stable"


_LOWER_IS_BETTER = ("loss", "latency", "error", "perplexity", "dropout", "seconds", "time")


def direction_of(metric: str) -> Direction:
    """Lower is better for losses, errors, latencies, durations and dropouts; else higher."""
    name = metric.lower()
    return Direction.LOWER if any(w in name for w in _LOWER_IS_BETTER) else Direction.HIGHER


@dataclass(frozen=True)
class TrendResult:
    trend: Trend
    direction: Direction
    n: int
    tau: float
    p_value: float
    # Theil-Sen: change per observation, with its 95% confidence interval.
    slope: float
    slope_low: float
    slope_high: float
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trend"] = self.trend.value
        out["direction"] = self.direction.value
        return out


def trend(values: np.ndarray, direction: Direction, alpha: float = 0.05) -> TrendResult:
    """Mann-Kendall trend of values (in time order) with the Theil-Sen slope."""
    y = np.asarray(values, dtype=np.float64)
    n = int(y.size)
    if n < 3 or np.all(y == y[0]):
        return TrendResult(Trend.STABLE, direction, n, 0.0, 1.0, 0.0, 0.0, 0.0, alpha)
    x = np.arange(n, dtype=np.float64)
    sps = _scipy_stats()
    tau, p = sps.kendalltau(x, y)
    tau, p = float(tau), float(p)
    if not math.isfinite(p):
        tau, p = 0.0, 1.0
    if n > THEIL_SEN_MAX_POINTS:
        idx = np.linspace(0, n - 1, THEIL_SEN_MAX_POINTS).round().astype(np.int64)
        ts = sps.theilslopes(y[idx], x[idx])
    else:
        ts = sps.theilslopes(y, x)
    slope, low, high = float(ts[0]), float(ts[2]), float(ts[3])
    result = Trend.STABLE
    if p < alpha and tau != 0:
        rising = tau > 0
        good = rising if direction is Direction.HIGHER else not rising
        result = Trend.IMPROVING if good else Trend.DEGRADING
    return TrendResult(result, direction, n, tau, p, slope, low, high, alpha)


@dataclass(frozen=True)
class WelchResult:
    difference: float  # mean_b - mean_a
    ci_low: float
    ci_high: float
    p_value: float
    t: float
    df: float


def welch(
    n_a: int, mean_a: float, var_a: float, n_b: int, mean_b: float, var_b: float
) -> WelchResult:
    """Welch's t-test of mean_b - mean_a; sample variances (ddof = 1). NaN p below 2 per arm."""
    diff = mean_b - mean_a
    if n_a < 2 or n_b < 2:
        return WelchResult(diff, math.nan, math.nan, math.nan, math.nan, math.nan)
    se2 = var_a / n_a + var_b / n_b
    if se2 <= 0:
        # Both arms constant: the difference is exact.
        p = 1.0 if diff == 0 else 0.0
        return WelchResult(
            diff, diff, diff, p, math.copysign(math.inf, diff) if diff else 0.0, math.nan
        )
    sps = _scipy_stats()
    res = sps.ttest_ind_from_stats(
        mean_b, math.sqrt(var_b), n_b, mean_a, math.sqrt(var_a), n_a, equal_var=False
    )
    # Welch-Satterthwaite on the terms scaled by the larger one: the formula is scale-free,
    # and squaring variances near 1e-170 unscaled underflows the denominator to zero.
    u, w = var_a / n_a, var_b / n_b
    top = max(u, w)
    u, w = u / top, w / top
    df = (u + w) ** 2 / (u**2 / (n_a - 1) + w**2 / (n_b - 1))
    half = float(sps.t.ppf(0.975, df)) * math.sqrt(se2)
    return WelchResult(diff, diff - half, diff + half, float(res.pvalue), float(res.statistic), df)


@dataclass(frozen=True)
class MsprtResult:
    difference: float  # mean_b - mean_a
    # Always-valid p-value: min(1, 1 / mixture likelihood ratio).
    p_value: float
    # The always-valid (1 - alpha) confidence sequence of the difference at this look.
    ci_low: float
    ci_high: float
    log_likelihood_ratio: float
    mixing_sd: float


# The normal mixture's scale, in standard deviations of one observation: the effect size
# the test is most sensitive to (Johari et al. choose it from earlier experiments; a tenth
# of a standard deviation is the small effect A/B tests of models look for).
MSPRT_EFFECT_SD = 0.1


def msprt(
    n_a: int,
    mean_a: float,
    var_a: float,
    n_b: int,
    mean_b: float,
    var_b: float,
    alpha: float = 0.05,
    effect_sd: float = MSPRT_EFFECT_SD,
) -> MsprtResult:
    """Normal-mixture SPRT of H0: mean_b = mean_a, from each arm's count, mean and variance.

    With V = var_a / n_a + var_b / n_b the variance of the difference d and a N(0, tau^2)
    mixture over the true difference, the likelihood ratio is
    sqrt(V / (V + tau^2)) exp(d^2 tau^2 / (2 V (V + tau^2))), tau = effect_sd x the pooled
    standard deviation of one observation. By Ville's inequality it exceeds 1 / alpha
    at any look with probability at most alpha under H0; the variances are plug-in
    estimates, so that holds as the arms grow (as in Johari et al.).
    """
    diff = mean_b - mean_a
    nan = math.nan
    if n_a < 2 or n_b < 2:
        return MsprtResult(diff, nan, nan, nan, nan, nan)
    v = var_a / n_a + var_b / n_b
    if v <= 0:
        p = 1.0 if diff == 0 else 0.0
        return MsprtResult(diff, p, diff, diff, 0.0 if diff == 0 else math.inf, 0.0)
    pooled = ((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2)
    tau2 = effect_sd**2 * pooled
    special = _scipy_special()
    # log1p keeps log((V + tau^2) / V) exact when tau^2 is tiny next to V (few results).
    log_ratio_vars = float(special.log1p(tau2 / v))
    # Scaled by sqrt(V) first: with tiny variances V x (V + tau^2) underflows to zero
    # while d^2 / V and tau^2 / (V + tau^2) are ordinary numbers.
    z = diff / math.sqrt(v)
    shrink = tau2 / (v + tau2)
    log_lr = -0.5 * log_ratio_vars + 0.5 * z * z * shrink
    p = min(1.0, math.exp(-log_lr))
    half = math.sqrt(v) * math.sqrt((log_ratio_vars - 2 * math.log(alpha)) / shrink)
    return MsprtResult(diff, p, diff - half, diff + half, log_lr, math.sqrt(tau2))


def _scipy_special() -> Any:
    from scipy import special

    return special


def sample_ratio_mismatch(count_a: int, count_b: int, share_a: float) -> float:
    """p-value of the chi-square test that the arm counts follow the configured split."""
    total = count_a + count_b
    if total == 0:
        return 1.0
    expected = [total * share_a, total * (1 - share_a)]
    return float(_scipy_stats().chisquare([count_a, count_b], expected).pvalue)
