import numpy as np
import pytest

from common.data import dirichlet_partition, federated_digits


def test_partition_is_disjoint_complete_and_reproducible() -> None:
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_partition(labels, 7, alpha=0.5, seed=1)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(500))
    assert all(len(p) >= 2 for p in parts)
    again = dirichlet_partition(labels, 7, alpha=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 200)

    def mean_max_share(alpha: float) -> float:
        parts = dirichlet_partition(labels, 10, alpha=alpha, seed=0)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_federated_digits_holds_out_twenty_percent() -> None:
    fed = federated_digits(10, alpha=0.5, seed=0)
    train_total = sum(len(c) for c in fed.clients)
    assert len(fed.test) == round(0.2 * 1797)
    assert train_total + len(fed.test) == 1797
    assert fed.clients[0].x.dtype == np.float32 and fed.clients[0].x.max() <= 1.0


def test_partition_refuses_impossible_requests() -> None:
    with pytest.raises(ValueError):
        dirichlet_partition(np.zeros(3, dtype=int), 5, alpha=0.5, seed=0)
    with pytest.raises(ValueError):
        dirichlet_partition(np.zeros(30, dtype=int), 5, alpha=0.0, seed=0)
