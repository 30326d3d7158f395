"""Each strategy against a plain per-element reference of its paper's update rule."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from server.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    FitInstructions,
    make_strategy,
)

vectors = arrays(np.float32, 6, elements=st.floats(-2, 2, width=32))


def reference_adaptive(kind: str, x, deltas, eta=0.01, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021, Algorithm 2, one coordinate at a time."""
    x = [float(v) for v in x]
    m = [0.0] * len(x)
    v = [tau**2] * len(x)
    for delta in deltas:
        for i, d in enumerate(delta):
            d = float(d)
            m[i] = b1 * m[i] + (1 - b1) * d
            if kind == "adagrad":
                v[i] = v[i] + d * d
            elif kind == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            else:
                sign = (v[i] - d * d > 0) - (v[i] - d * d < 0)
                v[i] = v[i] - (1 - b2) * d * d * sign
            x[i] = x[i] + eta * m[i] / (math.sqrt(v[i]) + tau)
    return np.array(x)


@settings(max_examples=30, deadline=None)
@given(x=vectors, d1=vectors, d2=vectors, d3=vectors)
@pytest.mark.parametrize(
    ("cls", "kind"), [(FedAdagrad, "adagrad"), (FedAdam, "adam"), (FedYogi, "yogi")]
)
def test_adaptive_strategies_match_reddi_algorithm(cls, kind, x, d1, d2, d3) -> None:
    strategy = cls()
    strategy.initialize(x)
    params = x
    for d in (d1, d2, d3):
        params = strategy.aggregate_fit(params, d)
    expected = reference_adaptive(kind, x, [d1, d2, d3])
    np.testing.assert_allclose(params, expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(x=vectors, d1=vectors, d2=vectors)
def test_fedavgm_matches_momentum_reference(x, d1, d2) -> None:
    strategy = FedAvgM(server_lr=0.5, momentum=0.9)
    out = strategy.aggregate_fit(strategy.aggregate_fit(x, d1), d2)
    v1 = d1.astype(np.float64)
    x1 = x + 0.5 * v1
    v2 = 0.9 * v1 + d2
    np.testing.assert_allclose(out, x1 + 0.5 * v2, rtol=1e-5, atol=1e-5)


def test_fedavg_applies_the_mean_update() -> None:
    x = np.array([1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(
        FedAvg().aggregate_fit(x, np.array([0.5, -1.0], np.float32)), [1.5, 1.0]
    )


def test_fedprox_sends_mu_to_devices_and_averages_like_fedavg() -> None:
    strategy = FedProx(FitInstructions(local_epochs=2), proximal_mu=0.1)
    fit = strategy.configure_fit(1)
    assert fit.proximal_mu == pytest.approx(0.1) and fit.local_epochs == 2
    x = np.ones(3, dtype=np.float32)
    np.testing.assert_allclose(strategy.aggregate_fit(x, x), 2 * x)


def test_state_dict_roundtrip_continues_identically() -> None:
    x = np.zeros(4, dtype=np.float32)
    d = np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float32)
    a = FedAdam()
    a.aggregate_fit(x, d)
    b = FedAdam()
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.aggregate_fit(x, d), b.aggregate_fit(x, d))


def test_make_strategy_names_and_errors() -> None:
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert make_strategy(name).name == name
    with pytest.raises(ValueError, match="choose one of"):
        make_strategy("fedmagic")
    with pytest.raises(ValueError):
        FedAvgM(momentum=1.5)
