"""Text bodies from the fastText-style intent model: the federated one, or the shipped one.

A body is the model's embedding table with its featurization
(`common.text`, the same wire contract the federated model uses): a text's
vector is the mean of the rows of its hashed features, L2-normalized so the
personal head sees inputs of one scale. The last layer of the shared model
(150 CLINC150 intents) is dropped: the user's own intents get their own head.

`fasttext_body()` gives, first that exists:

1. `$XENO_HOME/models/intent-body.npz`: the federated intent model's body
   as the device last received it (written by `save_body`);
2. `client/assistant/data/clinc150-body.npz`: the cold-start body shipped
   with the package, built reproducibly by `scripts/build_intent_body.py`.

Alone, this body loses to hashed n-grams trained from scratch on CLINC150
intents it never saw (64 dimensions cannot separate what 4,096 n-gram buckets
do). So the trainer's default (`default_body()`) stacks it beside the n-grams
(hashed n-grams alone when no fastText body exists), and the personal head
uses it as a nearest-centroid expert beside the n-gram head
(`intents.fit_with_prototypes`). The shipped body is trained for that use:
label smoothing, and each row multiplied by its bucket's IDF, so a text's
vector is the IDF-weighted mean of its n-grams (`clinc150_body`); with it the
personal head beats scratch on intents the body never saw, at 3 to 15 intents
per user (`benchmarks/personal.py`, README "Figures"). A federated body is
used as the device received it (no IDF: the device has no corpus to count).

Body files are `.npz` read with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.assistant.intents import HashedNgramBody, StackedBody, TextBody
from client.assistant.keys import atomic_write, xeno_home
from common.text import PAD, TextFeatures, featurize

__all__ = [
    "LABEL_SMOOTHING",
    "SHIPPED_BODY",
    "FastTextBody",
    "default_body",
    "device_body_path",
    "fasttext_body",
    "idf_weights",
    "load_body",
    "save_body",
]

SHIPPED_BODY = Path(__file__).resolve().parent / "data" / "clinc150-body.npz"


def device_body_path(home: Path | None = None) -> Path:
    return (xeno_home() if home is None else home) / "models" / "intent-body.npz"


@dataclass(frozen=True)
class FastTextBody:
    embedding: np.ndarray = field(repr=False)  # (buckets, dim) float32
    features: TextFeatures
    name: str
    intents: tuple[str, ...] = ()  # what the body was trained on (documentation)
    # Learned elsewhere: the personal head's prototype prior comes from its columns.
    pretrained = True

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        ids = featurize(texts, self.features)
        mask = ids != PAD
        counts = mask.sum(axis=1, keepdims=True)
        rows = self.embedding[np.where(mask, ids, 0)] * mask[..., None]
        mean = rows.sum(axis=1) / np.maximum(counts, 1)
        norms = np.linalg.norm(mean, axis=1, keepdims=True)
        return np.asarray(mean / np.maximum(norms, 1e-12), dtype=np.float32)


def body_bytes(embedding: np.ndarray, features: TextFeatures, intents: Sequence[str]) -> bytes:
    """The body file: float16 embedding (half the size; the head is refitted on it)."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        embedding=np.asarray(embedding, dtype=np.float16),
        features=np.array([features.buckets, features.char_min, features.char_max]),
        intents=np.array(list(intents), dtype=str),
    )
    return buf.getvalue()


def body_from_bytes(data: bytes, origin: str) -> FastTextBody:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        buckets, char_min, char_max = (int(v) for v in z["features"])
        embedding = np.asarray(z["embedding"], dtype=np.float32)
        intents = tuple(str(i) for i in z["intents"])
    if embedding.ndim != 2 or embedding.shape[0] != buckets:
        raise ValueError(f"{origin}: embedding shape {embedding.shape} does not fit {buckets}")
    digest = hashlib.sha256(data).hexdigest()[:12]
    return FastTextBody(
        embedding, TextFeatures(buckets, char_min, char_max), f"fasttext-{digest}", intents
    )


def load_body(path: Path) -> FastTextBody:
    return body_from_bytes(path.read_bytes(), str(path))


def save_body(
    path: Path, embedding: np.ndarray, features: TextFeatures, intents: Sequence[str]
) -> None:
    atomic_write(path, body_bytes(embedding, features, intents))


def fasttext_body(home: Path | None = None) -> FastTextBody | None:
    """The device's federated body, else the shipped cold-start body, else None."""
    for path in (device_body_path(home), SHIPPED_BODY):
        if path.exists():
            return load_body(path)
    return None


# The fastText body's weight next to the n-grams (weight 1) in the trainer's default body,
# chosen by a sweep over 0.3-1.5 on one held-out draw of intents (README, "Figures") when
# the body's columns were linear features. With the centroid expert the head ignores the
# columns' scale (the n-gram head is fitted on its own columns, rescaled), so it only
# names the stack: changing it would retrain every user's head for nothing.
FASTTEXT_WEIGHT = 0.5

# Label smoothing of the body's training (`train_fasttext_body`): chosen with the IDF
# folding of `clinc150_body` on held-out draws of CLINC150 intents (`benchmarks/personal.py
# --seed 0` and `--seed 2`; README, "Figures").
LABEL_SMOOTHING = 0.2


def default_body(home: Path | None = None) -> TextBody:
    """The trainer's default: hashed n-grams beside the fastText body (its centroid expert).

    Hashed n-grams alone when no fastText body is on the device (nor shipped).
    """
    body = fasttext_body(home)
    if body is None:
        return HashedNgramBody()
    return StackedBody((HashedNgramBody(), body), (1.0, FASTTEXT_WEIGHT))


def train_fasttext_body(
    texts: Sequence[str],
    labels: np.ndarray,
    num_classes: int,
    epochs: int = 8,
    lr: float = 0.01,
    seed: int = 0,
    features: TextFeatures | None = None,
    dim: int = 64,
    label_smoothing: float = LABEL_SMOOTHING,
) -> np.ndarray:
    """Train the fastText-style intent model centrally; return its embedding (the body).

    The same recipe as the federated workload's central baseline
    (`benchmarks/intents.py`: Adam, batch 32, one thread, seeded, so the same
    inputs give the same bytes), with label smoothing (`LABEL_SMOOTHING`): a
    body for intents it never saw should not spend its dimensions on making
    the 120-150 it trains on infinitely separable.
    """
    import torch
    from torch import nn

    from common.models import FastText

    features = features or TextFeatures()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = FastText(features.buckets, dim, num_classes, features.char_min, features.char_max)
        x = torch.from_numpy(featurize(texts, features))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), 32):
                idx = order[start : start + 32]
                optimizer.zero_grad()
                nn.functional.cross_entropy(
                    model(x[idx]), y[idx], label_smoothing=label_smoothing
                ).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        return np.asarray(model.embedding.weight.detach().numpy(), dtype=np.float32)
    finally:
        torch.set_num_threads(previous)


def idf_weights(texts: Sequence[str], features: TextFeatures) -> np.ndarray:
    """Inverse document frequency of each bucket over texts: log((1 + N) / (1 + df)) + 1.

    (buckets,) float64; a bucket no text has gets the largest weight, log(1 + N) + 1.
    """
    ids = featurize(texts, features)
    rows, cols = np.nonzero(ids != PAD)
    # Each (text, bucket) pair once: a bucket counts once per text however often it occurs.
    pairs = np.unique(rows * np.int64(features.buckets) + ids[rows, cols])
    df = np.bincount(pairs % features.buckets, minlength=features.buckets)
    return np.asarray(np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0)


def clinc150_body(
    exclude: Sequence[str] = (), epochs: int = 8, seed: int = 0
) -> tuple[np.ndarray, TextFeatures, tuple[str, ...]]:
    """A body trained on CLINC150's in-scope training queries, less the `exclude` intents.

    Each bucket's row is multiplied by its IDF over those queries (`idf_weights`):
    `FastTextBody.embed` normalizes the mean of the rows, so the folded rows give
    the IDF-weighted mean. A text's vector then leans on its rarer n-grams (the
    words that name an intent) rather than on the ones every query has.
    """
    from common.data.clinc150 import load_clinc150

    data = load_clinc150()
    kept = [i for i, name in enumerate(data.intents) if name not in set(exclude)]
    remap = np.full(len(data.intents), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    rows = np.flatnonzero(remap[data.train.labels] >= 0)
    texts = [data.train.texts[i] for i in rows]
    labels = remap[data.train.labels[rows]]
    features = TextFeatures()
    embedding = train_fasttext_body(texts, labels, len(kept), epochs, seed=seed, features=features)
    folded = embedding * idf_weights(texts, features)[:, None]
    return np.asarray(folded, dtype=np.float32), features, tuple(data.intents[i] for i in kept)
