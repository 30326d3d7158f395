"""The seed's federated learning API for embedding apps, running the real round machinery.

`PersonalizedModelManager` keeps federated models in the server's own store.
`train_local_model` trains a user's copy of the current global model on data that
stays in this process (the user's "device") and holds the update; `update_global_model`
runs one real round: a `XenoServer` (round coordinator, SecAgg+, user-level
distributed DP when `privacy_enabled`) on an ephemeral loopback port over the same
store, and one `DeviceClient` per pending user that checks in, runs the secure
aggregation protocol and uploads a masked update. The server only ever sees the sum;
the new version appears in the model's history as the federation's, like any round.

`FederatedTrainer` is that loop for one model; the manager holds one per model.
`DifferentialPrivacy` and `PrivacyAnalyzer` are the seed's privacy helpers
(common/privacy/api.py).

Models: a `torch.nn.Module`, a state dict of a model-zoo architecture (`architecture=`
when it cannot be inferred), or None for the default intent model (fastText-style,
the 150 CLINC150 intents). Local data: for intent models a list of
`{"input_text": ..., "context": {"intent": ...}}`, otherwise `(inputs, labels)` tensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.runtime import ClientConfig, DeviceClient
from client.training import LocalTrainingConfig, TrainResult, train_local
from common.atrest import write_new_key
from common.data import Dataset
from common.models import FastText, ModelSpec, build_model
from common.pb import federation_pb2 as fpb
from common.privacy.api import DifferentialPrivacy, PrivacyAnalyzer
from common.text import featurize
from server.app import ServerConfig, XenoServer
from server.lifecycle.errors import InvalidInputError, UnknownNameError
from server.lifecycle.versions import VersionControl
from server.store import Store
from xeno._store import open_store, weights_of

__all__ = [
    "DEFAULT_INTENT_SPEC",
    "DifferentialPrivacy",
    "FederatedTrainer",
    "PersonalizedModelManager",
    "PrivacyAnalyzer",
]

log = logging.getLogger("xeno.federated_learning")

DEFAULT_INTENT_SPEC = ModelSpec("fasttext", {"num_classes": 150})


def _intent_labels() -> tuple[str, ...]:
    from common.data.clinc150 import load_clinc150

    return load_clinc150().intents


@dataclass(frozen=True)
class FederationSettings:
    """How the in-process rounds run."""

    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.1
    # User-level DP (privacy_enabled): Skellam noise from the users under secure aggregation.
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    round_deadline_s: float = 60.0
    # Users' devices refuse a secure round smaller than this (a small secure sum tells each
    # member much about the others); the devices' own default unless set.
    min_secagg_cohort: int = ClientConfig.min_secagg_cohort


class _UserDevice(DeviceClient):
    """A user's in-process device: it sends the update trained in train_local_model."""

    def __init__(
        self,
        config: ClientConfig,
        data: Dataset,
        pending: TrainResult,
        base: int,
        federation: str,
    ):
        super().__init__(config, data)
        self.pending: TrainResult | None = pending
        self.pending_base = base
        self.federation = federation

    def credentials_scope(self) -> str:
        # Each round's server listens on a new port over the same store: the user's
        # registration (id, token, identity key) is the store's and outlives the port.
        return self.federation

    def _train(
        self,
        task: fpb.Task,
        model: torch.nn.Module,
        weights: np.ndarray,
        training: LocalTrainingConfig,
        seed: int,
    ) -> TrainResult:
        if self.pending is not None and task.model_version == self.pending_base:
            result, self.pending = self.pending, None
            if task.privacy.user_dp.mechanism != fpb.USER_DP_NONE:
                # Metrics computed on private data would escape the accounted mechanism.
                result.metrics.pop("train_loss", None)
                result.metrics.pop("train_accuracy", None)
            return result
        # The global model moved since the user trained: train again from the round's base.
        return super()._train(task, model, weights, training, seed)


@dataclass
class _Pending:
    data: Dataset
    result: TrainResult
    base_version: int


@dataclass
class FederatedTrainer:
    """One federated model's in-process rounds (see the module docstring)."""

    store: Store
    model_id: str
    privacy_enabled: bool
    home: Path
    settings: FederationSettings = field(default_factory=FederationSettings)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pending_updates(self) -> int:
        return len(self._pending)

    def train_local(self, user_id: str, data: Dataset) -> TrainResult:
        """Train the user's copy of the global model; hold the update for the next round."""
        versions = VersionControl(self.store)
        record = versions.get(self.model_id)
        weights, _ = versions.weights(self.model_id, record.version)
        model = build_model(versions.spec(self.model_id))
        seed = int.from_bytes(os.urandom(4), "little")
        result = train_local(
            model,
            weights,
            data,
            LocalTrainingConfig(
                local_epochs=self.settings.local_epochs,
                batch_size=self.settings.batch_size,
                learning_rate=self.settings.learning_rate,
            ),
            seed,
        )
        with self._lock:
            self._pending[user_id] = _Pending(data, result, record.version)
        return result

    def _federation_id(self) -> str:
        """A stable name of this model's federation (a digest: the URL may hold a password)."""
        digest = hashlib.sha256(f"{self.store.url}\x00{self.model_id}".encode()).hexdigest()
        return f"in-process:{digest[:32]}"

    def run_round(self, min_updates: int) -> dict[str, Any]:
        """One real round with every pending user; the seed's result dict."""
        with self._lock:
            pending = dict(self._pending)
        floor = max(2, self.settings.min_secagg_cohort)
        need = max(min_updates, floor)
        if len(pending) < need:
            why = (
                f"{len(pending)} user update(s) pending, {min_updates} needed"
                if len(pending) < min_updates
                else f"secure aggregation here needs at least {floor} users (the users' "
                "devices refuse smaller secure rounds: FederationSettings.min_secagg_cohort)"
            )
            return {
                "success": False,
                "model_updated": False,
                "pending_updates": len(pending),
                "error": f"not aggregating model {self.model_id!r}: {why}",
            }
        s = self.settings
        config = ServerConfig(
            host="127.0.0.1",
            port=0,
            db=self.store.url,
            model=self.model_id,
            strategy="fedavg",
            eval_data="none",
            min_clients=need,
            clients_per_round=len(pending),
            selection_window=5.0,
            round_deadline=s.round_deadline_s,
            rounds=1,
            secagg=True,
            dp="distributed" if self.privacy_enabled else "none",
            dp_noise_multiplier=s.noise_multiplier,
            dp_clip_norm=s.clip_norm,
            dp_min_contributors=need,
            local_epochs=s.local_epochs,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            metrics_port=-1,
            max_workers=max(16, 4 * len(pending)),
        )
        key_file = self.home / "device.key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            write_new_key(key_file)
        before = {r.id for r in self.store.list_rounds(self.model_id)}
        server = XenoServer(config, store=self.store)
        ended = threading.Event()  # one round, completed or failed: no retry loop
        server.coordinator.add_listener(lambda _summary: ended.set())
        server.start()
        devices: list[_UserDevice] = []
        threads: list[threading.Thread] = []
        try:
            for user, p in pending.items():
                user_dir = hashlib.sha256(f"{self.model_id}\x00{user}".encode()).hexdigest()[:24]
                device = _UserDevice(
                    ClientConfig(
                        server=server.address,
                        state_dir=str(self.home / self.model_id / user_dir),
                        device_key_file=str(key_file),
                        max_wait_ms=1000,
                        max_backoff=1.0,
                        min_secagg_cohort=floor,
                    ),
                    p.data,
                    p.result,
                    p.base_version,
                    federation=self._federation_id(),
                )
                devices.append(device)
                threads.append(threading.Thread(target=device.run, daemon=True, name="user"))
            for t in threads:
                t.start()
            ended.wait(timeout=s.round_deadline_s * 2 + 30)
        finally:
            for d in devices:
                d.stop.set()
            for t in threads:
                t.join(timeout=30)
            for d in devices:
                d.close()
            server.stop(grace=0.5)
        rounds = [r for r in self.store.list_rounds(self.model_id) if r.id not in before]
        done = [r for r in rounds if r.status == "completed"]
        if not done:
            reasons = "; ".join(r.failure_reason for r in rounds if r.failure_reason)
            return {
                "success": False,
                "model_updated": False,
                "pending_updates": len(pending),
                "round": rounds[-1].number if rounds else None,
                "error": f"the round did not complete: {reasons or 'no round started'}",
            }
        last = done[-1]
        with self._lock:
            for user in pending:
                self._pending.pop(user, None)
        return {
            "success": True,
            "new_version": last.result_version,
            "round": last.number,
            "model_updated": True,
            "participants": last.participants,
            "privacy_enabled": self.privacy_enabled,
        }


class PersonalizedModelManager:
    """Federated models of an embedding app over the server's store (see the module docstring)."""

    def __init__(
        self,
        db: str | None = None,
        *,
        store: Store | None = None,
        home: str | Path | None = None,
        settings: FederationSettings | None = None,
    ) -> None:
        self._store = store or open_store(db)
        self._owns_store = store is None
        self._versions = VersionControl(self._store)
        base = Path(home or os.environ.get("XENO_HOME", "data"))
        self._home = base / "federated"
        self._settings = settings or FederationSettings()
        self._trainers: dict[str, FederatedTrainer] = {}
        self._labels: dict[str, tuple[str, ...]] = {}

    def close(self) -> None:
        if self._owns_store:
            self._store.close()

    def create_model(
        self,
        model_id: str,
        base_params: Any = None,
        privacy_enabled: bool = True,
        architecture: str | None = None,
    ) -> str:
        """Create (or reopen, when the weights' layout matches) a federated model."""
        if base_params is None:
            module = build_model(DEFAULT_INTENT_SPEC, seed=0)
            vector, manifest, spec = weights_of(module)
            spec = DEFAULT_INTENT_SPEC
            self._labels[model_id] = _intent_labels()
        else:
            vector, manifest, spec = weights_of(base_params, architecture)
            if spec is None and isinstance(base_params, torch.nn.Module):
                raise InvalidInputError(
                    "base_params is not a model-zoo architecture the devices can build; "
                    "pass architecture= or a state dict of a zoo model"
                )
            if spec is None:
                raise InvalidInputError(
                    "cannot infer the architecture of these weights: pass architecture="
                )
            if spec.architecture == "fasttext" and spec.config.get("num_classes") == 150:
                self._labels[model_id] = _intent_labels()
        assert manifest is not None
        existing = self._store.get_model(model_id)
        if existing is not None:
            if existing.manifest != manifest:
                raise InvalidInputError(
                    f"model {model_id!r} exists with a different layout; choose another id"
                )
        else:
            self._versions.create_version(
                model_id, vector, manifest, "app", "initial federated weights", None, spec
            )
        self._trainers[model_id] = FederatedTrainer(
            self._store, model_id, bool(privacy_enabled), self._home, self._settings
        )
        return model_id

    def _trainer(self, model_id: str) -> FederatedTrainer:
        trainer = self._trainers.get(model_id)
        if trainer is None:
            known = ", ".join(self._trainers) or "none"
            raise UnknownNameError(
                f"no federated model {model_id!r} in this manager; create_model first "
                f"(models: {known})"
            )
        return trainer

    def _dataset(self, model_id: str, local_data: Any) -> Dataset:
        spec = self._versions.spec(model_id)
        if isinstance(local_data, tuple) and len(local_data) == 2:
            x, y = local_data
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise InvalidInputError("local_data as a pair is (inputs, labels) tensors")
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise InvalidInputError("inputs and labels need the same, non-zero, length")
            xs = x.detach().cpu().numpy()
            xs = xs.astype(np.int64 if spec.architecture == "fasttext" else np.float32)
            return Dataset(xs, y.detach().cpu().numpy().astype(np.int64))
        if not isinstance(local_data, list) or not local_data:
            raise InvalidInputError(
                "local_data: a non-empty list of {'input_text', 'context': {'intent'}} "
                "examples, or an (inputs, labels) pair of tensors"
            )
        if spec.architecture != "fasttext":
            raise InvalidInputError(
                f"model {model_id!r} ({spec.architecture}) takes (inputs, labels) tensors"
            )
        labels = self._labels.get(model_id) or _intent_labels()
        index = {name: i for i, name in enumerate(labels)}
        texts: list[str] = []
        ys: list[int] = []
        for i, ex in enumerate(local_data):
            if not isinstance(ex, dict) or not isinstance(ex.get("input_text"), str):
                raise InvalidInputError(f"example {i} has no 'input_text' string")
            intent = (ex.get("context") or {}).get("intent")
            if intent not in index:
                raise InvalidInputError(
                    f"example {i}: intent {intent!r} is not one of the model's "
                    f"{len(labels)} intents (e.g. {', '.join(labels[:3])})"
                )
            texts.append(ex["input_text"])
            ys.append(index[intent])
        model = build_model(spec)
        assert isinstance(model, FastText)
        return Dataset(featurize(texts, model.features), np.asarray(ys, dtype=np.int64))

    def train_local_model(self, user_id: str, model_id: str, local_data: Any) -> dict[str, Any]:
        """Train on the user's data in this process; the update waits for the next round."""
        if not isinstance(user_id, str) or not user_id:
            raise InvalidInputError("user_id must be a non-empty string")
        trainer = self._trainer(model_id)
        data = self._dataset(model_id, local_data)
        result = trainer.train_local(user_id, data)
        out: dict[str, Any] = {
            "success": True,
            "pending_updates": trainer.pending_updates,
            "privacy_enabled": trainer.privacy_enabled,
            "examples": len(data),
        }
        if not trainer.privacy_enabled:
            out["train_loss"] = result.metrics.get("train_loss")
        return out

    def update_global_model(self, model_id: str, min_updates: int = 5) -> dict[str, Any]:
        """Aggregate the pending updates in one real round (secure aggregation, DP if on)."""
        if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 1:
            raise InvalidInputError(f"min_updates must be a whole number >= 1, got {min_updates!r}")
        return self._trainer(model_id).run_round(min_updates)

    def get_global_model(self, model_id: str) -> dict[str, torch.Tensor]:
        """The model's current global weights as a state dict."""
        from common.tensors import unflatten_to_state_dict

        self._trainer(model_id)
        vector, manifest = self._versions.weights(model_id)
        return unflatten_to_state_dict(vector, manifest)
