"""The vendored CLINC150 data and its federated user partitions."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.clinc150 import DATA_DIR, load_clinc150, user_partitions

ROOT = Path(__file__).resolve().parent.parent


def test_official_splits_and_sizes() -> None:
    data = load_clinc150()
    assert data.num_intents == 150 and "oos" not in data.intents
    assert list(data.intents) == sorted(data.intents)
    assert (len(data.train), len(data.val), len(data.test)) == (15_000, 3_000, 4_500)
    assert (len(data.oos_train), len(data.oos_val), len(data.oos_test)) == (100, 100, 1_000)
    for split, per_intent in ((data.train, 100), (data.val, 20), (data.test, 30)):
        assert np.bincount(split.labels, minlength=150).tolist() == [per_intent] * 150
    assert sorted(i for names in data.domains.values() for i in names) == sorted(data.intents)
    # A known row of the published file: the first training query.
    first = data.train.texts[0]
    assert first.startswith("what expression would i use to say i love you")
    assert data.intents[int(data.train.labels[0])] == "translate"


def test_vendored_files_ship_in_the_package() -> None:
    """Every vendored file matches a package-data pattern, so wheels and installs carry it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["common.data"]
    package_dir = ROOT / "common" / "data"
    files = [p.relative_to(package_dir).as_posix() for p in DATA_DIR.iterdir()]
    assert {"LICENSE", "data_full.json.gz", "domains.json"} <= {p.name for p in DATA_DIR.iterdir()}
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name
    # About 0.3 MB compressed, as promised in the README.
    assert (DATA_DIR / "data_full.json.gz").stat().st_size < 400_000


def test_users_are_disjoint_complete_and_sized() -> None:
    labels = load_clinc150().train.labels
    users = user_partitions(labels, 100, alpha=0.5, seed=3)
    assert len(users) == 100
    every = np.concatenate([np.concatenate([u.train, u.heldout]) for u in users])
    assert np.array_equal(np.sort(every), np.arange(15_000))  # each example exactly once
    for u in users:
        assert len(u.train) + len(u.heldout) == 150
        assert len(u.heldout) == 30  # 20% held out
        assert not np.intersect1d(u.train, u.heldout).size


def test_partition_is_deterministic_by_seed() -> None:
    labels = load_clinc150().train.labels
    a = user_partitions(labels, 40, alpha=0.5, seed=1)
    b = user_partitions(labels, 40, alpha=0.5, seed=1)
    c = user_partitions(labels, 40, alpha=0.5, seed=2)
    assert all(
        np.array_equal(x.train, y.train) and np.array_equal(x.heldout, y.heldout)
        for x, y in zip(a, b, strict=True)
    )
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c, strict=True))


def test_small_alpha_concentrates_each_user_on_few_intents() -> None:
    labels = load_clinc150().train.labels

    def mean_top5_share(alpha: float) -> float:
        users = user_partitions(labels, 100, alpha=alpha, seed=0)
        shares = []
        for u in users:
            counts = np.sort(np.bincount(labels[np.concatenate([u.train, u.heldout])]))[::-1]
            shares.append(counts[:5].sum() / counts.sum())
        return float(np.mean(shares))

    # A user's 150 examples cannot come from fewer than 2 intents (100 each): shares stay < 1.
    skewed, default, iid = mean_top5_share(0.1), mean_top5_share(0.5), mean_top5_share(1000.0)
    assert skewed > 0.45 and default > 0.2 and iid < 0.16


@settings(max_examples=40, deadline=None)
@given(
    classes=st.integers(1, 12),
    per_class=st.integers(1, 30),
    users=st.integers(1, 40),
    alpha=st.floats(0.01, 100.0),
    holdout=st.sampled_from([0.0, 0.2, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_partition_properties(
    classes: int, per_class: int, users: int, alpha: float, holdout: float, seed: int
) -> None:
    labels = np.repeat(np.arange(classes), per_class)
    if len(labels) < 2 * users:
        with pytest.raises(ValueError, match="cannot give"):
            user_partitions(labels, users, alpha, seed, holdout)
        return
    shards = user_partitions(labels, users, alpha, seed, holdout)
    sizes = [len(s.train) + len(s.heldout) for s in shards]
    assert sum(sizes) == len(labels) and max(sizes) - min(sizes) <= 1
    joined = np.concatenate([np.concatenate([s.train, s.heldout]) for s in shards])
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    for s, n in zip(shards, sizes, strict=True):
        assert len(s.heldout) == int(np.floor(holdout * n + 0.5))


def test_partition_refuses_bad_requests() -> None:
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(ValueError, match="num_users"):
        user_partitions(labels, 0)
    with pytest.raises(ValueError, match="alpha"):
        user_partitions(labels, 3, alpha=0.0)
    with pytest.raises(ValueError, match="holdout"):
        user_partitions(labels, 3, holdout_fraction=1.0)
