"""Simulation tasks: which model a federation trains and where its simulated data comes from.

`digits` (the default): the MLP on scikit-learn's digits, Dirichlet label
shards (`common.data.federated_digits`). `intents`: the fastText-style
model on CLINC150's 150 in-scope intents, one simulated user per device
(`common.data.clinc150.user_partitions`): a device trains on its user's
examples minus the fifth the user keeps held out, and the server evaluates
on the official in-scope test split (4,500 queries).

A device's text stays text (`TextShard`) until the task's model spec is
known: the features depend on the spec's bucket count and n-gram range, so
they are computed for the model the server sends, not assumed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from common.data import Dataset, digits_split, federated_digits
from common.data.clinc150 import load_clinc150, user_partitions
from common.modelspec import ModelSpec, mlp_for_params
from common.text import TextFeatures, featurize

__all__ = [
    "TaskName",
    "TextShard",
    "default_model_name",
    "evaluation_set",
    "model_spec_for",
    "simulated_heldout",
    "simulated_shard",
]


class TaskName(StrEnum):
    DIGITS = "digits"
    INTENTS = "intents"

    @classmethod
    def parse(cls, value: str) -> TaskName:
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown task {value!r}; use one of: {known}") from None


def default_model_name(task: TaskName) -> str:
    return {TaskName.DIGITS: "digits-mlp", TaskName.INTENTS: "intents-fasttext"}[task]


def model_spec_for(task: TaskName, hidden: list[int], params: int = 0) -> ModelSpec:
    """The spec a new model of the task gets (hidden/params size the digits MLP only)."""
    if task is TaskName.INTENTS:
        return ModelSpec("fasttext", {"num_classes": load_clinc150().num_intents})
    if params > 0:
        return mlp_for_params(params)
    return ModelSpec("mlp", {"input_dim": 64, "hidden": hidden, "num_classes": 10})


@dataclass(frozen=True)
class TextShard:
    """Labelled texts; featurized (and cached) for the model that trains on them."""

    texts: tuple[str, ...]
    labels: np.ndarray
    _cache: dict[TextFeatures, Dataset] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def featurized(self, features: TextFeatures) -> Dataset:
        if features not in self._cache:
            self._cache[features] = Dataset(featurize(self.texts, features), self.labels)
        return self._cache[features]


def simulated_shard(
    task: TaskName,
    partition: int,
    num_partitions: int,
    alpha: float,
    seed: int,
    test_fraction: float = 0.2,
) -> Dataset | TextShard:
    """The local training data of simulated device `partition` of `num_partitions`."""
    if not 0 <= partition < num_partitions:
        raise ValueError(
            f"--partition {partition} is outside 0..{num_partitions - 1} (or -1: auto)"
        )
    if task is TaskName.DIGITS:
        return federated_digits(num_partitions, alpha, seed, test_fraction).clients[partition]
    train = load_clinc150().train
    user = _users(num_partitions, alpha, seed)[partition]
    return TextShard(tuple(train.texts[i] for i in user.train), train.labels[user.train])


def simulated_heldout(
    task: TaskName,
    partition: int,
    num_partitions: int,
    alpha: float,
    seed: int,
    test_fraction: float = 0.2,
) -> TextShard | None:
    """Simulated device `partition`'s personal held-out data: its user's kept fifth (intents).

    Digits shards have none (the digits held-out split is the server's).
    """
    if task is TaskName.DIGITS:
        return None
    if not 0 <= partition < num_partitions:
        raise ValueError(f"--partition {partition} is outside 0..{num_partitions - 1}")
    train = load_clinc150().train
    user = _users(num_partitions, alpha, seed)[partition]
    return TextShard(tuple(train.texts[i] for i in user.heldout), train.labels[user.heldout])


@functools.lru_cache(maxsize=4)
def _users(num_users: int, alpha: float, seed: int) -> list[Any]:
    return user_partitions(load_clinc150().train.labels, num_users, alpha, seed)


def evaluation_set(task: TaskName, spec: ModelSpec, seed: int, test_fraction: float) -> Dataset:
    """The server's held-out data for the task, in the input form of spec's model."""
    if task is TaskName.DIGITS:
        return digits_split(seed, test_fraction)[1]
    from common.models import FastText, build_model  # torch, only when evaluating

    model = build_model(spec)
    if not isinstance(model, FastText):
        raise ValueError(f"the intents task trains a fasttext model, not {spec.architecture!r}")
    test = load_clinc150().test
    return Dataset(featurize(test.texts, model.features), test.labels)
