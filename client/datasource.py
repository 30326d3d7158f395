"""Where a device's training data comes from: pluggable local data sources.

The device runtime trains on whatever `DataSource` it is given and knows no
data set itself. Three sources exist:

- `SimulatedShard`: a simulation's shard of a task's public data (the digits
  Dirichlet shards, or one simulated CLINC150 user with the fifth of their
  queries they keep held out), picked by index or, with partition -1, by the
  device's enrollment order (docker compose fleets).
- `JsonlFile`: a file of `{"text": ..., "intent": ...}` lines
  (`xeno-fl client --data FILE`), every line validated; a seeded fifth of
  the examples (`heldout_fraction`) is kept held out.
- `AssistantExamples`: the examples the user stored through the on-device
  trainer (`client/assistant`), read only with the user's consent to
  federated training (`client.assistant.federated.federated_shard`), with a
  held-out fifth as well (`xeno-fl client --user USER`).

Held-out data is the device's own evaluation set: it is never trained on,
and scores the global and the personalized model on this device.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from common.data import Dataset
from common.tasks import TaskName, TextShard, simulated_heldout, simulated_shard

__all__ = [
    "MAX_TEXT_CHARS",
    "AssistantExamples",
    "DataSource",
    "DataSourceError",
    "DeviceData",
    "JsonlFile",
    "LocalData",
    "SimulatedShard",
    "split_heldout",
]

LocalData = Dataset | TextShard

MAX_TEXT_CHARS = 10_000
"""Longest text a JSONL example may have (the assistant's store has the same limit)."""


class DataSourceError(ValueError):
    """The local data cannot be used: the message says which file, line and why."""


@dataclass(frozen=True)
class DeviceData:
    """What a device trains on, and what it keeps held out to score models on (if anything)."""

    train: LocalData
    heldout: LocalData | None = None


class DataSource(Protocol):
    """A device's local data. `load` is given the device's enrollment index once registered."""

    @property
    def needs_enrollment(self) -> bool:
        """True when the data can only be chosen after registration (by enrollment order)."""
        ...

    def load(self, enrollment_index: int | None = None) -> DeviceData: ...

    def describe(self) -> str: ...


def _subset(data: TextShard, indices: np.ndarray) -> TextShard:
    return TextShard(tuple(data.texts[i] for i in indices), data.labels[indices])


def split_heldout(data: TextShard, fraction: float, seed: int) -> DeviceData:
    """Keep round(fraction * n) examples, chosen by a seeded shuffle, held out."""
    if not 0 <= fraction < 1:
        raise DataSourceError(f"the held-out fraction must be in [0, 1), got {fraction}")
    n = len(data)
    order = np.random.default_rng(seed).permutation(n)
    held = math.floor(fraction * n + 0.5) if n > 1 else 0
    if held == 0:
        return DeviceData(data, None)
    return DeviceData(_subset(data, np.sort(order[held:])), _subset(data, np.sort(order[:held])))


@dataclass(frozen=True)
class SimulatedShard:
    """Shard `partition` of `num_partitions` of a task's simulation data (-1: by enrollment)."""

    task: TaskName
    partition: int
    num_partitions: int
    alpha: float = 0.5
    seed: int = 0
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.partition < -1:
            raise DataSourceError("--partition must be -1 (auto) or a shard index")

    @property
    def needs_enrollment(self) -> bool:
        return self.partition < 0

    def shard(self, enrollment_index: int | None) -> int:
        if self.partition >= 0:
            return self.partition
        if enrollment_index is None:
            raise DataSourceError("--partition -1 picks the shard by enrollment order: register")
        return enrollment_index % self.num_partitions

    def load(self, enrollment_index: int | None = None) -> DeviceData:
        shard = self.shard(enrollment_index)
        args = (self.task, shard, self.num_partitions, self.alpha, self.seed, self.test_fraction)
        return DeviceData(simulated_shard(*args), simulated_heldout(*args))

    def describe(self) -> str:
        which = "by enrollment order" if self.partition < 0 else str(self.partition)
        return f"simulated {self.task.value} shard {which} of {self.num_partitions}"


@dataclass(frozen=True)
class JsonlFile:
    """`{"text": ..., "intent": ...}` per line; intents must be among the model's `labels`."""

    path: Path
    labels: tuple[str, ...]
    heldout_fraction: float = 0.2
    seed: int = 0

    @property
    def needs_enrollment(self) -> bool:
        return False

    def load(self, enrollment_index: int | None = None) -> DeviceData:
        index = {name: i for i, name in enumerate(self.labels)}
        texts: list[str] = []
        labels: list[int] = []
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataSourceError(f"--data {self.path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise DataSourceError(f"--data {self.path}: not UTF-8 text ({exc.reason})") from None
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"--data {self.path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or set(row) != {"text", "intent"}:
                raise DataSourceError(
                    f'{where}: expected an object with exactly "text" and "intent"'
                )
            text, intent = row["text"], row["intent"]
            if not isinstance(text, str) or not text.strip():
                raise DataSourceError(f'{where}: "text" must be a non-empty string')
            if len(text) > MAX_TEXT_CHARS:
                raise DataSourceError(
                    f'{where}: "text" has {len(text)} characters, more than {MAX_TEXT_CHARS}'
                )
            if not isinstance(intent, str) or intent not in index:
                raise DataSourceError(
                    f"{where}: intent {intent!r} is not one of the model's {len(index)} intents"
                )
            texts.append(text)
            labels.append(index[intent])
        if not texts:
            raise DataSourceError(f"--data {self.path}: no examples")
        shard = TextShard(tuple(texts), np.array(labels, dtype=np.int64))
        return split_heldout(shard, self.heldout_fraction, self.seed)

    def describe(self) -> str:
        return f"examples from {self.path}"


@dataclass(frozen=True)
class AssistantExamples:
    """The examples user `user_id` stored through the on-device trainer, with their consent."""

    user_id: str
    labels: tuple[str, ...]
    home: Path | None = None
    heldout_fraction: float = 0.2
    seed: int = 0

    @property
    def needs_enrollment(self) -> bool:
        return False

    def load(self, enrollment_index: int | None = None) -> DeviceData:
        from client.assistant.consent import ConsentRequiredError
        from client.assistant.federated import federated_shard
        from client.assistant.keys import StoreError
        from client.assistant.store import UserStore

        try:
            store = UserStore(self.user_id, home=self.home)
        except StoreError as exc:
            raise DataSourceError(f"assistant user {self.user_id!r}: {exc}") from None
        try:
            shard = federated_shard(store, self.labels)
        except ConsentRequiredError as exc:
            raise DataSourceError(
                f"user {self.user_id!r} has not consented to federated training ({exc}); "
                f"xeno-fl user consent {self.user_id} --grant federated_training"
            ) from None
        finally:
            store.close()
        if len(shard) == 0:
            raise DataSourceError(
                f"user {self.user_id!r} has no stored examples of the model's intents"
            )
        return split_heldout(shard, self.heldout_fraction, self.seed)

    def describe(self) -> str:
        return f"the consented examples of assistant user {self.user_id}"


def intent_labels(task: TaskName) -> tuple[str, ...]:
    """The class names of a text task's model, label i being the i-th (sorted CLINC150 intents)."""
    if task is not TaskName.INTENTS:
        raise DataSourceError(f"--task {task.value} does not train on text; use --task intents")
    from common.data.clinc150 import load_clinc150

    return load_clinc150().intents
