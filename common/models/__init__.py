"""Model zoo: architectures a device can build from a ModelSpec.

Only architectures registered here can be built; the wire carries a name
and JSON keyword arguments, never code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
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


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture name plus keyword arguments; JSON-serializable."""

    architecture: str = "mlp"
    config: dict[str, Any] = field(default_factory=dict)

    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)

    @classmethod
    def from_json(cls, architecture: str, config_json: str) -> ModelSpec:
        config = json.loads(config_json) if config_json else {}
        if not isinstance(config, dict):
            raise ValueError("model config must be a JSON object")
        return cls(architecture, config)


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


def mlp_for_params(target: int, input_dim: int = 64, num_classes: int = 10) -> ModelSpec:
    """An MLP with one hidden layer sized so the model has about `target` parameters."""
    # params = input*h + h + h*classes + classes
    hidden = max(1, round((target - num_classes) / (input_dim + 1 + num_classes)))
    return ModelSpec(
        "mlp", {"input_dim": input_dim, "hidden": [hidden], "num_classes": num_classes}
    )


def infer_spec(state: Any) -> ModelSpec | None:
    """The zoo spec whose model has exactly this state dict's names and shapes, if any."""
    names = list(state)
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
