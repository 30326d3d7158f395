"""Model zoo: architectures a device can build from a ModelSpec.

Only architectures registered here can be built; the wire carries a name
and JSON keyword arguments, never code.

- `mlp`: fully connected classifier over float32 feature vectors (digits).
- `fasttext`: the intent classifier over text (Joulin et al., "Bag of Tricks
  for Efficient Text Classification", EACL 2017): word unigrams, bigrams and
  character n-grams hashed into buckets (`common.text`, a wire contract), an
  EmbeddingBag averaging their vectors and a linear head. Its input is a
  batch of bucket ids padded with -1 (`common.text.featurize`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.modelspec import ModelSpec, mlp_for_params
from common.text import PAD, TextFeatures

__all__ = [
    "ARCHITECTURES",
    "FastText",
    "ModelSpec",
    "build_model",
    "infer_spec",
    "mlp_for_params",
    "num_parameters",
]


class MLP(nn.Module):
    """Fully connected classifier: input -> hidden layers (ReLU) -> logits."""

    def __init__(self, input_dim: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = input_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def _mlp(input_dim: int = 64, hidden: list[int] | None = None, num_classes: int = 10) -> nn.Module:
    return MLP(input_dim, [64] if hidden is None else list(hidden), num_classes)


class FastText(nn.Module):
    """fastText-style classifier: mean of hashed feature embeddings -> linear head.

    Parameters, in state_dict (wire) order: `embedding.weight` (buckets x
    dim), `head.weight` (num_classes x dim), `head.bias`. The embedding starts
    uniform in +-1/dim and the head at zero, fastText's own initialization.
    """

    def __init__(
        self,
        buckets: int = 1 << 13,
        dim: int = 48,
        num_classes: int = 150,
        char_min: int = 3,
        char_max: int = 5,
    ) -> None:
        super().__init__()
        if dim < 1 or num_classes < 2:
            raise ValueError("fasttext needs dim >= 1 and num_classes >= 2")
        self.features = TextFeatures(buckets, char_min, char_max)
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / dim, 1.0 / dim)
            self.head.weight.zero_()
            self.head.bias.zero_()

    @staticmethod
    def bags(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat bucket ids, bag offsets) of a padded batch, EmbeddingBag's input form."""
        if x.dim() != 2:
            raise ValueError(f"fasttext takes a padded batch of bucket ids, got {tuple(x.shape)}")
        mask = x != PAD
        lengths = mask.sum(dim=1)
        offsets = torch.cumsum(lengths, 0) - lengths
        return x[mask], offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, offsets = self.bags(x)
        return self.head(self.embedding(ids, offsets))  # type: ignore[no-any-return]


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "fasttext": FastText}


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Instantiate spec; with a seed the initial weights are reproducible."""
    try:
        factory = ARCHITECTURES[spec.architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {spec.architecture!r}; known: {known}") from None
    if seed is None:
        return factory(**spec.config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory(**spec.config)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.state_dict().values())


def infer_spec(state: Any) -> ModelSpec | None:
    """The zoo spec whose model has exactly this state dict's names and shapes, if any.

    fastText's n-gram range is not in its weights: the defaults (3-5) are assumed.
    """
    names = list(state)
    if names == ["embedding.weight", "head.weight", "head.bias"]:
        buckets, dim = (int(d) for d in state["embedding.weight"].shape)
        classes = int(state["head.bias"].shape[0])
        if tuple(state["head.weight"].shape) != (classes, dim) or classes < 2:
            return None
        return ModelSpec("fasttext", {"buckets": buckets, "dim": dim, "num_classes": classes})
    if not names or len(names) % 2 or not all(n.startswith("net.") for n in names):
        return None
    weights = [state[n] for n in names if n.endswith(".weight")]
    if len(weights) * 2 != len(names) or any(w.dim() != 2 for w in weights):
        return None
    spec = ModelSpec(
        "mlp",
        {
            "input_dim": int(weights[0].shape[1]),
            "hidden": [int(w.shape[0]) for w in weights[:-1]],
            "num_classes": int(weights[-1].shape[0]),
        },
    )
    try:
        reference = build_model(spec).state_dict()
    except Exception:
        return None
    if list(reference) != names or any(reference[n].shape != state[n].shape for n in names):
        return None
    return spec
