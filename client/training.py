"""Local training of a downloaded global model on the device's own data.

Returns the update `w_local - w_global` as a flat float32 vector. FedProx
(Li et al., MLSys 2020) adds mu/2 ||w - w_global||^2 to the loss; its
gradient mu (w - w_global) is added to all gradients in one fused
`torch._foreach` call rather than a Python loop over tensors' elements.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.data import Dataset
from common.evaluation import evaluate
from common.tensors import flatten_state_dict, load_flat_into_module

# The first torch.optim constructor imports torch._dynamo (~1 s, sympy and all). Pay that when
# the device starts, not inside its first round's deadline.
importlib.import_module("torch._dynamo")


@dataclass(frozen=True)
class LocalTrainingConfig:
    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    momentum: float = 0.9


@dataclass(frozen=True)
class TrainResult:
    delta: np.ndarray
    num_examples: int
    metrics: dict[str, float]


def train_local(
    model: nn.Module,
    global_vector: np.ndarray,
    data: Dataset,
    config: LocalTrainingConfig,
    seed: int = 0,
) -> TrainResult:
    """Train model (loaded with global_vector) on data; return the update and metrics."""
    if len(data) == 0:
        raise ValueError("no local training data")
    started = time.perf_counter()
    load_flat_into_module(model, global_vector)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum)
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    n = len(data)
    steps = 0
    for _ in range(config.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            if config.proximal_mu > 0:
                grads = [p.grad for p in params]
                drift = torch._foreach_sub([p.detach() for p in params], anchors)
                torch._foreach_add_(grads, drift, alpha=config.proximal_mu)  # type: ignore[arg-type]
            optimizer.step()
            steps += 1
    train_loss, train_acc = evaluate(model, data)
    delta = flatten_state_dict(model.state_dict()) - global_vector
    if not np.all(np.isfinite(delta)):
        raise FloatingPointError(
            "local training diverged (non-finite update); lower the learning rate"
        )
    return TrainResult(
        delta=delta.astype(np.float32, copy=False),
        num_examples=n,
        metrics={
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "train_seconds": time.perf_counter() - started,
            "local_steps": float(steps),
        },
    )
