"""Personalization on the device: FedRep's personal head, kept sealed on the device.

FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared
Representations for Personalized Federated Learning", ICML 2021): the model
is a shared body (the representation: for the intent model its embedding
table, for an MLP every layer but the last) and a head (the last linear
layer). Each round a device

1. takes the round's global body and its own personal head (the global head
   the first time) and trains the head alone, body frozen,
   `personal_epochs` epochs: its personalized model for this round;
2. trains the body alone with that personal head frozen, `local_epochs`
   epochs: the representation learns to serve every user's own head;
3. refits a copy of the global head on the new body (body frozen), so that
   the global model stays a whole model for users and servers without a
   personal head (a departure from the paper, whose server keeps no head).

It uploads the body's update and the refitted global head's update, never
the personal head: that is written, sealed with the device key, to the
device's local store (`personal-<model>.npz` in --state-dir) and read back
the next round. Before training, the device scores both the round's global
model and its personalized model (global body, personal head) on its own
held-out data and reports the counts; the personalized model's accuracy is
what personalization buys the user.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.storage import LocalStore
from client.training import LocalTrainingConfig, TrainResult
from common.data import Dataset
from common.tensors import flatten_state_dict, load_flat_into_module

__all__ = [
    "FEDREP",
    "PERSONALIZATION_KEY",
    "PERSONAL_EPOCHS_KEY",
    "PersonalStore",
    "personal_names",
    "personalization_of",
    "train_fedrep",
]

PERSONALIZATION_KEY = "personalization"
"""FitConfig.extra key naming the personalization the round asks for ("fedrep")."""
PERSONAL_EPOCHS_KEY = "personal_epochs"
"""FitConfig.extra key: epochs of head-only training (steps 1 and 3)."""
FEDREP = "fedrep"


def personalization_of(extra: dict[str, str]) -> tuple[str, int]:
    """(method, personal epochs) a task's extras ask for; ("", 0) for none."""
    method = extra.get(PERSONALIZATION_KEY, "")
    if method in ("", "none"):
        return "", 0
    if method != FEDREP:
        raise ValueError(f"unknown personalization {method!r} (this device knows: {FEDREP})")
    try:
        epochs = int(extra.get(PERSONAL_EPOCHS_KEY, "2"))
    except ValueError:
        got = extra[PERSONAL_EPOCHS_KEY]
        raise ValueError(f"personal_epochs must be an integer, got {got!r}") from None
    if not 1 <= epochs <= 100:
        raise ValueError(f"personal_epochs must be in 1..100, got {epochs}")
    return method, epochs


def personal_names(model: nn.Module) -> tuple[str, str]:
    """The head: the weight and bias of the model's last layer (its last two state entries)."""
    state = model.state_dict()
    names = list(state)
    if len(names) < 3:
        raise ValueError("personalization needs a model with a body and a head")
    weight, bias = names[-2], names[-1]
    if state[weight].dim() != 2 or state[bias].dim() != 1:
        raise ValueError(f"the model's last layer ({weight}, {bias}) is not a linear head")
    return weight, bias


class PersonalStore:
    """The device's personal heads, one per model, sealed in its local store."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    def path(self, model_name: str) -> Path:
        return self._store.dir / f"personal-{model_name}.npz"

    def load(self, model_name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The stored head if it fits these shapes, else {} (a new or reshaped model)."""
        path = self.path(model_name)
        try:
            raw = self._store._read_bytes(path)
        except FileNotFoundError:
            return {}
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            head = {k: np.array(z[k], dtype=np.float32) for k in z.files}
        if set(head) != set(shapes) or any(head[k].shape != shapes[k] for k in shapes):
            return {}
        return head

    def save(self, model_name: str, head: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in head.items()}
        np.savez(buffer, allow_pickle=False, **arrays)  # type: ignore[arg-type]
        self._store._write_bytes(self.path(model_name), buffer.getvalue())


@dataclass(frozen=True)
class FedRepResult:
    result: TrainResult
    personal_head: dict[str, np.ndarray]


def _correct(model: nn.Module, data: Dataset | None) -> int:
    if data is None or len(data) == 0:
        return 0
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x))
    model.train()
    return int((logits.argmax(1) == torch.from_numpy(data.y)).sum())


def _train_only(
    model: nn.Module,
    names: set[str],
    data: Dataset,
    epochs: int,
    config: LocalTrainingConfig,
    generator: torch.Generator,
) -> int:
    """SGD on the named parameters alone (the others frozen); returns the steps taken."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    chosen = [params[n] for n in sorted(names)]
    optimizer = torch.optim.SGD(chosen, lr=config.learning_rate, momentum=config.momentum)
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    steps = 0
    try:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), config.batch_size):
                idx = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
    finally:
        for p in params.values():
            p.requires_grad_(True)
    return steps


def train_fedrep(
    model: nn.Module,
    global_vector: np.ndarray,
    data: Dataset,
    heldout: Dataset | None,
    personal_head: dict[str, np.ndarray],
    config: LocalTrainingConfig,
    personal_epochs: int,
    seed: int = 0,
) -> FedRepResult:
    """One FedRep round on this device: the update to upload and the new personal head.

    `personal_head` is the device's head from earlier rounds ({} the first
    time: it starts from the global head). The update's body part is the
    body trained under the personal head; its head part is the global head
    refitted on the new body. Metrics: held-out counts of the global model
    and of the personalized model (global body, personal head fitted to it).
    """
    if len(data) == 0:
        raise ValueError("no local training data")
    started = time.perf_counter()
    head_names = personal_names(model)
    load_flat_into_module(model, global_vector)
    state = model.state_dict()
    global_head = {n: state[n].detach().clone() for n in head_names}
    global_correct = _correct(model, heldout)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # 1. the personal head, from where it was (or the global one)
        for n in head_names:
            if n in personal_head:
                state[n].copy_(torch.from_numpy(personal_head[n]))
    steps = _train_only(model, set(head_names), data, personal_epochs, config, generator)
    personal_correct = _correct(model, heldout)
    new_head = {n: state[n].detach().numpy().copy() for n in head_names}
    body = {n for n, _ in model.named_parameters()} - set(head_names)
    steps += _train_only(model, body, data, config.local_epochs, config, generator)  # 2.
    with torch.no_grad():  # 3. the global head, refitted on the new body
        for n in head_names:
            state[n].copy_(global_head[n])
    steps += _train_only(model, set(head_names), data, personal_epochs, config, generator)
    delta = flatten_state_dict(model.state_dict()) - global_vector
    if not np.all(np.isfinite(delta)):
        raise FloatingPointError(
            "local training diverged (non-finite update); lower the learning rate"
        )
    held = 0 if heldout is None else len(heldout)
    metrics = {
        "train_seconds": time.perf_counter() - started,
        "local_steps": float(steps),
        "heldout_examples": float(held),
    }
    if held:
        metrics |= {
            "heldout_global_correct": float(global_correct),
            "heldout_personal_correct": float(personal_correct),
            "heldout_global_accuracy": global_correct / held,
            "heldout_personal_accuracy": personal_correct / held,
        }
    result = TrainResult(delta.astype(np.float32, copy=False), len(data), metrics)
    return FedRepResult(result, new_head)
