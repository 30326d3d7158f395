"""The models one server trains: a round coordinator per model, driven by one runner.

`ModelRunner` owns every model's `RoundCoordinator` (each with its own
strategy, round settings, DP policy, ledger and version chain, all keyed by
the model's name in the store), routes device calls to them (a check-in to
the models the device holds data for, a round's calls to the model whose
round it is), and creates, pauses, resumes and deletes models. Each change is written
to the model's definition in the store first (server/store: `model_definitions`,
audit-logged), then applied, so a restart finds the same models, settings
and pause states, and a refused change leaves both untouched.

Each coordinator steps on its own driver thread: a long aggregation or
evaluation of one model must not hold another model's deadlines.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from common.tasks import TaskName
from server.errors import ErrorKind, FederationError
from server.modelconf import ModelSettings, check_model_name
from server.rounds import CheckInOutcome, RoundCoordinator
from server.store import ModelDefinition, ModelExistsError, Store

__all__ = ["FederatedModel", "ModelRunner"]

T = TypeVar("T")

log = logging.getLogger("xeno.server.runner")

# How a model came to be trained: the server's flags, its --models file, or the Admin API.
SOURCES = ("flags", "file", "admin")


@dataclass(frozen=True)
class FederatedModel:
    """One model the server trains."""

    name: str
    coordinator: RoundCoordinator
    # The data kind its devices hold (None: any; a coordinator built outside the runner).
    task: str | None = None
    settings: ModelSettings | None = None
    source: str = "flags"

    @property
    def paused(self) -> bool:
        return self.coordinator.paused


# Builds the coordinator of a model that exists in the store.
Build = Callable[[str, ModelSettings], RoundCoordinator]
# Creates a model in the store (version 1 and its definition, one transaction).
Initialize = Callable[[str, ModelSettings, ModelDefinition], None]


class ModelRunner:
    """Every model of the server; thread-safe."""

    def __init__(
        self,
        store: Store,
        default: str,
        build: Build | None = None,
        initialize: Initialize | None = None,
        base: ModelSettings | None = None,
    ) -> None:
        self.store = store
        self.default = default
        # What a created model's unset settings are: the server's flags.
        self.base = base or ModelSettings()
        self._build = build
        self._initialize = initialize
        self._models: dict[str, FederatedModel] = {}
        self._creating: set[str] = set()  # names being created (see create)
        self._lock = threading.RLock()
        self._running = False
        self._listeners: list[Callable[[FederatedModel], None]] = []
        self._rng = random.SystemRandom()
        # Devices that checked in and have not yet been told the federation finished: a
        # finishing server keeps serving until they have (see unannounced), since a device
        # that finds the port closed instead retries forever.
        self._unannounced: set[str] = set()

    @classmethod
    def single(cls, store: Store, coordinator: RoundCoordinator) -> ModelRunner:
        """A runner of one coordinator that every device trains (tests, embedding apps)."""
        runner = cls(store, coordinator.model_name)
        runner.add(FederatedModel(coordinator.model_name, coordinator))
        return runner

    # ------------------------------------------------------------------ the models
    def add_listener(self, listener: Callable[[FederatedModel], None]) -> None:
        """Call listener with each model added (now for those already there)."""
        with self._lock:
            self._listeners.append(listener)
            models = list(self._models.values())
        for model in models:
            listener(model)

    def add(self, model: FederatedModel) -> None:
        with self._lock:
            if model.name in self._models:
                raise ValueError(f"model {model.name!r} is already trained here")
            self._models[model.name] = model
            listeners = list(self._listeners)
            running = self._running
        for listener in listeners:
            listener(model)
        if running:
            model.coordinator.start()

    def models(self) -> list[FederatedModel]:
        with self._lock:
            return list(self._models.values())

    def coordinators(self) -> list[RoundCoordinator]:
        return [m.coordinator for m in self.models()]

    def get(self, name: str) -> FederatedModel:
        """The model, or FederationError NOT_FOUND naming the models there are."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                known = ", ".join(sorted(self._models)) or "none"
                raise FederationError(
                    ErrorKind.NOT_FOUND, f"no model {name!r} is trained here; models: {known}"
                )
            return model

    @property
    def default_coordinator(self) -> RoundCoordinator:
        return self.get(self.default).coordinator

    # ------------------------------------------------------------------ routing
    def eligible(self, tasks: Sequence[str], names: Sequence[str]) -> list[RoundCoordinator]:
        """The coordinators a device may train for.

        The models it names, else those of its data kinds, else (a device that says
        neither) the default model. FederationError: an unknown data kind
        (INVALID_ARGUMENT) or model (NOT_FOUND).
        """
        kinds = set()
        for task in tasks:
            try:
                kinds.add(TaskName.parse(task).value)
            except ValueError as exc:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        if names:
            chosen = [self.get(name) for name in dict.fromkeys(names)]
            if kinds:
                for model in chosen:
                    if model.task is not None and model.task not in kinds:
                        raise FederationError(
                            ErrorKind.INVALID_ARGUMENT,
                            f"model {model.name!r} trains on {model.task} data and this "
                            f"device holds {', '.join(sorted(kinds))}",
                        )
            return [m.coordinator for m in chosen]
        if kinds:
            return [m.coordinator for m in self.models() if m.task is None or m.task in kinds]
        return [self.default_coordinator]

    def check_in_now(
        self, device_id: str, coordinators: Sequence[RoundCoordinator]
    ) -> CheckInOutcome | None:
        """A task from one of the coordinators, Finished when all have finished, else None.

        Asked in random order so a device that holds data for several models is not
        always given the first one's task. Once it has a task, the other models stop
        counting it as available (and let it go if they had just selected it).
        """
        order = list(coordinators)
        self._rng.shuffle(order)
        with self._lock:
            self._unannounced.add(device_id)
        finished: list[CheckInOutcome] = []
        for coordinator in order:
            outcome = coordinator.check_in_now(device_id)
            if outcome is None:
                continue
            if outcome.finished:
                finished.append(outcome)
                continue
            if outcome.task is not None:
                for other in coordinators:
                    if other is not coordinator:
                        other.leave(device_id, "busy with another model", only_if_untouched=True)
                return outcome
        if order and len(finished) == len(order):
            with self._lock:
                self._unannounced.discard(device_id)
            return finished[0]
        return None

    def unannounced(self) -> int:
        """How many devices that checked in have not heard "finished" (nor left) yet."""
        with self._lock:
            return len(self._unannounced)

    def waiting_reason(self, coordinators: Sequence[RoundCoordinator]) -> str:
        """Why a device of these models has no task: paused models, or no model at all."""
        if not coordinators:
            return "no model on this server trains on this device's data"
        paused = [c.model_name for c in coordinators if c.paused]
        if len(paused) == len(coordinators):
            return f"model {', '.join(paused)} is paused"
        return "no task for this device yet"

    def for_round(self, round_id: str) -> RoundCoordinator:
        """The coordinator whose round this is (the default one, to refuse unknown ids)."""
        for coordinator in self.coordinators():
            if coordinator.owns_round(round_id):
                return coordinator
        return self.default_coordinator

    def leave(self, device_id: str, reason: str) -> None:
        with self._lock:
            self._unannounced.discard(device_id)
        for coordinator in self.coordinators():
            coordinator.leave(device_id, reason)

    def forget(self, device_id: str, erase: Callable[[], T]) -> T:
        """Run erase while no model can select the device (see RoundCoordinator.forget).

        The coordinators' locks are taken one inside the other, always in the same order;
        nothing else holds two of them.
        """
        call: Callable[[], T] = erase
        for coordinator in reversed(self.coordinators()):
            call = functools.partial(coordinator.forget, device_id, call)
        return call()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            self._running = True
            coordinators = self.coordinators()
        for coordinator in coordinators:
            coordinator.start()

    def stop(self) -> None:
        with self._lock:
            self._running = False
        for coordinator in self.coordinators():
            coordinator.stop()

    @property
    def finished(self) -> bool:
        """Every model has run its configured rounds (a model with rounds = 0 never does)."""
        return all(c.finished for c in self.coordinators())

    def health_problem(self) -> str:
        problems = [
            f"model {c.model_name}: {problem}"
            for c in self.coordinators()
            if (problem := c.health_problem())
        ]
        return "; ".join(problems)

    # ------------------------------------------------------------------ operator actions
    def create(self, name: str, settings: ModelSettings, paused: bool = False) -> FederatedModel:
        """Create a model (version 1 and its definition) and start training it.

        FederationError: a bad name or settings (INVALID_ARGUMENT), a model of that name
        (ALREADY_EXISTS); nothing is created then.
        """
        if self._build is None or self._initialize is None:
            raise FederationError(ErrorKind.FAILED_PRECONDITION, "this server cannot create models")
        try:
            check_model_name(name)
            settings.validate()
        except (ValueError, TypeError) as exc:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        # Building the weights (torch) and writing them takes seconds: routing must not
        # wait for it, so the name is reserved and the lock let go meanwhile.
        with self._lock:
            taken = name in self._models or name in self._creating
            if taken or self.store.get_model(name) is not None:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS, f"a model named {name!r} already exists"
                )
            self._creating.add(name)
        try:
            definition = ModelDefinition(name, settings.task, settings.to_json(), paused, "admin")
            try:
                self._initialize(name, settings, definition)
            except ModelExistsError as exc:
                raise FederationError(ErrorKind.ALREADY_EXISTS, str(exc)) from None
            coordinator = self._build(name, settings)
            if paused:
                coordinator.pause()
            model = FederatedModel(name, coordinator, settings.task, settings, "admin")
            self.add(model)
        finally:
            with self._lock:
                self._creating.discard(name)
        log.info("created model %s (task %s, strategy %s)", name, settings.task, settings.strategy)
        return model

    def delete(self, name: str) -> FederatedModel:
        """Stop training a model and remove its definition; its versions and ledger stay.

        A round of it still open ends "aborted", with the reason, its participants recorded.

        FederationError: no name (INVALID_ARGUMENT), the default model (FAILED_PRECONDITION),
        no such model (NOT_FOUND); nothing changes then.
        """
        if not name:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "name the model to delete")
        with self._lock:
            if name == self.default:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"model {name!r} is the server's default model (--model): it cannot be deleted",
                )
            model = self.get(name)
            # KeyError: a coordinator built outside the runner has nothing stored.
            with contextlib.suppress(KeyError):
                self.store.delete_model_definition(name)
            del self._models[name]
        # Outside the lock: stopping joins the model's driver thread.
        model.coordinator.stop()
        model.coordinator.abort_open_round(f"model {name!r} was deleted during the round")
        log.info("deleted model %s (its versions and ledger are kept)", name)
        return model

    def set_paused(self, name: str, paused: bool) -> FederatedModel:
        """Pause (no new rounds; an open one finishes) or resume a model.

        FederationError: no such model (NOT_FOUND), already in that state
        (FAILED_PRECONDITION); nothing changes then.
        """
        with self._lock:
            model = self.get(name)
            if model.paused == paused:
                state = "paused" if paused else "running"
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION, f"model {name!r} is already {state}"
                )
            try:
                self.store.set_model_paused(name, paused)
            except KeyError:  # a coordinator built outside the runner: define it first
                settings = model.settings
                self.store.define_model(
                    ModelDefinition(
                        name,
                        model.task or "",
                        settings.to_json() if settings is not None else {},
                        paused,
                        model.source,
                    )
                )
                self.store.set_model_paused(name, paused)
            if paused:
                model.coordinator.pause()
            else:
                model.coordinator.resume()
        log.info("model %s %s", name, "paused" if paused else "resumed")
        return model
