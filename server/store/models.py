"""SQLAlchemy 2.0 ORM tables of the aggregation server.

Model weights and server optimizer state live in `blobs`, addressed by their
SHA-256; versions and rounds reference them. Nothing here is pickled: blobs are raw little-endian
float32 bytes and structured values are JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # SHA-256 of the bearer token; the token itself is never stored.
    token_sha256: Mapped[str] = mapped_column(String(64))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Raw Ed25519 public key the device signs its secure-aggregation round keys with.
    identity_public_key: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # With mTLS: the common name of the device certificate it registered with; every later
    # call must come with that certificate.
    cert_name: Mapped[str | None] = mapped_column(String(64), default=None)
    # The token stops working at this time unless renewed by use (--token-ttl); None: never.
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Set when the device registered again (or was revoked): its token no longer works.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # RegisterResponse.enrollment_index: the smallest not held by a live device (Forget
    # deletes the row and so releases it).
    enrollment_index: Mapped[int | None] = mapped_column(default=None)


class BlobRow(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest: Mapped[list[Any]] = mapped_column()
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    strategy: Mapped[str] = mapped_column(String(32))
    current_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelDefinitionRow(Base):
    """How the server trains a model (server/modelconf.py) and whether it is paused.

    Written when a model is created (flags, models file or `xeno-fl admin models
    create`) and when it is paused or resumed, so a restarted server trains the
    same models with the same settings and keeps paused ones paused.
    """

    __tablename__ = "model_definitions"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    task: Mapped[str] = mapped_column(String(32))
    # Every ModelSettings field, by name (JSON; never pickled).
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # flags: the server's default model; file: --models; admin: created over the Admin API.
    source: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    # The server optimizer's state after this version (raw LE float32 arrays, one blob) and
    # its manifest {"strategy": name, "tensors": [{"name", "shape"}...]}; None: stateless.
    optimizer_state_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("blobs.sha256", name="fk_model_versions_optimizer_state_blob"), default=None
    )
    optimizer_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    round_id: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # "federation" for a round's version, else whoever made it (an operator, an app).
    created_by: Mapped[str] = mapped_column(String(128), default="")
    # A rollback's new head copies this version's weights.
    rollback_of: Mapped[int | None] = mapped_column(Integer)
    # With a data key: `KEYID:HMAC` over the version's blob mapping and metrics
    # (server/store/sealing.py), so substituted weights or edited metrics are detected.
    mac: Mapped[str | None] = mapped_column(String(96), default=None)


class RoundRow(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    base_version: Mapped[int] = mapped_column(Integer)
    result_version: Mapped[int | None] = mapped_column(Integer)
    selected: Mapped[int] = mapped_column(Integer, default=0)
    participants: Mapped[int] = mapped_column(Integer, default=0)
    dropouts: Mapped[int] = mapped_column(Integer, default=0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    failure_reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RoundParticipantRow(Base):
    __tablename__ = "round_participants"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    # reported, uploaded (no metrics), dropped, declined
    status: Mapped[str] = mapped_column(String(16))
    num_examples: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    note: Mapped[str] = mapped_column(Text, default="")
    # With a data key: num_examples, metrics and note sealed here (the columns above stay
    # empty), since they say something about the person using the device.
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class PrivacyLedgerRow(Base):
    """One DP release of a model: what was spent in a round, and the total after it."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (UniqueConstraint("round_id", "level"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"))
    round_number: Mapped[int] = mapped_column(Integer)
    # "user": noise on the global model's sum; "sample": DP-SGD reported by devices.
    level: Mapped[str] = mapped_column(String(16))
    mechanism: Mapped[str] = mapped_column(String(32))
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float, default=1.0)
    steps: Mapped[int] = mapped_column(Integer, default=1)
    clip_norm: Mapped[float] = mapped_column(Float)
    cohort: Mapped[int] = mapped_column(Integer)
    # Skellam: L2 sensitivity in integer units and the update length (L1 bound).
    sensitivity: Mapped[float] = mapped_column(Float, default=0.0)
    dimension: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# Model lifecycle (server/lifecycle/): tags, performance history and alerts, A/B tests.


class ModelTagRow(Base):
    """An alias (`production`, `staging`, any name) pointing at one version of a model."""

    __tablename__ = "model_tags"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PerformanceMetricRow(Base):
    """One observation of a model's metric (a round's accuracy, a device's latency, ...)."""

    __tablename__ = "performance_metrics"
    __table_args__ = (Index("ix_performance_metrics_series", "model_id", "metric", "recorded_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[int | None] = mapped_column(Integer)
    round_number: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PerformanceAlertRow(Base):
    """A degradation the tracker detected: a degrading trend or a value far off its baseline."""

    __tablename__ = "performance_alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    metric: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[float] = mapped_column(Float)
    baseline: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AbTestRow(Base):
    """An A/B test between two pinned model versions."""

    __tablename__ = "ab_tests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # The references as given (name, name:version or name@alias) and what they resolved to.
    model_a: Mapped[str] = mapped_column(String(256))
    model_b: Mapped[str] = mapped_column(String(256))
    model_a_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version_a: Mapped[int] = mapped_column(Integer)
    model_b_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version_b: Mapped[int] = mapped_column(Integer)
    traffic_split: Mapped[float] = mapped_column(Float)
    metrics: Mapped[list[Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16))
    winner: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AbResultRow(Base):
    """One observed value of one metric in one arm of an A/B test."""

    __tablename__ = "ab_results"
    __table_args__ = (Index("ix_ab_results_arm", "test_id", "metric", "variant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    test_id: Mapped[int] = mapped_column(ForeignKey("ab_tests.id"))
    variant: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    # Who reported it, for Forget: `Store.device_ref` (a keyed pseudonym with a data
    # key, the device id without one); "" for bulk imports.
    device_ref: Mapped[str] = mapped_column(String(96), default="")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One entry of the hash-chained audit log (server/store/audit.py); never updated."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # "system", "device dev-...", or "admin NAME (ROLE)"
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(Base):
    """The newest audit entry (one row, id 1): locked while an entry is appended."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class DataKeyRow(Base):
    """The id of the data key the database is sealed under (one row, id 1).

    `rotating_to` is set while a rotation is in progress, until every value is re-sealed.
    """

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    key_id: Mapped[str] = mapped_column(String(16))
    rotating_to: Mapped[str | None] = mapped_column(String(16), default=None)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RevokedCertificateRow(Base):
    """A revoked certificate, checked by the auth interceptor on every mTLS call.

    By serial, or (serial "") every certificate of kind and name issued up to revoked_at.
    """

    __tablename__ = "revoked_certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    serial: Mapped[str] = mapped_column(String(40), default="")
    kind: Mapped[str] = mapped_column(String(16), default="")
    name: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
