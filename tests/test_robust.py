"""Robust aggregation and server-side clipping of plain rounds.

Each rule against a plain per-element reference written from its paper
(hypothesis), then through the round coordinator, then the configurations the
server refuses.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from server.app import ServerConfig, XenoServer
from server.rounds import RoundConfig, RoundCoordinator
from server.store import Store
from server.strategies import CoordinateMedian, Krum, TrimmedMean, make_strategy
from server.strategies.robust import coordinate_median, krum_scores, multi_krum, trimmed_mean
from tests.test_coordinator import MANIFEST, Clock, start_round, upload

D = MANIFEST.total_elements


@st.composite
def stacks(draw: st.DrawFn, min_n: int = 1, max_n: int = 9) -> np.ndarray:
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 7))
    return draw(arrays(np.float32, (n, d), elements=st.floats(-1e3, 1e3, width=32)))


def ref_median(rows: list[list[float]]) -> list[float]:
    return [statistics.median(col) for col in zip(*rows, strict=True)]


def ref_trimmed(rows: list[list[float]], beta: float) -> list[float]:
    """Yin et al. 2018, Definition 2: drop the beta n largest and smallest, average the rest."""
    k = math.floor(beta * len(rows))
    out = []
    for col in zip(*rows, strict=True):
        kept = sorted(col)[k : len(col) - k]
        out.append(math.fsum(kept) / len(kept))
    return out


def ref_krum_scores(rows: list[list[float]], f: int) -> list[float]:
    """Blanchard et al. 2017: sum of squared distances to the n - f - 2 closest others."""
    n = len(rows)
    scores = []
    for i in range(n):
        dists = sorted(
            math.fsum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True))
            for j in range(n)
            if j != i
        )
        scores.append(math.fsum(dists[: n - f - 2]))
    return scores


def _rows(stack: np.ndarray) -> list[list[float]]:
    return [[float(x) for x in row] for row in stack]


@settings(max_examples=200, deadline=None)
@given(stacks())
def test_median_matches_the_per_element_reference(stack: np.ndarray) -> None:
    expected = np.array(ref_median(_rows(stack)), dtype=np.float32)
    np.testing.assert_allclose(coordinate_median(stack), expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(stacks(), st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.34, 0.49]))
def test_trimmed_mean_matches_the_per_element_reference(stack: np.ndarray, beta: float) -> None:
    expected = np.array(ref_trimmed(_rows(stack), beta), dtype=np.float32)
    np.testing.assert_allclose(trimmed_mean(stack, beta), expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=200, deadline=None)
@given(stacks(min_n=4, max_n=9), st.integers(0, 3), st.integers(1, 9))
def test_krum_and_multi_krum_match_the_reference(stack: np.ndarray, f: int, m: int) -> None:
    n = stack.shape[0]
    if n <= 2 * f + 2:
        with pytest.raises(ValueError, match="needs more than"):
            krum_scores(stack, f)
        return
    m = min(m, n)
    rows = _rows(stack)
    ref = ref_krum_scores(rows, f)
    scores = krum_scores(stack, f)
    scale = max(1.0, max(ref))
    np.testing.assert_allclose(scores, ref, rtol=1e-6, atol=1e-9 * scale)
    mean, chosen = multi_krum(stack, f, m)
    # The m chosen are the m best by the reference's scores (up to float ties).
    cutoff = sorted(ref)[m - 1]
    assert all(ref[i] <= cutoff + 1e-6 * scale for i in chosen)
    assert len(set(chosen.tolist())) == m
    expected = [math.fsum(rows[i][j] for i in chosen) / m for j in range(stack.shape[1])]
    np.testing.assert_allclose(mean, np.array(expected, dtype=np.float32), rtol=1e-5, atol=1e-4)


def test_krum_never_picks_a_far_outlier() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 1, (9, 50)).astype(np.float32)
    poisoned = np.vstack([honest, np.full((1, 50), 100.0, dtype=np.float32)])
    _, chosen = multi_krum(poisoned, 1, 8)
    assert 9 not in chosen


def test_make_strategy_builds_the_robust_ones() -> None:
    assert isinstance(make_strategy("median"), CoordinateMedian)
    trimmed = make_strategy("trimmed-mean", trim_fraction=0.2)
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim_fraction == 0.2
    krum = make_strategy("krum", byzantine=2)
    assert isinstance(krum, Krum) and krum.m == 1 and krum.byzantine == 2
    multi = make_strategy("multi-krum", byzantine=1, multi_krum_m=3)
    assert isinstance(multi, Krum) and multi.m == 3 and multi.name == "multi-krum"
    with pytest.raises(ValueError, match="trim"):
        make_strategy("trimmed-mean", trim_fraction=0.5)


# ------------------------------------------------------------------ through the coordinator


@pytest.fixture
def store(tmp_path: Path) -> Store:
    from common.models import ModelSpec

    s = Store(f"sqlite:///{tmp_path}/robust.db")
    s.create_schema()
    s.create_model("m", ModelSpec("mlp", {}), MANIFEST, "median", np.zeros(D, dtype=np.float32))
    for name in ["a", "b", "c", "d", "e"]:
        s.add_device(name, "0" * 64, {})
    return s


def _coordinator(store: Store, strategy, **cfg) -> tuple[RoundCoordinator, Clock]:
    clock = Clock()
    # availability_ttl_s as in test_coordinator.make: start_round advances the clock 5 s
    # after the check-ins, and a device stays available only that long after its last poll.
    config = RoundConfig(
        min_clients=2,
        clients_per_round=5,
        round_deadline_s=10,
        selection_window_s=1,
        availability_ttl_s=15,
        **cfg,
    )
    return RoundCoordinator(store, "m", strategy, config, clock=clock, rng=random.Random(0)), clock


def _round(coord: RoundCoordinator, clock: Clock, updates: dict[str, np.ndarray]) -> np.ndarray:
    tasks = start_round(coord, clock, sorted(updates))
    for device, vector in updates.items():
        upload(coord, device, tasks[device], vector, num_examples=1_000_000 if device == "e" else 5)
    summary = coord.step()
    assert summary is not None and summary.status == "completed", summary
    return coord.store.load_version("m", summary.version)


def _updates(rng: np.random.Generator, poison: float) -> dict[str, np.ndarray]:
    out = {d: rng.normal(0, 1, D).astype(np.float32) for d in "abcd"}
    out["e"] = np.full(D, poison, dtype=np.float32)  # claims a million examples, too
    return out


@pytest.mark.parametrize(
    ("strategy", "reference"),
    [
        (CoordinateMedian(), lambda s: np.array(ref_median(_rows(s)))),
        (TrimmedMean(trim_fraction=0.2), lambda s: np.array(ref_trimmed(_rows(s), 0.2))),
    ],
    ids=["median", "trimmed-mean"],
)
def test_a_robust_round_is_the_rule_applied_to_the_uploads(store: Store, strategy, reference):
    coord, clock = _coordinator(store, strategy)
    updates = _updates(np.random.default_rng(1), poison=1e6)
    new = _round(coord, clock, updates)
    stack = np.stack([updates[d] for d in sorted(updates)])
    np.testing.assert_allclose(new, reference(stack).astype(np.float32), rtol=1e-5, atol=1e-5)
    assert np.abs(new).max() < 10  # the poisoned upload moved nothing far


def test_a_krum_round_drops_the_outlier(store: Store) -> None:
    coord, clock = _coordinator(store, Krum(byzantine=1, m=3))
    updates = _updates(np.random.default_rng(2), poison=50.0)
    new = _round(coord, clock, updates)
    stack = np.stack([updates[d] for d in sorted(updates)])
    ref = ref_krum_scores(_rows(stack), 1)
    best = sorted(range(5), key=lambda i: (ref[i], i))[:3]
    assert 4 not in best
    np.testing.assert_allclose(new, stack[best].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_too_few_updates_for_krum_fail_the_round_cleanly(store: Store) -> None:
    coord, clock = _coordinator(store, Krum(byzantine=1))
    tasks = start_round(coord, clock, ["a", "b", "c"])
    for d in "abc":
        upload(coord, d, tasks[d], np.ones(D))
    clock.now += 20
    summary = coord.step()
    assert summary is not None and summary.status == "failed"
    assert (
        "krum" in summary.failure_reason and "needs more than 4 updates" in summary.failure_reason
    )
    assert coord.store.get_model("m").current_version == 1


def test_server_side_clipping_bounds_every_plain_update(store: Store) -> None:
    from server.strategies import FedAvg

    coord, clock = _coordinator(store, FedAvg(), update_clip_norm=1.0)
    big = np.full(D, 1e30, dtype=np.float32)  # finite, and its square overflows float32
    small = np.full(D, 0.1, dtype=np.float32)
    tasks = start_round(coord, clock, ["a", "b"])
    upload(coord, "a", tasks["a"], big, num_examples=1)
    upload(coord, "b", tasks["b"], small, num_examples=1)
    clock.now += 20
    summary = coord.step()
    assert summary is not None and summary.status == "completed"
    assert summary.metrics["updates_clipped"] == 1.0
    new = store.load_version("m", summary.version)
    expected = (np.full(D, 1 / math.sqrt(D)) + small) / 2
    np.testing.assert_allclose(new, expected, rtol=1e-5)


# ------------------------------------------------------------------ refused configurations


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_robust_strategies_are_refused_under_secure_aggregation(name: str, tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    config = ServerConfig(port=0, db=f"sqlite:///{db}", strategy=name, metrics_port=-1)
    with pytest.raises(ValueError, match=r"needs each device.s update.*--no-secagg"):
        XenoServer(config)
    assert not db.exists(), "a refused configuration created the database"


def test_robust_strategies_are_refused_with_user_level_dp(tmp_path: Path) -> None:
    config = ServerConfig(
        port=0,
        db=f"sqlite:///{tmp_path}/x.db",
        strategy="median",
        secagg=False,
        dp="central",
        dp_noise_multiplier=1.0,
        metrics_port=-1,
    )
    with pytest.raises(ValueError, match="not accounted for user-level DP"):
        XenoServer(config)
