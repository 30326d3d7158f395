"""Who may use a database at once: servers share it; an offline key rotation needs it alone.

A server holds a shared lock for its whole life; `xeno-fl admin rotate-key`
takes the exclusive one without waiting, so it refuses while a server runs on
the database, and a server refuses to start while a rotation runs. SQLite: an
flock on `DB.lock` next to the database file. PostgreSQL: a session advisory
lock on a connection held open, keyed by database and schema (schemas of one
database are independent). Both go with the process: a SIGKILLed server or
rotation leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, exc, text


class DatabaseInUseError(RuntimeError):
    """The lock is held by another process (a server, or a key rotation)."""


class DatabaseLock:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._fd: int | None = None
        self._conn: Any = None

    def acquire(self, exclusive: bool) -> bool:
        """Take the lock without waiting; False when another process holds it (exclusively)."""
        backend = self._engine.url.get_backend_name()
        if backend == "sqlite":
            database = self._engine.url.database
            if not database or database == ":memory:":
                return True
            path = Path(database).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fd = fd
            return True
        if backend == "postgresql":
            conn = self._engine.connect()
            where = conn.execute(text("SELECT current_database() || '/' || current_schema()"))
            digest = hashlib.sha256(b"xeno-fl database lock " + str(where.scalar()).encode())
            key = int.from_bytes(digest.digest()[:8], "big", signed=True)
            fn = "pg_try_advisory_lock" if exclusive else "pg_try_advisory_lock_shared"
            got = bool(conn.execute(text(f"SELECT {fn}(:k)"), {"k": key}).scalar())
            conn.commit()  # the session lock outlives the transaction; no idle transaction
            if not got:
                conn.close()
                return False
            self._conn = conn
            return True
        return True  # other databases: no lock (not supported for production)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                # The connection goes back to the pool: drop the session lock explicitly.
                conn.execute(text("SELECT pg_advisory_unlock_all()"))
                conn.commit()
                conn.close()
            except exc.DBAPIError:
                # The connection died with the database (an outage): its session, and the
                # lock with it, are gone already. Stopping must not fail for it.
                conn.invalidate()
