"""The user's own intent classifier: a calibrated linear head over a text body.

A *body* turns texts into fixed-size vectors. `HashedNgramBody` needs no
training (word unigrams, bigrams and character 3-5-grams hashed into
buckets with the federated intent model's tokenizer and FNV-1a hash,
`common.text`; sublinear counts, L2-normalized): it is the from-scratch body. A
body trained elsewhere (the federated intent model's embedding, when the
device holds one) plugs in through the same `TextBody` protocol.

The head is multinomial logistic regression with an L2 penalty, fitted by
L-BFGS (torch, full batch); a retrain starts from the previous
head's weights for the intents it already knew (warm start). A caller may
choose mini-batch gradient descent instead (`MiniBatch`: Adam or SGD with
its learning rate, epochs and batch size, warm-started the same way): what
the user asked for runs as asked, converged or not. Confidences are
calibrated by temperature scaling on the validation split (Guo et al.,
ICML 2017; the temperature is kept within [0.25, 20]: a validation split
of a few dozen examples that the head separates perfectly would otherwise
push it towards zero and every confidence to 1). The unknown threshold is
the 5th percentile of the calibrated confidence of correctly classified
validation examples: text the model is less sure of than 95% of its own
correct answers is reported as
"unknown" rather than forced into an intent.

Everything is numpy arrays; a head serializes to `.npz` bytes (no pickle).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from scipy import optimize, special
from threadpoolctl import threadpool_limits
from torch import nn

from common.text import PAD, TextFeatures, featurize

__all__ = [
    "LEGACY_NGRAM_BODIES",
    "OPTIMIZERS",
    "UNKNOWN",
    "HashedNgramBody",
    "IntentHead",
    "MiniBatch",
    "StackedBody",
    "TextBody",
    "fit_head",
    "stratified_split",
    "train_head",
]

UNKNOWN = "unknown"
OPTIMIZERS = ("adam", "sgd")
MAX_LEARNING_RATE = 10.0
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1_000_000


@dataclass(frozen=True)
class MiniBatch:
    """An explicit optimisation setting: mini-batch gradient descent on the head.

    A batch larger than the examples is one full batch. Bad values are
    refused here, before any work, with the field and the allowed range.
    """

    learning_rate: float
    epochs: int
    batch_size: int
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
            raise ValueError(f"learning rate must be a finite number, got {lr!r}")
        if not 0 < lr <= MAX_LEARNING_RATE:
            raise ValueError(f"learning rate must be in (0, {MAX_LEARNING_RATE:g}], got {lr!r}")
        for name, value, most in (
            ("epochs", self.epochs, MAX_EPOCHS),
            ("batch size", self.batch_size, MAX_BATCH_SIZE),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if not 1 <= value <= most:
                raise ValueError(f"{name} must be between 1 and {most}, got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )

    def describe(self) -> str:
        return (
            f"{self.optimizer} lr={self.learning_rate:g} epochs={self.epochs} "
            f"batch={self.batch_size}"
        )


class TextBody(Protocol):
    @property
    def name(self) -> str:
        """Identifies the body: a head only runs on the body it was trained on."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 vectors."""
        ...


@dataclass(frozen=True)
class HashedNgramBody:
    """Hashed word and character n-grams: a body that needs no training.

    The features and their hash are the federated intent model's (`common.text`:
    NFKC and lower case, Unicode words, word bigrams, character 3-5-grams, FNV-1a),
    so the device tokenizes and hashes text one way for both models. Sublinear
    counts (log1p) per bucket, L2-normalized.
    """

    buckets: int = 1 << 12
    name: str = "hashed-ngrams-v2"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        ids = featurize(texts, TextFeatures(buckets=self.buckets))
        out = np.zeros((len(texts), self.buckets), dtype=np.float32)
        rows, cols = np.nonzero(ids != PAD)
        np.add.at(out, (rows, ids[rows, cols]), 1.0)
        np.log1p(out, out=out)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.asarray(out / np.maximum(norms, 1e-12))


# Heads trained on the first n-gram body (its own regex words and crc32 buckets) cannot
# run on this one; the trainer retrains them from the stored examples on first use.
LEGACY_NGRAM_BODIES = frozenset({"hashed-ngrams-v1"})


@dataclass(frozen=True)
class StackedBody:
    """Several bodies side by side, each weighted (equal weights by default).

    Each part's vectors (unit norm) are scaled by its weight and concatenated; the
    whole is scaled back to unit norm.
    """

    parts: tuple[TextBody, ...]
    weights: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        names = [p.name for p in self.parts]
        if self.weights:
            names = [f"{n}*{w:g}" for n, w in zip(names, self.weights, strict=True)]
        return "+".join(names)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        weights = self.weights or (1.0,) * len(self.parts)
        out = np.hstack([w * p.embed(texts) for p, w in zip(self.parts, weights, strict=True)])
        return np.asarray(out / np.sqrt(sum(w * w for w in weights)), dtype=np.float32)


def stratified_split(
    labels: Sequence[str], fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: about `fraction` of each intent with >= 2 examples."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    train: list[int] = []
    val: list[int] = []
    for cls in sorted(set(labels)):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        k = 0 if len(idx) < 2 else max(1, round(fraction * len(idx)))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


@dataclass
class IntentHead:
    classes: list[str]
    weights: np.ndarray  # (dim, K)
    bias: np.ndarray  # (K,)
    temperature: float = 1.0
    threshold: float = 0.0
    body: str = ""

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self.weights + self.bias)

    def proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(special.softmax(self.logits(x) / self.temperature, axis=1))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            classes=np.array(self.classes, dtype=str),
            weights=self.weights.astype(np.float32),
            bias=self.bias.astype(np.float32),
            scalars=np.array([self.temperature, self.threshold]),
            body=np.array(self.body, dtype=str),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> IntentHead:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            temperature, threshold = (float(v) for v in z["scalars"])
            return cls(
                [str(c) for c in z["classes"]],
                np.asarray(z["weights"]),
                np.asarray(z["bias"]),
                temperature,
                threshold,
                str(z["body"]),
            )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run numpy/torch math on one thread.

    The budget is one core, and on a busy device multi-threaded BLAS on these
    small matrices is 30x slower, not faster.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(previous)


def fit_head(
    x: np.ndarray,
    labels: Sequence[str],
    classes: list[str],
    l2: float = 1e-3,
    warm: IntentHead | None = None,
    max_iter: int = 200,
    optimization: MiniBatch | None = None,
    seed: int = 0,
) -> IntentHead:
    """Multinomial logistic regression (mean cross-entropy + l2/2 |W|^2).

    By L-BFGS to convergence, or by `optimization`'s mini-batch descent
    (batches shuffled with `seed`). Warm-started from `warm`'s weights for
    the intents it knew.
    """
    _n, dim = x.shape
    k = len(classes)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    w0 = np.zeros((dim + 1, k))
    if warm is not None and warm.weights.shape[0] == dim:
        for j, c in enumerate(warm.classes):
            if c in index:
                w0[:dim, index[c]] = warm.weights[:, j]
                w0[dim, index[c]] = warm.bias[j]
    # torch's L-BFGS (strong Wolfe line search); scipy's L-BFGS-B spends seconds per
    # iteration on 20k parameters in the scipy version we pin, torch's milliseconds.
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    target = torch.from_numpy(y)
    w = torch.from_numpy(w0).requires_grad_(True)

    def loss(rows: torch.Tensor | slice) -> torch.Tensor:
        z = xt[rows] @ w[:dim] + w[dim]
        return nn.functional.cross_entropy(z, target[rows]) + 0.5 * l2 * (w[:dim] ** 2).sum()

    if optimization is not None:
        with one_thread():
            _descend(w, loss, len(y), optimization, seed)
        fitted = w.detach().numpy()
        return IntentHead(list(classes), fitted[:dim].copy(), fitted[dim].copy())
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(slice(None))
        value.backward()  # type: ignore[no-untyped-call]
        return value

    with one_thread():
        opt.step(closure)  # type: ignore[no-untyped-call]
    fitted = w.detach().numpy()
    return IntentHead(list(classes), fitted[:dim].copy(), fitted[dim].copy())


def _descend(
    w: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    setting: MiniBatch,
    seed: int,
) -> None:
    opt: torch.optim.Optimizer
    if setting.optimizer == "adam":
        opt = torch.optim.Adam([w], lr=setting.learning_rate)
    else:
        opt = torch.optim.SGD([w], lr=setting.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(setting.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, setting.batch_size):
            opt.zero_grad()
            loss(order[start : start + setting.batch_size]).backward()  # type: ignore[no-untyped-call]
            opt.step()


def calibrate(head: IntentHead, x: np.ndarray, labels: Sequence[str]) -> tuple[float, float]:
    """(temperature, unknown threshold) fitted on a validation set."""
    index = {c: i for i, c in enumerate(head.classes)}
    keep = [i for i, c in enumerate(labels) if c in index]
    if not keep:
        return 1.0, 0.0
    z = head.logits(x[keep])
    y = np.array([index[labels[i]] for i in keep])

    def nll(log_t: float) -> float:
        logp = z / np.exp(log_t) - special.logsumexp(z / np.exp(log_t), axis=1, keepdims=True)
        return -float(logp[np.arange(len(y)), y].mean())

    res = optimize.minimize_scalar(nll, bounds=(np.log(0.25), np.log(20.0)), method="bounded")
    temperature = float(np.exp(res.x))
    p = special.softmax(z / temperature, axis=1)
    correct = p.argmax(axis=1) == y
    threshold = float(np.percentile(p.max(axis=1)[correct], 5)) if correct.any() else 0.0
    return temperature, threshold


def train_head(
    body: TextBody,
    texts: Sequence[str],
    labels: Sequence[str],
    warm: IntentHead | None = None,
    seed: int = 0,
    optimization: MiniBatch | None = None,
) -> tuple[IntentHead, dict[str, Any]]:
    """The trainer's recipe: 20% stratified validation, fit, calibrate, refit on everything.

    Validation accuracy is that of the head fitted on the other 80%; the
    returned head is refitted on every example (warm-started from the first
    fit) and keeps the validation's temperature and threshold. Both fits use
    `optimization` when given (L-BFGS otherwise).
    """
    classes = sorted(set(labels))
    with one_thread():
        x = body.embed(texts)
    train, val = stratified_split(labels, 0.2, seed)
    head = fit_head(
        x[train],
        [labels[i] for i in train],
        classes,
        warm=warm,
        optimization=optimization,
        seed=seed,
    )
    val_labels = [labels[i] for i in val]
    with one_thread():
        temperature, threshold = calibrate(head, x[val], val_labels)
    head.temperature, head.threshold = temperature, threshold
    predicted = [head.classes[j] for j in head.proba(x[val]).argmax(axis=1)]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, val_labels, strict=True)]))
    final = fit_head(x, labels, classes, warm=head, optimization=optimization, seed=seed)
    final.temperature, final.threshold, final.body = temperature, threshold, body.name
    return final, {
        "accuracy": accuracy,
        "examples_used": len(texts),
        "validation_examples": len(val),
        "intents": len(classes),
        "temperature": temperature,
        "unknown_threshold": threshold,
        "warm_start": warm is not None,
    }
