"""DP-SGD's Gaussian noise generator (common.rng.GaussianNoise) against the normal distribution."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from common.rng import GaussianNoise, box_muller_


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


def _reference(seed: int, size: int, fills: int, std: float) -> list[np.ndarray]:
    """Box-Muller in float64 from an independently made keystream (same key and counter)."""
    key = hashlib.sha256(b"xeno-gaussian-noise" + seed.to_bytes(16, "big", signed=True))
    h = (size + 1) // 2
    stream = Cipher(algorithms.AES(key.digest()[:16]), modes.CTR(bytes(16))).encryptor()
    out = []
    for _ in range(fills):
        words = np.frombuffer(stream.update(bytes(8 * h)), np.uint32)
        k = (words[:h] & 0x7FFFFFFF).astype(np.float64)
        b = words[h:].view(np.int32).astype(np.float64)
        r = std * np.sqrt(-2.0 * np.log((k + 0.5) * 2.0**-31))
        theta = 2.0 * math.pi * b * 2.0**-32
        out.append(np.concatenate([r * np.cos(theta), (r * np.sin(theta))[: size - h]]))
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(-(2**100), 2**100),
    size=st.integers(1, 3000),
    std=st.floats(1e-3, 1e3),
)
def test_the_float32_transform_is_box_muller_of_the_keystream(
    seed: int, size: int, std: float
) -> None:
    """Each draw, over successive fills, is float64 Box-Muller of its keystream words."""
    noise = GaussianNoise(size, seed=seed)
    for want in _reference(seed, size, 2, std):
        got = noise.fill(np.empty(size, np.float32), std).astype(np.float64)
        # float32 rounding of k (above 2^24), of theta, and of the operations: a few ulps of std.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * std)


def test_the_extreme_words_give_the_tails_and_zero_without_nans() -> None:
    lowest, highest = -(2**31), 2**31 - 1
    a = torch.tensor(
        [0, lowest, highest, -1, 1 << 30], dtype=torch.int32
    )  # k = 0, 0, max, max, 2^30
    b = torch.tensor([0, 1 << 30, lowest, 0, -(1 << 30)], dtype=torch.int32)  # 0, pi/2, -pi, ...
    out = torch.empty(10)
    box_muller_(a, b.clone(), out, 2.0, torch.empty(5), torch.empty(5))
    tail = 2.0 * math.sqrt(64 * math.log(2))  # u = 2^-32: 6.66 standard deviations
    r_half = 2.0 * math.sqrt(-2 * math.log((2**30 + 0.5) * 2.0**-31))
    want_cos = [tail, 0.0, 0.0, 0.0, 0.0]
    want_sin = [0.0, tail, 0.0, 0.0, -r_half]
    np.testing.assert_allclose(out[:5].numpy(), want_cos, atol=2e-6)
    np.testing.assert_allclose(out[5:].numpy(), want_sin, atol=2e-6, rtol=1e-6)
    assert torch.isfinite(out).all()


def test_fill_tensor_writes_a_torch_buffer_in_place_and_refuses_the_wrong_one() -> None:
    noise, again = GaussianNoise(1001, seed=3), GaussianNoise(1001, seed=3)
    buf = torch.empty(1001)
    assert noise.fill_tensor(buf, 1.5) is buf
    np.testing.assert_array_equal(buf.numpy(), again.fill(np.empty(1001, np.float32), 1.5))
    for bad in (torch.empty(1000), torch.empty(1001, dtype=torch.float64), torch.empty(2002)[::2]):
        with pytest.raises(ValueError, match="contiguous float32 vector of length 1001"):
            noise.fill_tensor(bad, 1.0)
