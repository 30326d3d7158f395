"""Personalization on the device: FedRep's personal head, kept sealed on the device.

FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared
Representations for Personalized Federated Learning", ICML 2021): the model
is a shared body (the representation: for the intent model its embedding
table, for an MLP every layer but the last) and a head (the last linear
layer). Each round a device

1. fine-tunes a copy of the round's global head alone, body frozen,
   `personal_epochs` epochs at `personal_learning_rate`: its personal head
   and personalized model for this round;
2. trains the body alone with that personal head frozen, `local_epochs`
   epochs: the representation learns to serve every user's own head;
3. trains the global head on the new body (body frozen), `local_epochs`
   epochs, so that the global model stays a whole model for users and
   servers without a personal head.

Two departures from the paper, both measured (README): its server keeps no
head (ours must serve new users and the server's evaluation), and its
devices carry their head over from round to round, where ours re-derive it
from the newest global head each round. On CLINC150 users (Dirichlet 0.5
over 150 intents) a carried-over head never learns the intents its user has
few or no examples of, and fell 16-21 points below the global model once
that converged; a fine-tuned global head keeps them and adds the user's own
prior (+1.3 to +1.7 points over a well-trained global model). The head's
own learning rate matters: at the body's 5 it overfits (-7 points).

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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.storage import LocalStore
from client.training import LocalTrainingConfig, TrainResult, make_optimizer
from common.data import Dataset
from common.tensors import flatten_state_dict, load_flat_into_module

__all__ = [
    "FEDREP",
    "PERSONALIZATION_KEY",
    "PERSONAL_EPOCHS_KEY",
    "PERSONAL_LR_KEY",
    "PersonalStore",
    "Personalized",
    "evaluation_counts",
    "personal_names",
    "personalization_of",
    "personalize",
    "train_fedrep",
]

PERSONALIZATION_KEY = "personalization"
"""FitConfig.extra key naming the personalization the round asks for ("fedrep")."""
PERSONAL_EPOCHS_KEY = "personal_epochs"
"""FitConfig.extra key: epochs of the personal head's fine-tuning (step 1)."""
PERSONAL_LR_KEY = "personal_learning_rate"
"""FitConfig.extra key: SGD learning rate of the personal head's fine-tuning."""
FEDREP = "fedrep"


def personalization_of(extra: dict[str, str]) -> tuple[str, int, float]:
    """(method, personal epochs, personal learning rate) a task's extras ask for."""
    method = extra.get(PERSONALIZATION_KEY, "")
    if method in ("", "none"):
        return "", 0, 0.0
    if method != FEDREP:
        raise ValueError(f"unknown personalization {method!r} (this device knows: {FEDREP})")
    try:
        epochs = int(extra.get(PERSONAL_EPOCHS_KEY, "2"))
    except ValueError:
        got = extra[PERSONAL_EPOCHS_KEY]
        raise ValueError(f"personal_epochs must be an integer, got {got!r}") from None
    if not 1 <= epochs <= 100:
        raise ValueError(f"personal_epochs must be in 1..100, got {epochs}")
    try:
        lr = float(extra.get(PERSONAL_LR_KEY, "0.5"))
    except ValueError:
        got = extra[PERSONAL_LR_KEY]
        raise ValueError(f"personal_learning_rate must be a number, got {got!r}") from None
    if not 0 < lr <= 100:
        raise ValueError(f"personal_learning_rate must be in (0, 100], got {lr}")
    return method, epochs, lr


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


def evaluation_counts(
    model: nn.Module,
    global_vector: np.ndarray,
    heldout: Dataset | None,
    personal_head: dict[str, np.ndarray] | None = None,
) -> tuple[int, int, int]:
    """(examples, correct, personal correct) of a version on held-out data (federated evaluation).

    The personalized model is the version's body with this device's own head; without
    a head (no FedRep round yet) it is the version itself. Leaves `model` holding weights
    the caller reloads before any other use.
    """
    load_flat_into_module(model, global_vector)
    correct = _correct(model, heldout)
    personal = correct
    if personal_head:
        state = model.state_dict()
        with torch.no_grad():
            for name, value in personal_head.items():
                state[name].copy_(torch.from_numpy(value))
        personal = _correct(model, heldout)
    return (0 if heldout is None else len(heldout)), correct, personal


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
    optimizer = make_optimizer(chosen, config)
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


@dataclass(frozen=True)
class Personalized:
    global_correct: int  # held-out queries the global model gets right
    personal_correct: int  # ... and the personalized model (global body, personal head)
    steps: int


def _head_slices(model: nn.Module, head_names: tuple[str, str]) -> dict[str, slice]:
    """Where each head tensor lies in the flat state vector (state_dict order)."""
    out, at = {}, 0
    for name, tensor in model.state_dict().items():
        if name in head_names:
            out[name] = slice(at, at + tensor.numel())
        at += tensor.numel()
    return out


def personalize(
    model: nn.Module,
    global_vector: np.ndarray,
    data: Dataset,
    heldout: Dataset | None,
    config: LocalTrainingConfig,
    personal_epochs: int,
    personal_lr: float,
    generator: torch.Generator,
) -> Personalized:
    """FedRep's first step: the global head fine-tuned on this device's data, body frozen.

    Leaves model holding the personalized model (global body, personal head) and scores
    it and the global model on heldout.
    """
    head_names = personal_names(model)
    load_flat_into_module(model, global_vector)
    global_correct = _correct(model, heldout)
    personal = replace(config, learning_rate=personal_lr)
    steps = _train_only(model, set(head_names), data, personal_epochs, personal, generator)
    return Personalized(global_correct, _correct(model, heldout), steps)


def train_fedrep(
    model: nn.Module,
    global_vector: np.ndarray,
    data: Dataset,
    heldout: Dataset | None,
    config: LocalTrainingConfig,
    personal_epochs: int,
    personal_lr: float,
    seed: int = 0,
) -> FedRepResult:
    """One FedRep round on this device: the update to upload and the new personal head.

    The personal head is the global head fine-tuned on this device's data.
    The update's body part is the body trained under the personal head; its
    head part is the global head trained on the new body. Metrics: held-out
    counts of the global model and of the personalized model (global body,
    personal head).
    """
    if len(data) == 0:
        raise ValueError("no local training data")
    started = time.perf_counter()
    head_names = personal_names(model)
    generator = torch.Generator().manual_seed(seed)
    p = personalize(
        model, global_vector, data, heldout, config, personal_epochs, personal_lr, generator
    )  # 1. the global head, fine-tuned
    global_correct, personal_correct, steps = p.global_correct, p.personal_correct, p.steps
    state = model.state_dict()
    global_head = {
        n: torch.from_numpy(global_vector[sl]).view_as(state[n])
        for n, sl in _head_slices(model, head_names).items()
    }
    new_head = {n: state[n].detach().numpy().copy() for n in head_names}
    body = {n for n, _ in model.named_parameters()} - set(head_names)
    steps += _train_only(model, body, data, config.local_epochs, config, generator)  # 2.
    with torch.no_grad():  # 3. the global head, trained on the new body
        for n in head_names:
            state[n].copy_(global_head[n])
    steps += _train_only(model, set(head_names), data, config.local_epochs, config, generator)
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
