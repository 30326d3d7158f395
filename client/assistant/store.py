"""One encrypted SQLite database per user: the assistant's whole on-device state.

The database is SQLCipher 4 (`sqlcipher3-binary`): every page, indices and
the full-text index included, is encrypted with AES-256 and authenticated
with HMAC-SHA512 under the user's store key (see `keys`). SQLite's own
journaling gives atomic writes: the store runs in WAL mode with
`synchronous=FULL`, each logical change is one transaction, so a process
killed at any instant leaves every committed change and none of the
half-written one.

Opening is strict. A wrong device key, a missing store key next to an
existing database, a file that does not decrypt or fails SQLCipher's page
HMAC check, or a schema newer than this code knows each raise a
`StoreError` subclass naming the problem, and the files are left exactly as
they were: the store is never silently reset.

Stored values are SQL scalars and JSON text; model weights are `.npz` bytes
read with `allow_pickle=False`. Nothing is pickled.

Schema versions live in `PRAGMA user_version`; `MIGRATIONS[i]` takes a store
from version i to i + 1 inside one transaction.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlcipher3

from client.assistant.keys import (
    StoreError,
    StoreKeyError,
    UserPaths,
    create_user_key,
    load_device_key,
    shred_user_key,
    unwrap_user_key,
    validate_user_id,
    xeno_home,
)

__all__ = [
    "SCHEMA_VERSION",
    "Limits",
    "SchemaTooNewError",
    "StoreCorruptError",
    "StoreError",
    "StoreKeyError",
    "StoreLimitError",
    "UserStore",
    "delete_user_store",
]

Connection = Any  # sqlcipher3 ships no type information


class StoreCorruptError(StoreError):
    """The database file does not decrypt or fails its integrity check."""


class SchemaTooNewError(StoreError):
    """The store was written by a newer version of this software."""


class StoreLimitError(ValueError):
    """A write would exceed a configured limit (entry count or size)."""


@dataclass(frozen=True)
class Limits:
    """Size and count limits of a user's store; a write past one raises StoreLimitError."""

    max_text_chars: int = 10_000
    max_json_bytes: int = 64 * 1024
    max_interactions: int = 100_000
    max_facts: int = 10_000
    max_episodes: int = 100_000
    max_workflows: int = 1_000
    max_workflow_steps: int = 200
    max_training_examples: int = 50_000
    max_model_versions: int = 20
    retention_days: float = 365.0
    purge_interval_s: float = 24 * 3600.0


def _script(db: Connection, script: str) -> None:
    """Run statements one by one: executescript would commit the migration's transaction."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _v1(db: Connection) -> None:
    _script(
        db,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE preferences (
            key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE learning (dimension TEXT PRIMARY KEY, enabled INTEGER NOT NULL);
        CREATE TABLE interactions (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, query TEXT NOT NULL,
            response TEXT NOT NULL, context TEXT NOT NULL, feedback INTEGER);
        CREATE INDEX interactions_ts ON interactions (ts);
        CREATE TABLE facts (
            category TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY (category, key));
        CREATE TABLE fact_history (
            id INTEGER PRIMARY KEY, category TEXT NOT NULL, key TEXT NOT NULL,
            value TEXT, op TEXT NOT NULL, ts REAL NOT NULL);
        CREATE TABLE episodes (
            id INTEGER PRIMARY KEY, event_type TEXT NOT NULL, description TEXT NOT NULL,
            context TEXT NOT NULL, ts REAL NOT NULL);
        CREATE INDEX episodes_type_ts ON episodes (event_type, ts);
        CREATE INDEX episodes_ts ON episodes (ts);
        CREATE TABLE workflows (
            name TEXT NOT NULL, version INTEGER NOT NULL, steps TEXT NOT NULL,
            ts REAL NOT NULL, PRIMARY KEY (name, version));
        CREATE TABLE training_examples (
            id INTEGER PRIMARY KEY, input_text TEXT NOT NULL, output_text TEXT NOT NULL,
            intent TEXT, context TEXT NOT NULL, rating INTEGER, ts REAL NOT NULL);
        CREATE TABLE model_versions (
            version INTEGER PRIMARY KEY, created_at REAL NOT NULL, body TEXT NOT NULL,
            metrics TEXT NOT NULL, weights BLOB NOT NULL, active INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE templates (
            id INTEGER PRIMARY KEY, intent TEXT NOT NULL, text TEXT NOT NULL,
            successes REAL NOT NULL, failures REAL NOT NULL, detail TEXT NOT NULL,
            ts REAL NOT NULL, UNIQUE (intent, text));
        CREATE TABLE consent (
            id INTEGER PRIMARY KEY, scope TEXT NOT NULL, granted INTEGER NOT NULL,
            ts REAL NOT NULL);
        CREATE VIRTUAL TABLE memory_fts USING fts5 (
            kind UNINDEXED, ref UNINDEXED, text, tokenize = 'unicode61 remove_diacritics 2');
        """,
    )


def _v2(db: Connection) -> None:
    # What the personalization engine observed of each response (length, style, tone, format),
    # computed once when the interaction is recorded rather than on every read.
    db.execute("ALTER TABLE interactions ADD COLUMN observed TEXT NOT NULL DEFAULT '{}'")


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


def now() -> float:
    return time.time()


class UserStore:
    """A user's open store. Thread-safe: one connection, one lock."""

    def __init__(
        self,
        user_id: str,
        home: str | Path | None = None,
        limits: Limits | None = None,
        clock: Callable[[], float] = now,
    ) -> None:
        self.user_id = validate_user_id(user_id)
        self.paths = UserPaths(Path(home) if home is not None else xeno_home(), self.user_id)
        self.limits = limits or Limits()
        self.clock = clock
        self._lock = threading.RLock()
        self._db = self._open()
        self._last_purge = 0.0
        self.maybe_purge(force=True)

    # ------------------------------------------------------------------ opening
    def _open(self) -> Connection:
        paths = self.paths
        device = load_device_key(paths.home)
        db_exists = paths.database.exists()
        if paths.wrapped_key.exists():
            key = unwrap_user_key(paths, device)
        elif db_exists:
            raise StoreKeyError(
                f"{paths.database} exists but its key file {paths.wrapped_key} is missing: the "
                "store cannot be opened, and it is not replaced by a new one"
            )
        else:
            key = create_user_key(paths, device)
        db = sqlcipher3.connect(
            str(paths.database), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            db.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
            try:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
                problems = [r[0] for r in db.execute("PRAGMA cipher_integrity_check")]
            except sqlcipher3.DatabaseError as exc:
                raise StoreCorruptError(
                    f"{paths.database} does not open with its store key ({exc}): the file is "
                    "corrupted or is not this user's store. It was left untouched."
                ) from None
            if problems:
                raise StoreCorruptError(
                    f"{paths.database} fails its integrity check ({'; '.join(problems[:3])}): "
                    "the file is corrupted. It was left untouched."
                )
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SchemaTooNewError(
                    f"{paths.database} has schema version {version}; this version of xeno knows "
                    f"up to {SCHEMA_VERSION}. Upgrade xeno; the store was left untouched."
                )
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA secure_delete = ON")
            for target in range(version, SCHEMA_VERSION):
                db.execute("BEGIN IMMEDIATE")
                try:
                    MIGRATIONS[target](db)
                    db.execute(f"PRAGMA user_version = {target + 1}")
                    if target == 0:
                        db.execute(
                            "INSERT INTO meta VALUES ('user_id', ?), ('created_at', ?)",
                            (self.user_id, repr(self.clock())),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except BaseException:
            db.close()
            raise
        for path in [paths.dir, *paths.database_files()]:
            if path.exists():
                path.chmod(0o700 if path.is_dir() else 0o600)
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ access
    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One atomic change: everything inside commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    # ------------------------------------------------------------------ checks
    def check_text(self, name: str, value: object, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise ValueError(f"{name} is empty")
        if len(value) > self.limits.max_text_chars:
            raise StoreLimitError(
                f"{name} has {len(value)} characters; the limit is {self.limits.max_text_chars}"
            )
        return value

    def to_json(self, name: str, value: object) -> str:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be JSON-serializable ({exc})") from None
        if len(text.encode()) > self.limits.max_json_bytes:
            raise StoreLimitError(
                f"{name} is {len(text.encode())} bytes as JSON; the limit is "
                f"{self.limits.max_json_bytes}"
            )
        return text

    def check_count(self, db: Connection, table: str, limit: int, what: str) -> None:
        (count,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
        if count >= limit:
            raise StoreLimitError(
                f"{what}: the store holds {count}, the limit; delete some or raise the limit"
            )

    # ------------------------------------------------------------------ retention
    def retention_days(self) -> float:
        rows = self.query("SELECT value FROM meta WHERE key = 'retention_days'")
        return float(rows[0][0]) if rows else self.limits.retention_days

    def set_retention_days(self, days: float) -> None:
        if not isinstance(days, int | float) or not 0 < days <= 36500:
            raise ValueError(f"retention must be between 0 and 36500 days, got {days!r}")
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('retention_days', ?)", (repr(days),))
        self.maybe_purge(force=True)

    def maybe_purge(self, force: bool = False) -> int:
        """Purge episodes and interactions past retention; at most once per purge interval."""
        t = self.clock()
        if not force and t - self._last_purge < self.limits.purge_interval_s:
            return 0
        self._last_purge = t
        cutoff = t - self.retention_days() * 86400.0
        with self.transaction() as db:
            old = db.execute("SELECT id FROM episodes WHERE ts < ?", (cutoff,)).fetchall()
            db.executemany(
                "DELETE FROM memory_fts WHERE kind = 'episode' AND ref = ?", [(r[0],) for r in old]
            )
            db.execute("DELETE FROM episodes WHERE ts < ?", (cutoff,))
            gone = db.execute("DELETE FROM interactions WHERE ts < ?", (cutoff,)).rowcount
        return len(old) + int(gone)

    # ------------------------------------------------------------------ export
    def export(self) -> dict[str, Any]:
        """Every user table as lists of row dicts (weights hex-encoded)."""
        tables = [
            "meta",
            "preferences",
            "learning",
            "interactions",
            "facts",
            "fact_history",
            "episodes",
            "workflows",
            "training_examples",
            "model_versions",
            "templates",
            "consent",
        ]
        out: dict[str, Any] = {"schema_version": self.schema_version()}
        with self._lock:
            for table in tables:
                cur = self._db.execute(f"SELECT * FROM {table}")
                cols = [d[0] for d in cur.description]
                rows = []
                for row in cur.fetchall():
                    item = {}
                    for col, value in zip(cols, row, strict=True):
                        item[col] = value.hex() if isinstance(value, bytes) else value
                    rows.append(item)
                out[table] = rows
        return out


def delete_user_store(user_id: str, home: str | Path | None = None) -> bool:
    """Crypto-shred a user's store: destroy its key, then remove its files. True if any existed."""
    paths = UserPaths(Path(home) if home is not None else xeno_home(), validate_user_id(user_id))
    existed = paths.wrapped_key.exists() or paths.database.exists()
    shred_user_key(paths)
    for path in paths.database_files():
        path.unlink(missing_ok=True)
    if paths.dir.exists():
        for leftover in paths.dir.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)
        # Other files the user put there are not ours to remove.
        with contextlib.suppress(OSError):
            paths.dir.rmdir()
    return existed
