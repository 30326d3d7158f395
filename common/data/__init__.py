"""Datasets and partitioners for simulated federations.

`federated_digits` splits scikit-learn's bundled digits data (no download)
into a held-out test set and per-client shards drawn by a seeded
Dirichlet label partition: every process that calls it with the same
arguments gets the same shards, so a device only needs its index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "FederatedData", "digits_split", "dirichlet_partition", "federated_digits"]


@dataclass(frozen=True)
class Dataset:
    """Features (float32, n x f; or int64 bucket ids padded with -1 for text) and labels (n)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class FederatedData:
    clients: list[Dataset]
    test: Dataset
    num_classes: int
    input_dim: int


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Split indices by label: each class is spread over clients with Dirichlet(alpha) shares.

    Small alpha gives skewed (non-IID) label mixes. Redraws until every
    client holds at least min_size examples, so no device is left empty.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be at least 1")
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    if len(labels) < num_clients * min_size:
        raise ValueError(
            f"{len(labels)} examples cannot give {num_clients} clients {min_size} each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise RuntimeError("could not draw a partition with every client non-empty; raise alpha")


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """Digits (8x8 pixels scaled to [0, 1], 10 classes, 1797 images) as (train, test)."""
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return Dataset(x[train_idx], y[train_idx]), Dataset(x[test_idx], y[test_idx])


def federated_digits(
    num_clients: int, alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2
) -> FederatedData:
    """Digits split into a held-out test set and num_clients Dirichlet(alpha) shards."""
    train, test = digits_split(seed, test_fraction)
    shards = dirichlet_partition(train.y, num_clients, alpha, seed)
    return FederatedData(
        clients=[Dataset(train.x[s], train.y[s]) for s in shards],
        test=test,
        num_classes=10,
        input_dim=64,
    )
