"""DP-SGD's Gaussian noise generator (common.rng.GaussianNoise) against the normal distribution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.rng import GaussianNoise


def test_draws_are_standard_normal_by_kolmogorov_smirnov_and_tails() -> None:
    sizes = {1: 100_001, 2: 250_000, 3: 250_000}  # an odd size takes one cos without its sin
    draws = np.concatenate(
        [GaussianNoise(n, seed=s).fill(np.empty(n, np.float32), 1.0) for s, n in sizes.items()]
    ).astype(np.float64)
    assert stats.kstest(draws, "norm").pvalue > 1e-4
    assert abs(draws.mean()) < 5 / np.sqrt(draws.size)
    assert draws.std() == pytest.approx(1.0, abs=5 * np.sqrt(2 / draws.size))
    # Tails: P(|x| > 3) within 5 standard errors of the normal's 0.0027.
    p = 2 * stats.norm.sf(3.0)
    assert abs((np.abs(draws) > 3.0).mean() - p) < 5 * np.sqrt(p * (1 - p) / draws.size)


def test_successive_draws_are_independent_and_scaled() -> None:
    noise = GaussianNoise(50_000, seed=4)
    a = noise.fill(np.empty(50_000, np.float32), 2.5).astype(np.float64)
    b = noise.fill(np.empty(50_000, np.float32), 2.5).astype(np.float64)
    assert a.std() == pytest.approx(2.5, rel=0.02)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
    # The cos and sin halves of the same Box-Muller pairs are uncorrelated too.
    assert abs(np.corrcoef(a[:25_000], a[25_000:])[0, 1]) < 5 / np.sqrt(25_000)


def test_a_seed_replays_and_the_os_keyed_generator_does_not() -> None:
    def draw(seed: int | None) -> np.ndarray:
        return GaussianNoise(1001, seed=seed).fill(np.empty(1001, np.float32), 1.0)

    assert np.array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))
    assert not np.array_equal(draw(None), draw(None))
    assert np.all(np.isfinite(draw(None)))


def test_refuses_an_output_of_the_wrong_shape_or_type() -> None:
    noise = GaussianNoise(10, seed=0)
    with pytest.raises(ValueError, match="contiguous float32 vector of length 10"):
        noise.fill(np.empty(11, np.float32), 1.0)
    with pytest.raises(ValueError, match="contiguous float32 vector of length 10"):
        noise.fill(np.empty(10, np.float64), 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        GaussianNoise(0)
