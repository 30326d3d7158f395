"""Byzantine-robust aggregation rules over a stack of individual updates (plain rounds only).

Pure numpy over an (n, d) array whose rows are the round's updates; no Python
loop over parameters. Each rule bounds what a minority of hostile updates can do
to the result, which a mean cannot (one scaled update moves it arbitrarily far):

* coordinate-wise median;
* coordinate-wise trimmed mean (Yin, Chen, Kannan, Bartlett, ICML 2018): per
  coordinate, drop the floor(beta n) largest and smallest values, average the rest;
* Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017):
  score each update by the summed squared distances to its n - f - 2 nearest
  others, and take the lowest-scoring one (Krum) or the mean of the m lowest
  (Multi-Krum). The guarantee needs n > 2f + 2.

They need each device's update, so they cannot run under secure aggregation
(which only reveals the sum); the server refuses that combination. Holding the n
updates of a round costs n x d x 4 bytes of server memory (10 devices of a 1M-
parameter model: 40 MB), where the streaming mean needs O(d).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "coordinate_median",
    "krum_scores",
    "multi_krum",
    "pairwise_sq_distances",
    "trimmed_mean",
]

# Columns per block of the Gram matrix: bounds the float64 copy to n x 64k x 8 bytes.
_BLOCK = 1 << 16


def _check(updates: np.ndarray) -> int:
    if updates.ndim != 2 or updates.shape[0] < 1:
        raise ValueError("robust aggregation needs a non-empty (n, d) stack of updates")
    return int(updates.shape[0])


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Per-coordinate median (the mean of the two middle values for even n).

    A sort along the device axis: about twice as fast as np.median's partition on a
    C-ordered (n, d) stack (benchmarks/robust.py).
    """
    n = _check(updates)
    ordered = np.sort(updates, axis=0)
    lo, hi = (n - 1) // 2, n // 2
    out: np.ndarray = ((ordered[lo].astype(np.float64) + ordered[hi]) / 2).astype(np.float32)
    return out


def trimmed_mean(updates: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per coordinate, the mean after dropping the floor(beta n) largest and smallest values."""
    n = _check(updates)
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("the trim fraction must be in [0, 0.5)")
    k = math.floor(trim_fraction * n)
    if k == 0:
        mean: np.ndarray = updates.mean(axis=0, dtype=np.float64).astype(np.float32)
        return mean
    ordered = np.sort(updates, axis=0)
    out: np.ndarray = ordered[k : n - k].mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


def pairwise_sq_distances(updates: np.ndarray) -> np.ndarray:
    """(n, n) squared Euclidean distances, from a float64 Gram matrix built block by block."""
    n, d = updates.shape
    gram = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, _BLOCK):  # blocks of 65,536 parameters, not single ones
        block = updates[:, start : start + _BLOCK].astype(np.float64)
        gram += block @ block.T
    sq = np.diag(gram)
    dist: np.ndarray = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(updates: np.ndarray, byzantine: int) -> np.ndarray:
    """Each update's sum of squared distances to its n - f - 2 nearest other updates."""
    n = _check(updates)
    if byzantine < 0:
        raise ValueError("the number of Byzantine devices f must be non-negative")
    if n <= 2 * byzantine + 2:
        raise ValueError(
            f"Krum with f = {byzantine} needs more than {2 * byzantine + 2} updates, got {n}"
        )
    dist = pairwise_sq_distances(updates)
    np.fill_diagonal(dist, np.inf)  # an update is not its own neighbour
    nearest = np.sort(dist, axis=1)[:, : n - byzantine - 2]
    scores: np.ndarray = nearest.sum(axis=1)
    return scores


def multi_krum(updates: np.ndarray, byzantine: int, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the m lowest-scoring updates, their indices); m = 1 is Krum.

    Ties go to the lower index (a stable sort), so the result is deterministic.
    """
    n = _check(updates)
    if not 1 <= m <= n:
        raise ValueError(f"Multi-Krum selects between 1 and n = {n} updates, not {m}")
    scores = krum_scores(updates, byzantine)
    chosen = np.argsort(scores, kind="stable")[:m]
    mean: np.ndarray = updates[chosen].mean(axis=0, dtype=np.float64).astype(np.float32)
    return mean, chosen
