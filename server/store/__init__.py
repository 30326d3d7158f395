"""Persistence of devices, models, versions and rounds (SQLAlchemy 2.0; SQLite or PostgreSQL).

`Store` is the repository the domain layer talks to. Each state change is
one transaction; a round's new version (blob, version row, round row,
participants, model pointer) is written in a single commit so a crash
leaves either all of it or none.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Engine, create_engine, delete, event, exc, select, text, update
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from common.atrest import DataKeyError, Sealer, is_sealed
from common.modelspec import ModelSpec
from common.tensors import WIRE_DTYPE, Manifest, to_wire
from server.faults import crash_point
from server.store import audit, sealing
from server.store.lock import WritesSuspendedError
from server.store.models import (
    AbResultRow,
    AbTestRow,
    AuditHeadRow,
    AuditRow,
    BlobRow,
    DataKeyRow,
    DeviceRow,
    ModelDefinitionRow,
    ModelRow,
    ModelTagRow,
    ModelVersionRow,
    PrivacyLedgerRow,
    RevokedCertificateRow,
    RoundParticipantRow,
    RoundRow,
)

__all__ = [
    "CorruptBlobError",
    "DeviceRecord",
    "ModelDefinition",
    "ModelExistsError",
    "ModelRecord",
    "OptimizerState",
    "ParticipantRecord",
    "PrivacyRecord",
    "Store",
    "SupersededError",
    "describe_error",
    "is_transient",
    "retry_transient",
    "store_unavailable",
    "utcnow",
]


log = logging.getLogger("xeno.server.store")
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_transient(error: BaseException) -> bool:
    """Whether a failed database call may succeed when tried again.

    Lost or refused connections, a server restarting, SQLite's "database is
    locked" and "database or disk is full" (space can be freed), pool timeouts,
    writes suspended while the database lock is away (server/store/lock.py).
    Integrity errors and programming errors are not: trying again cannot help.
    """
    if isinstance(error, WritesSuspendedError):
        return True
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError)


def store_unavailable(error: BaseException) -> bool:
    """Whether a call failed because the database cannot be reached or written just now.

    SQLAlchemy's transient errors, and the driver's own connection errors where one
    escapes unwrapped (psycopg's OperationalError from a connection that died between
    two statements): a caller should come back later, nothing it sent was wrong.
    """
    if is_transient(error):
        return True
    try:
        import psycopg
    except ImportError:  # SQLite-only installs
        return False
    return isinstance(error, psycopg.OperationalError)


def describe_error(error: BaseException) -> str:
    """One line for logs and failure reasons: the error's type and first line, no SQL, no URL."""
    inner = getattr(error, "orig", None) or error
    first = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {first}"[:300] if first else type(inner).__name__


def retry_transient(
    call: Callable[[], T],
    budget_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    base_s: float = 0.05,
) -> T:
    """call(), tried again with exponential backoff while it fails transiently, for budget_s.

    Only safe for calls that are idempotent or that commit nothing when they fail:
    every write of the round coordinator is (see Store.complete_round).
    """
    deadline = time.monotonic() + budget_s
    delay = base_s
    while True:
        try:
            return call()
        except Exception as error:
            left = deadline - time.monotonic()
            if not is_transient(error) or left <= 0:
                raise
            log.warning("%s failed (%s); retrying in %.2fs", what, describe_error(error), delay)
            sleep(min(delay, left))
            delay = min(delay * 2, 2.0)


class CorruptBlobError(RuntimeError):
    """A stored blob does not match its SHA-256 address."""


class ModelExistsError(ValueError):
    """A model of that name already exists."""


class SupersededError(RuntimeError):
    """A round's result would land on a head that moved meanwhile (a rollback, a new version)."""


@dataclass(frozen=True)
class OptimizerState:
    """A server strategy's per-parameter state: named float32 arrays.

    Stored like model weights (nothing pickled): the arrays as one raw little-endian
    float32 blob, in manifest order, plus a JSON manifest of names and shapes.
    """

    strategy: str
    arrays: dict[str, np.ndarray]

    def manifest(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "tensors": [{"name": k, "shape": list(v.shape)} for k, v in self.arrays.items()],
        }

    def to_wire(self) -> bytes:
        return b"".join(
            to_wire(np.asarray(v, dtype=np.float32).ravel()) for v in self.arrays.values()
        )

    @classmethod
    def from_wire(cls, manifest: dict[str, Any], data: bytes) -> OptimizerState:
        flat = np.frombuffer(data, dtype=WIRE_DTYPE)
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for tensor in manifest["tensors"]:
            shape = tuple(int(x) for x in tensor["shape"])
            size = int(np.prod(shape, dtype=np.int64))
            arrays[str(tensor["name"])] = flat[offset : offset + size].reshape(shape).copy()
            offset += size
        if offset != flat.size:
            raise CorruptBlobError("the optimizer state blob does not match its manifest")
        return cls(str(manifest["strategy"]), arrays)


@dataclass(frozen=True)
class ModelRecord:
    name: str
    spec: ModelSpec
    manifest: Manifest
    num_parameters: int
    strategy: str
    current_version: int
    created_at: datetime


@dataclass(frozen=True)
class ModelDefinition:
    """How the server trains a model: its settings (server/modelconf.py) and pause state."""

    name: str
    task: str
    settings: dict[str, Any]
    paused: bool = False
    source: str = "admin"


@dataclass(frozen=True)
class PrivacyRecord:
    """A round's DP release as the ledger keeps it (see PrivacyLedgerRow)."""

    level: str
    mechanism: str
    noise_multiplier: float
    clip_norm: float
    cohort: int
    epsilon: float
    delta: float
    sample_rate: float = 1.0
    steps: int = 1
    sensitivity: float = 0.0
    dimension: int = 0
    round_id: str = ""
    round_number: int = 0
    created_at: datetime | None = None


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    token_sha256: str
    identity_public_key: bytes | None
    cert_name: str | None
    token_expires_at: datetime | None
    revoked_at: datetime | None
    enrollment_index: int | None = None


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were written in UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


@dataclass(frozen=True)
class ParticipantRecord:
    device_id: str
    status: str
    num_examples: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    metrics: dict[str, float] | None = None
    note: str = ""


_REVISION = re.compile(r'^(down_revision|revision)\s*=\s*(?:"([^"]*)"|None)', re.M)


def _head_revision() -> str | None:
    """The newest migration's id, read from the migration files (Alembic is not imported)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (Path(__file__).parent / "migrations" / "versions").glob("*.py"):
        for kind, value in _REVISION.findall(path.read_text()):
            if value:
                (revisions if kind == "revision" else parents).add(value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def make_engine(url: str) -> Engine:
    """Engine for url; SQLite gets WAL, a busy timeout and its parent folder created."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    args: dict[str, Any] = {}
    if url.startswith("postgresql") and "connect_timeout" not in url:
        args["connect_timeout"] = 5  # an unreachable server must not hang a round for minutes
    return create_engine(url, pool_pre_ping=True, connect_args=args)


class Store:
    """Repository over one database URL."""

    def __init__(
        self, url: str, sealer: Sealer | None = None, allow_unauthenticated: bool = False
    ) -> None:
        """A repository over url; with a sealer, sealed blobs and rows and MACed versions.

        Blobs and per-device rows are AES-GCM encrypted at rest and versions carry a
        MAC (server/store/sealing.py).

        allow_unauthenticated: only for a key rotation, which authenticates rows written
        before version MACs existed.
        """
        self.url = url
        self.sealer = sealer
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        sealing.install(
            self._session,
            sealing.RecordSealer(sealer, allow_unauthenticated)
            if sealer is not None
            else sealing.KeylessRecords(),
        )
        # Every flush appends its auditable changes to the audit chain, in its transaction.
        event.listen(self._session, "after_flush", audit.record_changes)
        # Called with the connection of every writing transaction before it writes;
        # raises to refuse (a server: while a key rotation may hold the database).
        self.write_guard: Callable[[Any], None] | None = None
        event.listen(self._session, "before_flush", self._guard_flush)
        event.listen(self._session, "do_orm_execute", self._guard_statement)

    def _guard_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        if self.write_guard is not None and (session.new or session.dirty or session.deleted):
            self.write_guard(session.connection())

    def _guard_statement(self, state: ORMExecuteState) -> None:
        if self.write_guard is not None and (state.is_insert or state.is_update or state.is_delete):
            self.write_guard(state.session.connection())

    @property
    def local_dir(self) -> str | None:
        """The folder of a SQLite database file (None for in-memory and server databases)."""
        database = self.engine.url.database
        if self.engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return None
        return str(Path(database).resolve().parent)

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (creating it in an empty database).

        A database already at the newest migration is left alone without importing
        Alembic, which alone took ~0.8 s of a restart.
        """
        if self._stored_revision() != _head_revision():
            self.migrate("head")
        if self.sealer is not None:
            self.check_data_key()

    def check_data_key(self) -> None:
        """Refuse a data key that is not the database's, or a rotation left unfinished.

        The first start with a key records its id; a database sealed under another key
        (rotated, or a wrong key file) stops here with what to do, not at the first read.
        """
        assert self.sealer is not None
        with self._session.begin() as s:
            row = s.get(DataKeyRow, 1)
            if row is None:
                s.add(DataKeyRow(id=1, key_id=self.sealer.key_id, rows_done=0, updated_at=utcnow()))
                return
            if row.rotating_to is not None:
                raise DataKeyError(
                    f"a data key rotation from key id {row.key_id} to key id {row.rotating_to} "
                    "was interrupted: finish it with the same command, `xeno-fl admin "
                    "rotate-key --new-key-file NEW` (the server must be stopped)"
                )
            if row.key_id != self.sealer.key_id:
                raise DataKeyError(
                    f"the configured data key (id {self.sealer.key_id}) is not this "
                    f"database's key (id {row.key_id}); if the key was rotated, configure "
                    "the new key file"
                )

    def _stored_revision(self) -> str | None:
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        except exc.DBAPIError:
            return None  # no alembic_version table yet
        return str(rows[0][0]) if len(rows) == 1 else None

    def migrate(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to `revision` on this database."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def schema_revision(self) -> str | None:
        from alembic.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise when the database does not answer."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def session(self) -> Session:
        return self._session()

    # devices ---------------------------------------------------------------
    def add_device(
        self,
        device_id: str,
        token_sha256: str,
        labels: dict[str, str],
        identity_public_key: bytes | None = None,
        cert_name: str | None = None,
        token_expires_at: datetime | None = None,
        revoke: tuple[str, ...] = (),
        enrollment_index: int | None = None,
    ) -> None:
        """Add a device and, in the same transaction, revoke the devices in `revoke`.

        `revoke`: the same device's earlier registrations, whose tokens must stop working.
        """
        now = utcnow()
        with self._session.begin() as s:
            if revoke:
                for row in s.scalars(
                    select(DeviceRow).where(
                        DeviceRow.id.in_(revoke), DeviceRow.revoked_at.is_(None)
                    )
                ):
                    row.revoked_at = now
            s.add(
                DeviceRow(
                    id=device_id,
                    token_sha256=token_sha256,
                    labels=labels,
                    identity_public_key=identity_public_key,
                    created_at=now,
                    cert_name=cert_name,
                    token_expires_at=token_expires_at,
                    enrollment_index=enrollment_index,
                )
            )

    def forget_device(self, device_id: str) -> tuple[int, int]:
        """Erase a device's registration, participation rows and A/B results in one transaction.

        Returns (participation rows, A/B result rows) deleted. Aggregated model
        versions and the model's privacy ledger hold no per-device data and stay.
        """
        with self._session.begin() as s:
            parts = s.execute(
                delete(RoundParticipantRow).where(RoundParticipantRow.device_id == device_id)
            )
            # The plain id too: rows from before migration 0012 not yet rotated.
            refs = {device_id, self.device_ref(device_id)}
            results = s.execute(delete(AbResultRow).where(AbResultRow.device_ref.in_(refs)))
            s.execute(delete(DeviceRow).where(DeviceRow.id == device_id))
        return int(parts.rowcount or 0), int(results.rowcount or 0)  # type: ignore[attr-defined]

    def device_ref(self, device_id: str) -> str:
        """How rows kept in the clear name a device: its pseudonym under the data key."""
        if not device_id or self.sealer is None:
            return device_id
        return self.sealer.pseudonym(device_id)

    def device_credentials(self) -> dict[str, tuple[str, bytes | None]]:
        """device id -> (token digest, identity public key)."""
        with self.session() as s:
            rows = s.execute(
                select(DeviceRow.id, DeviceRow.token_sha256, DeviceRow.identity_public_key)
            )
            return {row[0]: (row[1], row[2]) for row in rows}

    def device_records(self) -> list[DeviceRecord]:
        """Every device's credentials, certificate binding, expiry and revocation."""
        with self.session() as s:
            return [
                DeviceRecord(
                    r.id,
                    r.token_sha256,
                    r.identity_public_key,
                    r.cert_name,
                    _aware(r.token_expires_at),
                    _aware(r.revoked_at),
                    r.enrollment_index,
                )
                for r in s.scalars(select(DeviceRow).order_by(DeviceRow.created_at))
            ]

    def renew_token(self, device_id: str, expires_at: datetime) -> None:
        with self._session.begin() as s:
            s.execute(
                update(DeviceRow)
                .where(DeviceRow.id == device_id)
                .values(token_expires_at=expires_at)
            )

    def append_audit(self, rows: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        """Append (actor, action, target, details) rows to the audit log in one transaction."""
        with self._session.begin() as s:
            if self.write_guard is not None:  # audit.append writes on the connection directly
                self.write_guard(s.connection())
            for actor, action, target, details in rows:
                audit.append(s, actor, [(action, target, details)])

    # certificate revocation -------------------------------------------------
    def revoke_certificate(
        self, serial: str = "", kind: str = "", name: str = "", reason: str = ""
    ) -> RevokedCertificateRow:
        """Revoke a certificate by serial, or every one of kind and name issued until now."""
        if bool(serial) == bool(kind and name):
            raise ValueError("revoke either a serial, or a kind and a name")
        with self._session.begin() as s:
            row = RevokedCertificateRow(
                serial=serial.lower(), kind=kind, name=name, reason=reason, revoked_at=utcnow()
            )
            s.add(row)
        return row

    def revoked_certificates(self) -> list[RevokedCertificateRow]:
        with self.session() as s:
            return list(s.scalars(select(RevokedCertificateRow).order_by(RevokedCertificateRow.id)))

    # blobs -----------------------------------------------------------------
    def put_blob(self, s: Session, data: bytes) -> str:
        """Add data as a content-addressed blob inside the caller's transaction; its SHA-256."""
        return self._put_blob(s, data)

    def _put_blob(self, s: Session, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if s.get(BlobRow, digest) is None:
            stored = self.sealer.seal(data, digest.encode()) if self.sealer else data
            s.add(BlobRow(sha256=digest, size=len(data), data=stored))
        return digest

    def read_blob(self, digest: str) -> bytes:
        with self.session() as s:
            row = s.get(BlobRow, digest)
            if row is None:
                raise KeyError(f"no blob {digest}")
            data = bytes(row.data)
        if is_sealed(data):
            if self.sealer is None:
                raise DataKeyError("model blobs are encrypted: configure the server's data key")
            data = self.sealer.open(data, digest.encode())
        elif self.sealer is not None:
            # With a data key every blob is written sealed: a plaintext one was put there
            # behind the server's back (substituted weights), and is not loaded.
            raise DataKeyError(
                f"blob {digest} is stored unencrypted although a data key is configured: it "
                "was not written by this server; restore it from a backup"
            )
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptBlobError(f"blob {digest} fails its SHA-256 check; the store is corrupt")
        return data

    # models and versions ---------------------------------------------------
    def get_model(self, name: str) -> ModelRecord | None:
        with self.session() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            return None if row is None else _model_record(row)

    def list_models(self) -> list[ModelRecord]:
        with self.session() as s:
            return [_model_record(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.id))]

    def create_model(
        self,
        name: str,
        spec: ModelSpec,
        manifest: Manifest,
        strategy: str,
        initial: np.ndarray,
        definition: ModelDefinition | None = None,
    ) -> ModelRecord:
        """Create the model with version 1 holding the initial weights (and its definition).

        Raises ModelExistsError when a model of that name exists; nothing is written then.
        """
        now = utcnow()
        with self._session.begin() as s:
            if s.scalar(select(ModelRow.id).where(ModelRow.name == name)) is not None:
                raise ModelExistsError(f"a model named {name!r} already exists")
            digest = self._put_blob(s, to_wire(initial))
            row = ModelRow(
                name=name,
                architecture=spec.architecture,
                config=spec.config,
                manifest=manifest.to_json(),
                num_parameters=manifest.total_elements,
                strategy=strategy,
                current_version=1,
                created_at=now,
            )
            s.add(row)
            s.flush()
            s.add(
                ModelVersionRow(
                    model_id=row.id,
                    version=1,
                    parent_version=None,
                    blob_sha256=digest,
                    round_id=None,
                    metrics={},
                    description="initial weights",
                    created_at=now,
                    created_by="server",
                )
            )
            if definition is not None:
                s.add(_definition_row(row.id, definition, now))
            return _model_record(row)

    def model_definitions(self) -> list[ModelDefinition]:
        """Every stored model definition, oldest model first."""
        with self.session() as s:
            rows = s.execute(
                select(ModelRow.name, ModelDefinitionRow)
                .join(ModelDefinitionRow, ModelDefinitionRow.model_id == ModelRow.id)
                .order_by(ModelRow.id)
            ).all()
            return [_definition(name, row) for name, row in rows]

    def model_definition(self, name: str) -> ModelDefinition | None:
        return next((d for d in self.model_definitions() if d.name == name), None)

    def define_model(self, definition: ModelDefinition) -> ModelDefinition:
        """Store the settings of an existing model; a stored pause state is kept.

        Returns the definition as stored (with its pause state). KeyError: no such model.
        """
        with self._session.begin() as s:
            model_id = s.scalar(select(ModelRow.id).where(ModelRow.name == definition.name))
            if model_id is None:
                raise KeyError(definition.name)
            row = s.get(ModelDefinitionRow, model_id)
            if row is None:
                row = _definition_row(model_id, definition, utcnow())
                s.add(row)
            elif (row.task, row.settings, row.source) != (
                definition.task,
                definition.settings,
                definition.source,
            ):
                row.task = definition.task
                row.settings = dict(definition.settings)
                row.source = definition.source
                row.updated_at = utcnow()
            return _definition(definition.name, row)

    def delete_model_definition(self, name: str) -> ModelDefinition:
        """Remove a model's definition (its model row, versions and ledger stay).

        Returns the definition removed. KeyError: the model has no definition.
        """
        with self._session.begin() as s:
            row = _locked_definition(s, name)
            removed = _definition(name, row)
            s.delete(row)
            return removed

    def set_model_paused(self, name: str, paused: bool) -> bool:
        """Pause or resume a defined model; False when it already was (nothing written).

        KeyError: the model has no definition.
        """
        with self._session.begin() as s:
            row = _locked_definition(s, name)
            if row.paused == paused:
                return False
            row.paused = paused
            row.updated_at = utcnow()
            return True

    def load_version(self, name: str, version: int) -> np.ndarray:
        """Weights of a version as a float32 vector, SHA-256 checked."""
        with self.session() as s:
            # The whole row, so that its MAC is checked (sealing.RecordSealer).
            row = s.scalar(
                select(ModelVersionRow)
                .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
                .where(ModelRow.name == name, ModelVersionRow.version == version)
            )
        if row is None:
            raise KeyError(f"model {name!r} has no version {version}")
        return np.frombuffer(self.read_blob(row.blob_sha256), dtype=WIRE_DTYPE).copy()

    def load_optimizer_state(self, name: str, version: int) -> OptimizerState | None:
        """The server optimizer's state stored with a version (None: none was stored)."""
        with self.session() as s:
            row = s.scalar(
                select(ModelVersionRow)
                .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
                .where(ModelRow.name == name, ModelVersionRow.version == version)
            )
        if row is None:
            raise KeyError(f"model {name!r} has no version {version}")
        digest, manifest = row.optimizer_state_sha256, row.optimizer_state
        if digest is None or manifest is None:
            return None
        return OptimizerState.from_wire(manifest, self.read_blob(digest))

    def list_versions(self, name: str) -> list[ModelVersionRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(ModelVersionRow)
                    .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
                    .where(ModelRow.name == name)
                    .order_by(ModelVersionRow.version)
                )
            )

    def protected_versions(self, name: str) -> set[int]:
        """Versions retention never deletes: the head, every tagged version, every A/B-tested one.

        The one rule shared by `prune` (server/lifecycle) and the server's own retention.
        """
        with self.session() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if model is None:
                return set()
            return self._protected(s, model)

    @staticmethod
    def _protected(s: Session, model: ModelRow) -> set[int]:
        keep = {model.current_version}
        keep.update(s.scalars(select(ModelTagRow.version).where(ModelTagRow.model_id == model.id)))
        keep.update(s.scalars(select(AbTestRow.version_a).where(AbTestRow.model_a_id == model.id)))
        keep.update(s.scalars(select(AbTestRow.version_b).where(AbTestRow.model_b_id == model.id)))
        return keep

    def prune_versions(
        self,
        name: str,
        keep: int,
        keep_every: int = 0,
        limit: int = 0,
        keep_restored: bool = False,
    ) -> list[int]:
        """Delete all but the newest `keep` versions except protected ones; blobs no version uses.

        With keep_every K, every version whose number is 1 modulo K (1, K + 1, 2K + 1, ...)
        is kept too; with limit L, at most the L oldest doomed versions go, so a large
        backlog is deleted in small transactions (call again until it returns []); with
        keep_restored, every version a rollback restored (`rollback_of`) is kept too.
        Returns the deleted version numbers. One transaction, with the model row locked,
        so a tag or an A/B test created meanwhile is seen.
        """
        if keep < 1:
            raise ValueError("keep at least one version")
        with self._session.begin() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
            if model is None:
                raise KeyError(f"no model {name!r}")
            rows = s.scalars(
                select(ModelVersionRow)
                .where(ModelVersionRow.model_id == model.id)
                .order_by(ModelVersionRow.version.desc())
            ).all()
            protected = self._protected(s, model)
            if keep_restored:
                protected.update(r.rollback_of for r in rows if r.rollback_of is not None)
            doomed = [
                r
                for r in rows[keep:]
                if r.version not in protected
                and not (keep_every and (r.version - 1) % keep_every == 0)
            ]
            if limit:
                doomed = sorted(doomed, key=lambda r: r.version)[:limit]
            digests = {r.blob_sha256 for r in doomed}
            for r in doomed:
                s.delete(r)
            s.flush()
            if digests:
                used = set(
                    s.scalars(
                        select(ModelVersionRow.blob_sha256).where(
                            ModelVersionRow.blob_sha256.in_(digests)
                        )
                    )
                )
                for digest in digests - used:
                    s.delete(s.get(BlobRow, digest))
            return sorted(r.version for r in doomed)

    # rounds ----------------------------------------------------------------
    def next_round_number(self, name: str) -> int:
        with self.session() as s:
            last = s.scalar(
                select(RoundRow.number)
                .join(ModelRow, ModelRow.id == RoundRow.model_id)
                .where(ModelRow.name == name)
                .order_by(RoundRow.number.desc())
                .limit(1)
            )
            return 1 if last is None else last + 1

    def count_completed_rounds(self, name: str) -> int:
        with self.session() as s:
            return len(
                s.scalars(
                    select(RoundRow.id)
                    .join(ModelRow, ModelRow.id == RoundRow.model_id)
                    .where(ModelRow.name == name, RoundRow.status == "completed")
                ).all()
            )

    def start_round(
        self, name: str, round_id: str, number: int, base_version: int, selected: int
    ) -> None:
        with self._session.begin() as s:
            model_id = s.scalar(select(ModelRow.id).where(ModelRow.name == name))
            s.add(
                RoundRow(
                    id=round_id,
                    model_id=model_id,
                    number=number,
                    status="running",
                    base_version=base_version,
                    selected=selected,
                    started_at=utcnow(),
                )
            )

    def fail_round(
        self,
        round_id: str,
        reason: str,
        seconds: float,
        participants: list[ParticipantRecord],
        status: str = "failed",
    ) -> int | None:
        """Mark a running round failed. Idempotent; a round already ended is left as it is.

        Returns the round's version when it had in fact completed: a commit whose
        acknowledgement was lost (the connection dropped during COMMIT) looks like a
        failure to the caller, who must then adopt that version, not redo the round.
        status "aborted": the round was closed on purpose (its model was deleted).
        """
        if status not in ("failed", "aborted"):
            raise ValueError(f"a round ends failed or aborted, not {status!r}")
        with self._session.begin() as s:
            row = s.get(RoundRow, round_id)
            if row is None or row.status != "running":
                return row.result_version if row is not None else None
            row.status = status
            row.failure_reason = reason
            row.seconds = seconds
            row.ended_at = utcnow()
            for key, value in _round_counts(participants).items():
                setattr(row, key, value)
            s.add_all(_participant_rows(round_id, participants))
            return None

    def fail_running_rounds(self, name: str, reason: str) -> int:
        """Mark rounds left running by a previous process as failed; returns how many."""
        with self._session.begin() as s:
            model_id = s.scalar(select(ModelRow.id).where(ModelRow.name == name))
            rows = s.scalars(
                select(RoundRow).where(RoundRow.model_id == model_id, RoundRow.status == "running")
            ).all()
            now = utcnow()
            for row in rows:  # ORM writes, so the audit log sees each round fail
                row.status, row.failure_reason, row.ended_at = "failed", reason, now
            return len(rows)

    def complete_round(
        self,
        name: str,
        round_id: str,
        new_weights: np.ndarray,
        metrics: dict[str, float],
        seconds: float,
        participants: list[ParticipantRecord],
        privacy: PrivacyRecord | None = None,
        optimizer_state: OptimizerState | None = None,
    ) -> int:
        """Store the round's new version, its record and its ledger entry in one commit.

        The server optimizer's state after this round (moments, momentum) is stored with
        the version it produced, so a restart resumes from exactly there.
        Idempotent: called again for a round it already completed (a retry after a
        lost acknowledgement), it returns that round's version and writes nothing.
        The new version's parent must be the round's base version, so a result is
        never applied on top of a version it was not computed from.
        """
        now = utcnow()
        with self._session.begin() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
            rnd = s.get(RoundRow, round_id)
            if model is None or rnd is None:
                raise KeyError(f"unknown model {name!r} or round {round_id!r}")
            wire = to_wire(new_weights)
            if rnd.status == "completed" and rnd.result_version is not None:
                stored = s.scalar(
                    select(ModelVersionRow.blob_sha256).where(
                        ModelVersionRow.model_id == model.id,
                        ModelVersionRow.version == rnd.result_version,
                    )
                )
                if stored == hashlib.sha256(wire).hexdigest():
                    return rnd.result_version  # this very result, committed before
                raise RuntimeError(f"round {round_id} was already completed with other weights")
            if rnd.status != "running":
                raise RuntimeError(f"round {round_id} is {rnd.status}, not running")
            if model.current_version != rnd.base_version:
                raise SupersededError(
                    f"superseded: the round trained version {rnd.base_version}, but the head "
                    f"moved to version {model.current_version} (a rollback or a new version) "
                    "during the round; its update was not applied"
                )
            digest = self._put_blob(s, wire)
            state_digest, state_manifest = None, None
            if optimizer_state is not None and optimizer_state.arrays:
                state_digest = self._put_blob(s, optimizer_state.to_wire())
                state_manifest = optimizer_state.manifest()
            version = model.current_version + 1
            counts = _round_counts(participants)
            s.add(
                ModelVersionRow(
                    model_id=model.id,
                    version=version,
                    parent_version=model.current_version,
                    blob_sha256=digest,
                    optimizer_state_sha256=state_digest,
                    optimizer_state=state_manifest,
                    round_id=round_id,
                    metrics={**metrics, **counts, "round_seconds": seconds},
                    description=f"round {rnd.number}",
                    created_at=now,
                    created_by="federation",
                )
            )
            model.current_version = version
            rnd.status = "completed"
            rnd.result_version = version
            rnd.metrics = metrics
            rnd.seconds = seconds
            rnd.ended_at = now
            for key, value in counts.items():
                setattr(rnd, key, value)
            s.add_all(_participant_rows(round_id, participants))
            if privacy is not None:
                s.add(_ledger_row(model.id, round_id, rnd.number, privacy, now))
            s.flush()
            crash_point("version-write")
            return version

    def complete_evaluation(
        self,
        round_id: str,
        metrics: dict[str, float],
        seconds: float,
        participants: list[ParticipantRecord],
        privacy: PrivacyRecord | None = None,
    ) -> None:
        """Store an evaluation round's result (status "evaluated") and its ledger entry.

        One commit; no version is made (the round's base_version is the one scored).
        Idempotent: a round already evaluated is left as it is.
        """
        now = utcnow()
        with self._session.begin() as s:
            rnd = s.get(RoundRow, round_id)
            if rnd is None:
                raise KeyError(f"unknown round {round_id!r}")
            if rnd.status == "evaluated":
                return
            if rnd.status != "running":
                raise RuntimeError(f"round {round_id} is {rnd.status}, not running")
            rnd.status = "evaluated"
            rnd.metrics = dict(metrics)
            rnd.seconds = seconds
            rnd.ended_at = now
            for key, value in _round_counts(participants).items():
                setattr(rnd, key, value)
            s.add_all(_participant_rows(round_id, participants))
            if privacy is not None:
                s.add(_ledger_row(rnd.model_id, round_id, rnd.number, privacy, now))

    def evaluations(self, name: str) -> list[RoundRow]:
        """The model's evaluation rounds that produced a result, oldest first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(RoundRow)
                    .join(ModelRow, ModelRow.id == RoundRow.model_id)
                    .where(ModelRow.name == name, RoundRow.status == "evaluated")
                    .order_by(RoundRow.number)
                )
            )

    def privacy_ledger(self, name: str) -> list[PrivacyRecord]:
        """The model's ledger, oldest first."""
        with self.session() as s:
            rows = s.scalars(
                select(PrivacyLedgerRow)
                .join(ModelRow, ModelRow.id == PrivacyLedgerRow.model_id)
                .where(ModelRow.name == name)
                .order_by(PrivacyLedgerRow.round_number, PrivacyLedgerRow.id)
            ).all()
            return [
                PrivacyRecord(
                    level=r.level,
                    mechanism=r.mechanism,
                    noise_multiplier=r.noise_multiplier,
                    clip_norm=r.clip_norm,
                    cohort=r.cohort,
                    epsilon=r.epsilon,
                    delta=r.delta,
                    sample_rate=r.sample_rate,
                    steps=r.steps,
                    sensitivity=r.sensitivity,
                    dimension=r.dimension,
                    round_id=r.round_id,
                    round_number=r.round_number,
                    created_at=r.created_at,
                )
                for r in rows
            ]

    def list_rounds(self, name: str, limit: int = 0) -> list[RoundRow]:
        with self.session() as s:
            q = (
                select(RoundRow)
                .join(ModelRow, ModelRow.id == RoundRow.model_id)
                .where(ModelRow.name == name)
                .order_by(RoundRow.number.desc())
            )
            if limit:
                q = q.limit(limit)
            return list(reversed(s.scalars(q).all()))

    def contributions(self, name: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(round id, device id, reported metrics) of every accepted update of the model."""
        with self.session() as s:
            # Whole rows: their metrics are sealed (sealing.RecordSealer opens them on load).
            rows = s.scalars(
                select(RoundParticipantRow)
                .join(RoundRow, RoundRow.id == RoundParticipantRow.round_id)
                .join(ModelRow, ModelRow.id == RoundRow.model_id)
                .where(ModelRow.name == name)
                .where(RoundParticipantRow.status.in_(("uploaded", "reported")))
                .order_by(RoundRow.number)
            ).all()
            return [(r.round_id, r.device_id, dict(r.metrics or {})) for r in rows]

    def round_participants(self, round_id: str) -> list[RoundParticipantRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(RoundParticipantRow).where(RoundParticipantRow.round_id == round_id)
                )
            )


def _ledger_row(
    model_id: int, round_id: str, number: int, privacy: PrivacyRecord, now: datetime
) -> PrivacyLedgerRow:
    return PrivacyLedgerRow(
        model_id=model_id,
        round_id=round_id,
        round_number=number,
        level=privacy.level,
        mechanism=privacy.mechanism,
        noise_multiplier=privacy.noise_multiplier,
        sample_rate=privacy.sample_rate,
        steps=privacy.steps,
        clip_norm=privacy.clip_norm,
        cohort=privacy.cohort,
        sensitivity=privacy.sensitivity,
        dimension=privacy.dimension,
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        created_at=now,
    )


def _definition_row(model_id: int, d: ModelDefinition, now: datetime) -> ModelDefinitionRow:
    return ModelDefinitionRow(
        model_id=model_id,
        task=d.task,
        settings=dict(d.settings),
        paused=d.paused,
        source=d.source,
        updated_at=now,
    )


def _locked_definition(s: Session, name: str) -> ModelDefinitionRow:
    """The model's definition row, locked for this transaction; KeyError: none."""
    row = s.scalar(
        select(ModelDefinitionRow)
        .join(ModelRow, ModelDefinitionRow.model_id == ModelRow.id)
        .where(ModelRow.name == name)
        .with_for_update()
    )
    if row is None:
        raise KeyError(name)
    return row


def _definition(name: str, row: ModelDefinitionRow) -> ModelDefinition:
    return ModelDefinition(name, row.task, dict(row.settings), bool(row.paused), row.source)


def _model_record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        spec=ModelSpec(row.architecture, dict(row.config)),
        manifest=Manifest.from_json(row.manifest),
        num_parameters=row.num_parameters,
        strategy=row.strategy,
        current_version=row.current_version,
        created_at=row.created_at,
    )


def _round_counts(participants: list[ParticipantRecord]) -> dict[str, int]:
    return {
        "participants": sum(p.status in ("uploaded", "reported") for p in participants),
        "dropouts": sum(p.status in ("dropped", "declined") for p in participants),
        "bytes_in": sum(p.bytes_in for p in participants),
        "bytes_out": sum(p.bytes_out for p in participants),
    }


def _participant_rows(
    round_id: str, participants: list[ParticipantRecord]
) -> list[RoundParticipantRow]:
    return [
        RoundParticipantRow(
            round_id=round_id,
            device_id=p.device_id,
            status=p.status,
            num_examples=p.num_examples,
            bytes_in=p.bytes_in,
            bytes_out=p.bytes_out,
            metrics=dict(p.metrics or {}),
            note=p.note,
        )
        for p in participants
    ]


def audit_entries(store: Store, limit: int = 0) -> list[audit.Entry]:
    """The audit log in stored order (by seq); the newest `limit` when limit > 0."""
    with store.session() as s:
        q = select(AuditRow).order_by(AuditRow.seq)
        rows = s.scalars(q).all()
    entries = [
        audit.Entry(
            r.seq,
            r.created_at,
            r.actor,
            r.action,
            r.target,
            dict(r.details or {}),
            r.prev_hash,
            r.hash,
        )
        for r in rows
    ]
    return entries[-limit:] if limit > 0 else entries


def audit_head(store: Store) -> tuple[int, str] | None:
    with store.session() as s:
        row = s.get(AuditHeadRow, 1)
        return None if row is None else (row.seq, row.hash)
