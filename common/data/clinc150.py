"""CLINC150, the intent data set vendored with the project, and its federated user partitions.

The data (Larson et al., "An Evaluation Dataset for Intent Classification and
Out-of-Scope Prediction", EMNLP-IJCNLP 2019; CC BY 3.0, license beside the
file) ships inside the package under `vendor/clinc150/` as the gzip of the
original `data_full.json`; nothing is ever fetched at run time. The file's
SHA-256 is checked on load, so a damaged copy fails loudly instead of
training on something else.

`load_clinc150` gives the official splits: 15,000 / 3,000 / 4,500 in-scope
train / validation / test queries over 150 intents (100 / 20 / 30 per intent)
and 100 / 100 / 1,000 out-of-scope ones. Intents are numbered by their sorted
names, so label i means the same intent everywhere.

`user_partitions` turns the in-scope training split into simulated users:
each user draws a Dirichlet(alpha) mix over the intents and takes examples
without replacement (Hsu et al., 2019, "Measuring the effects of
non-identical data distribution for federated visual classification"), then
keeps a fifth of their own examples as personal held-out data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CLINC150_SHA256",
    "Clinc150",
    "IntentSplit",
    "UserShard",
    "load_clinc150",
    "user_partitions",
]

DATA_DIR = Path(__file__).resolve().parent / "vendor" / "clinc150"
CLINC150_SHA256 = "01cce723a1b3a2a342158c5b4545e5255bc167fa6037c8a827b1908e504a9014"
"""SHA-256 of vendor/clinc150/data_full.json.gz as copied from the published data."""

OOS = "oos"
"""The intent name of out-of-scope queries in the published files."""


@dataclass(frozen=True)
class IntentSplit:
    """In-scope queries and their intent indices (into Clinc150.intents)."""

    texts: tuple[str, ...]
    labels: np.ndarray  # int64, one per text

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> IntentSplit:
        return IntentSplit(tuple(self.texts[i] for i in indices), self.labels[indices])


@dataclass(frozen=True)
class Clinc150:
    """The "full" CLINC150 set: in-scope splits, out-of-scope splits, the intent names."""

    intents: tuple[str, ...]
    domains: dict[str, tuple[str, ...]]
    train: IntentSplit
    val: IntentSplit
    test: IntentSplit
    oos_train: tuple[str, ...]
    oos_val: tuple[str, ...]
    oos_test: tuple[str, ...]

    @property
    def num_intents(self) -> int:
        return len(self.intents)


@functools.cache
def load_clinc150() -> Clinc150:
    """The vendored data set, verified against its checksum (read once per process)."""
    raw = (DATA_DIR / "data_full.json.gz").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CLINC150_SHA256:
        raise RuntimeError(
            f"vendored CLINC150 is damaged: sha256 {digest}, expected {CLINC150_SHA256}"
        )
    data = json.loads(gzip.decompress(raw))
    domains_raw = json.loads((DATA_DIR / "domains.json").read_text(encoding="utf-8"))
    intents = tuple(sorted({intent for _, intent in data["train"]}))
    index = {name: i for i, name in enumerate(intents)}

    def in_scope(key: str) -> IntentSplit:
        rows = data[key]
        labels = np.fromiter((index[intent] for _, intent in rows), np.int64, len(rows))
        return IntentSplit(tuple(text for text, _ in rows), labels)

    def out_of_scope(key: str) -> tuple[str, ...]:
        if any(intent != OOS for _, intent in data[key]):
            raise RuntimeError(f"CLINC150 split {key} holds an in-scope query")
        return tuple(text for text, _ in data[key])

    return Clinc150(
        intents=intents,
        domains={d: tuple(names) for d, names in domains_raw.items()},
        train=in_scope("train"),
        val=in_scope("val"),
        test=in_scope("test"),
        oos_train=out_of_scope("oos_train"),
        oos_val=out_of_scope("oos_val"),
        oos_test=out_of_scope("oos_test"),
    )


@dataclass(frozen=True)
class UserShard:
    """One simulated user's examples (indices into the partitioned split)."""

    train: np.ndarray
    heldout: np.ndarray


def user_partitions(
    labels: np.ndarray,
    num_users: int,
    alpha: float = 0.5,
    seed: int = 0,
    holdout_fraction: float = 0.2,
) -> list[UserShard]:
    """Split examples among users, each with a Dirichlet(alpha) mix over the labels.

    Every example goes to exactly one user; users get len(labels) // num_users
    examples (the first len(labels) % num_users users in the drawn order one
    more). Users are served in a seeded random order; each draws its mix
    p ~ Dirichlet(alpha, ..., alpha) over the labels and takes its examples
    from the labels' remaining pools by p (multinomial draws, capped at what
    is left, redrawn for the rest); when its mix is exhausted it takes from
    what remains uniformly. Small alpha gives each user few intents (0.5 over
    150 intents: a handful dominate each user), large alpha approaches IID.
    Each user then keeps round(holdout_fraction * n) of their own examples,
    chosen at random, as personal held-out data.

    Deterministic in (labels, num_users, alpha, seed, holdout_fraction): every
    device computes the same partition and needs only its own index.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_users < 1:
        raise ValueError("num_users must be at least 1")
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    if not 0 <= holdout_fraction < 1:
        raise ValueError("holdout_fraction must be in [0, 1)")
    if n < 2 * num_users:
        raise ValueError(f"{n} examples cannot give {num_users} users 2 each")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    num_classes = len(classes)
    # Each label's pool in a random order; pool c is consumed from position taken[c].
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(num_classes)]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    consumed = np.zeros(num_classes, dtype=np.int64)
    order = rng.permutation(num_users)
    sizes = np.full(num_users, n // num_users, dtype=np.int64)
    sizes[order[: n % num_users]] += 1
    mixes = rng.dirichlet(np.full(num_classes, alpha), size=num_users)
    shards: list[UserShard | None] = [None] * num_users
    for user in order:
        need = int(sizes[user])
        take = np.zeros(num_classes, dtype=np.int64)
        while need > 0:
            available = remaining - take
            weights = mixes[user] * (available > 0)
            if not weights.sum() > 0:  # the mix's labels are used up: take what is left
                weights = (available > 0).astype(np.float64)
            draw = np.minimum(rng.multinomial(need, weights / weights.sum()), available)
            take += draw
            need -= int(draw.sum())
        remaining -= take
        picked = []
        for c in np.flatnonzero(take):
            picked.append(pools[c][consumed[c] : consumed[c] + take[c]])
            consumed[c] += take[c]
        mine = rng.permutation(np.concatenate(picked))
        held = int(np.floor(holdout_fraction * len(mine) + 0.5))
        shards[user] = UserShard(train=np.sort(mine[held:]), heldout=np.sort(mine[:held]))
    return [s for s in shards if s is not None]
