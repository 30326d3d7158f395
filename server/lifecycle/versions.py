"""Version control of the federation's models: history, rollback, comparison, tags, retention.

Every version, whoever made it (a round of the federation, an operator, an
embedding app), is a row of `model_versions` whose weights are a
content-addressed blob; a round's versions carry created_by "federation" and
their round. A rollback never rewrites history: it appends a new head whose
blob is the target's. The round coordinator trains from the store's head at
the start of each round, and a round in flight when the head moves fails as
superseded (Store.complete_round), so a rollback on a running server takes
effect from the next round on.

Retention (`prune`) keeps the newest N versions and every protected one
(Store.protected_versions: the head, tagged versions, versions an A/B test
uses); the server's own retention uses the same rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.modelspec import ModelSpec
from common.tensors import WIRE_DTYPE, Manifest, to_wire
from server.lifecycle.errors import ConflictError, InvalidInputError, UnknownNameError
from server.store import Store, utcnow
from server.store.models import ModelRow, ModelTagRow, ModelVersionRow, RoundRow

__all__ = [
    "DEFAULT_KEEP",
    "Reference",
    "VersionControl",
    "VersionRecord",
    "check_metrics",
    "parse_reference",
]

# The seed's best practices: keep at least 3 recent versions.
DEFAULT_KEEP = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
FEDERATION = "federation"


@dataclass(frozen=True)
class VersionRecord:
    model_name: str
    version: int
    parent_version: int | None
    created_by: str
    description: str
    metrics: dict[str, float]
    created_at: datetime
    sha256: str
    tags: list[str] = field(default_factory=list)
    round_number: int | None = None
    rollback_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_by": self.created_by,
            "description": self.description,
            "metrics": dict(self.metrics),
            "created_at": self.created_at.isoformat(),
            "sha256": self.sha256,
            "tags": list(self.tags),
            "round": self.round_number,
            "rollback_of": self.rollback_of,
        }


@dataclass(frozen=True)
class Reference:
    """`name`, `name:VERSION` or `name@TAG`: a model's head, a version, or an alias."""

    model: str
    version: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.model}:{self.version}"
        return f"{self.model}@{self.tag}" if self.tag else self.model


def parse_reference(text: str) -> Reference:
    text = text.strip()
    if "@" in text:
        name, tag = text.rsplit("@", 1)
        return Reference(name, tag=tag)
    if ":" in text:
        name, number = text.rsplit(":", 1)
        if not number.isdigit():
            raise InvalidInputError(
                f"bad model reference {text!r}: use NAME, NAME:VERSION or NAME@TAG"
            )
        return Reference(name, version=int(number))
    return Reference(text)


def check_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Metrics as finite floats keyed by non-empty names; InvalidInputError otherwise."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not key or len(key) > 64:
            raise InvalidInputError(f"metric names are 1-64 characters, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise InvalidInputError(f"metric {key!r} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise InvalidInputError(f"metric {key!r} is not finite: {value!r}")
        out[key] = float(value)
    return out


class VersionControl:
    """The version history of the store's models (domain layer; no gRPC)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ---------------------------------------------------------------- lookups
    def _model(self, s: Session, name: str, lock: bool = False) -> ModelRow:
        q = select(ModelRow).where(ModelRow.name == name)
        row = s.scalar(q.with_for_update() if lock else q)
        if row is None:
            known = ", ".join(s.scalars(select(ModelRow.name).order_by(ModelRow.id))) or "none"
            raise UnknownNameError(f"no model {name!r}; models: {known}")
        return row

    def _version_row(self, s: Session, model: ModelRow, version: int) -> ModelVersionRow:
        row = s.scalar(
            select(ModelVersionRow).where(
                ModelVersionRow.model_id == model.id, ModelVersionRow.version == version
            )
        )
        if row is None:
            numbers = list(
                s.scalars(
                    select(ModelVersionRow.version)
                    .where(ModelVersionRow.model_id == model.id)
                    .order_by(ModelVersionRow.version)
                )
            )
            raise UnknownNameError(
                f"model {model.name!r} has no version {version}; it has {_ranges(numbers)}"
            )
        return row

    def _tag_version(self, s: Session, model: ModelRow, tag: str) -> int:
        row = s.get(ModelTagRow, (model.id, tag))
        if row is None:
            tags = ", ".join(
                s.scalars(
                    select(ModelTagRow.tag)
                    .where(ModelTagRow.model_id == model.id)
                    .order_by(ModelTagRow.tag)
                )
            )
            raise UnknownNameError(
                f"model {model.name!r} has no tag {tag!r}; tags: {tags or 'none'}"
            )
        return row.version

    def resolve(self, reference: str | Reference) -> tuple[str, int]:
        """(model name, version) of `name`, `name:VERSION` or `name@TAG`."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        with self.store.session() as s:
            model = self._model(s, ref.model)
            if ref.tag is not None:
                return model.name, self._tag_version(s, model, ref.tag)
            if ref.version is not None:
                return model.name, self._version_row(s, model, ref.version).version
            return model.name, model.current_version

    def exists(self, name: str) -> bool:
        return self.store.get_model(name) is not None

    # ---------------------------------------------------------------- create
    def create_version(
        self,
        name: str,
        vector: np.ndarray,
        manifest: Manifest | None,
        created_by: str,
        description: str = "",
        metrics: dict[str, Any] | None = None,
        spec: ModelSpec | None = None,
        strategy: str = "fedavg",
    ) -> int:
        """Append a version holding vector as the model's new head; creates the model if new."""
        checked = check_metrics(metrics)
        vector = np.ascontiguousarray(vector, dtype=WIRE_DTYPE).reshape(-1)
        if not np.all(np.isfinite(vector)):
            raise InvalidInputError("the weights contain NaN or Inf values; nothing was stored")
        created_by = _who(created_by)
        now = utcnow()
        with self.store.session() as s, s.begin():
            model = s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
            if model is None:
                if not _NAME.match(name):
                    raise InvalidInputError(
                        f"bad model name {name!r}: 1-128 letters, digits, '_', '.', '-'"
                    )
                if manifest is None:
                    raise UnknownNameError(
                        f"no model {name!r}: its first version needs a torch module or a state "
                        "dict (flat weights carry no tensor layout)"
                    )
                if manifest.total_elements != vector.size:
                    raise InvalidInputError("the manifest does not describe the weights")
                spec = spec or ModelSpec("custom", {})
                model = ModelRow(
                    name=name,
                    architecture=spec.architecture,
                    config=spec.config,
                    manifest=manifest.to_json(),
                    num_parameters=manifest.total_elements,
                    strategy=strategy,
                    current_version=0,
                    created_at=now,
                )
                s.add(model)
                s.flush()
            else:
                known = Manifest.from_json(model.manifest)
                if manifest is not None and manifest != known:
                    raise InvalidInputError(
                        f"the weights' tensors do not match model {name!r} "
                        f"({len(manifest.tensors)} tensors / {manifest.total_elements} elements, "
                        f"the model has {len(known.tensors)} / {known.total_elements})"
                    )
                if vector.size != known.total_elements:
                    raise InvalidInputError(
                        f"{vector.size} weights given, model {name!r} has {known.total_elements}"
                    )
            digest = self.store.put_blob(s, to_wire(vector))
            version = model.current_version + 1
            s.add(
                ModelVersionRow(
                    model_id=model.id,
                    version=version,
                    parent_version=model.current_version or None,
                    blob_sha256=digest,
                    round_id=None,
                    metrics=checked,
                    description=description,
                    created_at=now,
                    created_by=created_by,
                )
            )
            model.current_version = version
        return version

    # ---------------------------------------------------------------- read
    def get(self, name: str, version: int | str | None = None) -> VersionRecord:
        """A version's record: the head without version, a number, or a tag name."""
        with self.store.session() as s:
            model = self._model(s, name)
            number = self._number(s, model, version)
            row = self._version_row(s, model, number)
            return self._records(s, model, [row])[0]

    def _number(self, s: Session, model: ModelRow, version: int | str | None) -> int:
        if version is None:
            return model.current_version
        if isinstance(version, str) and not version.isdigit():
            return self._tag_version(s, model, version)
        number = int(version)
        if isinstance(version, bool) or number < 1:
            raise InvalidInputError(f"versions are numbered from 1, got {version!r}")
        return number

    def history(self, name: str) -> list[VersionRecord]:
        with self.store.session() as s:
            model = self._model(s, name)
            rows = list(
                s.scalars(
                    select(ModelVersionRow)
                    .where(ModelVersionRow.model_id == model.id)
                    .order_by(ModelVersionRow.version)
                )
            )
            return self._records(s, model, rows)

    def _records(
        self, s: Session, model: ModelRow, rows: list[ModelVersionRow]
    ) -> list[VersionRecord]:
        tags: dict[int, list[str]] = {}
        for tag, version in s.execute(
            select(ModelTagRow.tag, ModelTagRow.version)
            .where(ModelTagRow.model_id == model.id)
            .order_by(ModelTagRow.tag)
        ):
            tags.setdefault(version, []).append(tag)
        round_ids = [r.round_id for r in rows if r.round_id]
        numbers: dict[str, int] = {}
        if round_ids:
            numbers = {
                rid: n
                for rid, n in s.execute(
                    select(RoundRow.id, RoundRow.number).where(RoundRow.id.in_(round_ids))
                )
            }
        return [
            VersionRecord(
                model_name=model.name,
                version=r.version,
                parent_version=r.parent_version,
                created_by=r.created_by or (FEDERATION if r.round_id else "server"),
                description=r.description,
                metrics={k: float(v) for k, v in (r.metrics or {}).items()},
                created_at=r.created_at,
                sha256=r.blob_sha256,
                tags=tags.get(r.version, []),
                round_number=numbers.get(r.round_id) if r.round_id else None,
                rollback_of=r.rollback_of,
            )
            for r in rows
        ]

    def weights(self, name: str, version: int | str | None = None) -> tuple[np.ndarray, Manifest]:
        """(flat float32 weights, manifest) of a version, SHA-256 checked."""
        with self.store.session() as s:
            model = self._model(s, name)
            number = self._number(s, model, version)
            self._version_row(s, model, number)
            manifest = Manifest.from_json(model.manifest)
        return self.store.load_version(name, number), manifest

    def spec(self, name: str) -> ModelSpec:
        with self.store.session() as s:
            model = self._model(s, name)
            return ModelSpec(model.architecture, dict(model.config))

    # ---------------------------------------------------------------- rollback
    def rollback(self, name: str, target: int, created_by: str, reason: str = "") -> int:
        """A new head version with the target's weights; returns its number."""
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise InvalidInputError(f"a rollback target is a version number >= 1, got {target!r}")
        who = _who(created_by)
        now = utcnow()
        with self.store.session() as s, s.begin():
            model = self._model(s, name, lock=True)
            row = self._version_row(s, model, target)
            if target == model.current_version:
                raise ConflictError(
                    f"version {target} is already the head of model {name!r}; nothing to roll back"
                )
            version = model.current_version + 1
            why = f"rollback to version {target}" + (f": {reason}" if reason else "")
            s.add(
                ModelVersionRow(
                    model_id=model.id,
                    version=version,
                    parent_version=model.current_version,
                    blob_sha256=row.blob_sha256,
                    round_id=None,
                    metrics=dict(row.metrics or {}),
                    description=why,
                    created_at=now,
                    created_by=who,
                    rollback_of=target,
                )
            )
            model.current_version = version
        return version

    # ---------------------------------------------------------------- compare
    def compare(self, name: str, a: int | str, b: int | str) -> dict[str, Any]:
        """Metric changes from a to b (as the seed shows) and the L2 / cosine weight distance."""
        ra, rb = self.get(name, a), self.get(name, b)
        changes: dict[str, dict[str, float | None]] = {}
        for key in sorted(set(ra.metrics) & set(rb.metrics)):
            v1, v2 = ra.metrics[key], rb.metrics[key]
            change = v2 - v1
            changes[key] = {
                "v1": v1,
                "v2": v2,
                "change": round(change, 10),
                "change_percent": round(change / abs(v1) * 100, 2) if v1 != 0 else None,
            }
        wa = self.store.load_version(name, ra.version).astype(np.float64)
        wb = self.store.load_version(name, rb.version).astype(np.float64)
        na, nb = float(np.linalg.norm(wa)), float(np.linalg.norm(wb))
        cosine = float(wa @ wb) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        return {
            "model_name": name,
            "version_a": ra.version,
            "version_b": rb.version,
            "metric_changes": changes,
            "only_in_a": sorted(set(ra.metrics) - set(rb.metrics)),
            "only_in_b": sorted(set(rb.metrics) - set(ra.metrics)),
            "weight_distance": {
                "l2": float(np.linalg.norm(wb - wa)),
                "cosine_similarity": cosine,
                "cosine_distance": 1.0 - cosine,
            },
        }

    # ---------------------------------------------------------------- tags
    def tag(self, name: str, version: int | str | None, tag: str, created_by: str = "") -> int:
        """Point tag at a version (moving it if it pointed elsewhere); returns the version."""
        if not _TAG.match(tag or ""):
            raise InvalidInputError(
                f"bad tag {tag!r}: 1-64 letters, digits, '_', '.', '-', starting with a letter"
            )
        with self.store.session() as s, s.begin():
            model = self._model(s, name, lock=True)
            number = self._number(s, model, version)
            self._version_row(s, model, number)
            row = s.get(ModelTagRow, (model.id, tag))
            if row is None:
                s.add(
                    ModelTagRow(
                        model_id=model.id,
                        tag=tag,
                        version=number,
                        created_by=_who(created_by or "operator"),
                        updated_at=utcnow(),
                    )
                )
            else:
                row.version = number
                row.created_by = _who(created_by or "operator")
                row.updated_at = utcnow()
        return number

    def untag(self, name: str, tag: str) -> int:
        """Remove a tag; returns the version it pointed at."""
        with self.store.session() as s, s.begin():
            model = self._model(s, name, lock=True)
            version = self._tag_version(s, model, tag)
            row = s.get(ModelTagRow, (model.id, tag))
            s.delete(row)
            return version

    def tags(self, name: str) -> dict[str, int]:
        with self.store.session() as s:
            model = self._model(s, name)
            return {
                t: v
                for t, v in s.execute(
                    select(ModelTagRow.tag, ModelTagRow.version)
                    .where(ModelTagRow.model_id == model.id)
                    .order_by(ModelTagRow.tag)
                )
            }

    # ---------------------------------------------------------------- retention
    def prune(self, name: str, keep: int = DEFAULT_KEEP) -> list[int]:
        """Delete all but the newest `keep` versions, never a protected one; the deleted numbers."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InvalidInputError(f"keep must be a whole number >= 1, got {keep!r}")
        if self.store.get_model(name) is None:
            with self.store.session() as s:
                self._model(s, name)  # raises with the known names
        return self.store.prune_versions(name, keep)


def _who(created_by: str) -> str:
    who = (created_by or "").strip()
    if not who:
        raise InvalidInputError("created_by must name who made the version")
    if len(who) > 128:
        raise InvalidInputError("created_by is at most 128 characters")
    return who


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "no versions"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return (
            f"versions {numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else f"version {numbers[0]}"
        )
    return "versions " + ", ".join(str(n) for n in numbers)
