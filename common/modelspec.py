"""What a model is, without building it: an architecture name and its JSON config.

Torch-free on purpose, so that the server can start (and serve check-ins) before
torch is imported; `common.models` builds the module from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSpec", "mlp_for_params"]


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


def mlp_for_params(target: int, input_dim: int = 64, num_classes: int = 10) -> ModelSpec:
    """An MLP with one hidden layer sized so the model has about `target` parameters."""
    # params = input*h + h + h*classes + classes
    hidden = max(1, round((target - num_classes) / (input_dim + 1 + num_classes)))
    return ModelSpec(
        "mlp", {"input_dim": input_dim, "hidden": [hidden], "num_classes": num_classes}
    )
