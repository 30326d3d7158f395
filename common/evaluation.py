"""Evaluation of a classifier on a dataset: mean cross-entropy and accuracy."""

from __future__ import annotations

import torch
from torch import nn

from common.data import Dataset


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 4096) -> tuple[float, float]:
    """(loss, accuracy) of model on data, in large batches."""
    if len(data) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size])
        y = torch.from_numpy(data.y[start : start + batch_size])
        logits = model(x)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    return total_loss / len(data), correct / len(data)
