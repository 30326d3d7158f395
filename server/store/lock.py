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
import logging
import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, exc, text

log = logging.getLogger("xeno.server.store")

ROTATION_HOLDS_IT = (
    "a data key rotation (xeno-fl admin rotate-key) holds the database lock: this server "
    "stopped writing; when the rotation has finished, restart the server with the new key"
)


class DatabaseInUseError(RuntimeError):
    """The lock is held by another process (a server, or a key rotation)."""


class WritesSuspendedError(RuntimeError):
    """A server must not write now: its database lock is lost or a rotation holds it."""


class DatabaseLock:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._fd: int | None = None
        self._conn: Any = None
        self._key: int | None = None
        self._mutex = threading.Lock()  # the health thread checks while stop() may release

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
            self._key = key
            if not got:
                conn.close()
                return False
            self._conn = conn
            return True
        return True  # other databases: no lock (not supported for production)

    def check(self) -> tuple[str, bool]:
        """Whether the shared lock is still held, taking it again when it was lost.

        Returns (problem, retaken): problem is "" while the lock is held, else why it
        is not; retaken is True when it was lost and has just been taken again (the
        caller then checks the data key: a rotation may have run in between).
        """
        with self._mutex:
            if self._key is None:  # SQLite's flock cannot be lost while the process lives
                return "", False
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT 1"))
                    self._conn.commit()
                    return "", False
                except exc.DBAPIError as error:
                    log.error(
                        "the database lock was lost with its connection (%s); this server "
                        "stops writing until it holds the lock again",
                        _first_line(error),
                    )
                    self._conn.invalidate()
                    self._conn = None
            try:
                got = self.acquire(exclusive=False)
            except exc.DBAPIError as error:
                return (
                    "the database lock was lost and cannot be taken again yet "
                    f"({_first_line(error)}): writes stopped",
                    False,
                )
            if not got:
                return ROTATION_HOLDS_IT, False
            log.warning("the database lock is held again, on a new connection")
            return "", True

    def guard_write(self, connection: Any) -> None:
        """Hold the shared lock for the rest of connection's transaction, or refuse.

        A transaction-level lock on the writing connection itself: it cannot be lost
        while the transaction lives, and a rotation holding the database is seen at once.
        """
        if self._key is None:
            return
        held = connection.execute(
            text("SELECT pg_try_advisory_xact_lock_shared(:k)"), {"k": self._key}
        ).scalar()
        if not held:
            raise WritesSuspendedError(ROTATION_HOLDS_IT)

    def release(self) -> None:
        with self._mutex:
            self._release()

    def _release(self) -> None:
        self._key = None  # released for good: check() must not take it again
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


def _first_line(error: BaseException) -> str:
    inner = getattr(error, "orig", None) or error
    text_ = str(inner).strip()
    return f"{type(inner).__name__}: {text_.splitlines()[0]}" if text_ else type(inner).__name__
