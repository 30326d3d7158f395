"""The database goes away mid-federation; rounds resume by themselves and health tells the truth.

Real failures, not mocks: PostgreSQL is reached through a TCP proxy that the
test cuts (every connection reset, new ones refused at once) and restores,
since the local PostgreSQL server is shared and must not be stopped; SQLite
runs out of space through `PRAGMA max_page_count` on every connection of the
server's engine, which fails writes with SQLITE_FULL exactly as a full disk does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from common.atrest import parse_key
from server.app import XenoServer
from server.rounds import RoundSummary
from server.store import Store
from server.store.lock import DatabaseInUseError, DatabaseLock, WritesSuspendedError
from server.store.rotation import rotate

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CuttableProxy:
    """A TCP proxy to host:port that can be cut (all connections reset, new ones closed)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.cut_now = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.cut_now:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_now = True
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def restore(self) -> None:
        self.cut_now = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


def _health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return int(
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                .status
            )
        except grpc.RpcError:
            return None


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def assert_version_chain(store: Store, model: str = "digits-mlp") -> None:
    """Versions 1..n, each the child of the previous, one per completed round, none twice."""
    versions = store.list_versions(model)
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert all(v.parent_version == v.version - 1 for v in versions[1:])
    rounds = store.list_rounds(model)
    completed = [r for r in rounds if r.status == "completed"]
    assert sorted(r.result_version for r in completed) == [v.version for v in versions[1:]]
    assert sorted(v.round_id for v in versions[1:]) == sorted(r.id for r in completed)
    # the round open when the server stopped may still read "running"; no other
    assert sum(r.status == "running" for r in rounds) <= 1


OUTAGE_SERVER: dict[str, Any] = dict(
    rounds=0,
    clients_per_round=3,
    min_clients=3,
    selection_window=0.5,
    round_deadline=10.0,
    health_interval=0.1,
    stall_grace=1.0,
    store_retry=0.3,
)


def _outage(
    server: XenoServer, device_threads: Any, cut: Callable[[], None], restore: Callable[[], None]
) -> tuple[list[RoundSummary], float]:
    """Run rounds, cut the database mid-federation, restore it; returns summaries, resume time."""
    summaries: list[RoundSummary] = []
    server.coordinator.add_listener(summaries.append)
    device_threads(server, 3)
    coordinator = server.coordinator
    _wait(lambda: coordinator.model.current_version >= 3, 90, "two rounds before the outage")
    cut_in_round: list[str] = []

    def cut_mid_round(round_id: str) -> None:  # the round has started; its end will fail
        if not cut_in_round:
            cut_in_round.append(round_id)
            cut()

    coordinator.add_start_listener(cut_mid_round)
    _wait(lambda: bool(cut_in_round), 30, "a round to start")
    # a round's write fails: the round fails in memory, and health says so
    _wait(lambda: coordinator.store_error != "", 30, "a write to fail")
    _wait(lambda: _health(server.address) == NOT_SERVING, 30, "health to report NOT_SERVING")
    assert server.health_monitor.problems
    time.sleep(1.0)
    assert _health(server.address) == NOT_SERVING
    assert server.metrics.serving.labels("digits-mlp")._value.get() == 0
    at_restore = coordinator.model.current_version
    restore()
    resumed = _wait(
        lambda: coordinator.model.current_version >= at_restore + 2, 60, "rounds to resume"
    )
    _wait(lambda: _health(server.address) == SERVING, 30, "health to report SERVING again")
    [cut_round] = [s for s in summaries if s.round_id == cut_in_round[0]]
    # The cut round fails either way: its end could not be stored, or (when the outage
    # also kept devices from downloading or uploading) no update arrived by its deadline.
    assert cut_round.status == "failed", cut_round
    assert (
        "could not be stored" in cut_round.failure_reason
        or "before the deadline" in cut_round.failure_reason
    ), cut_round.failure_reason
    return summaries, resumed


@pytest.fixture
def postgres_schema() -> Iterator[tuple[str, str]]:
    """(direct URL, schema) of a fresh schema on the shared PostgreSQL server."""
    base = os.environ.get("XENO_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("XENO_TEST_POSTGRES_URL is not set")
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield base, schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.mark.slow
def test_postgres_outage_mid_federation_rounds_resume_by_themselves(
    server_factory: Any, device_threads: Any, postgres_schema: tuple[str, str]
) -> None:
    base, schema = postgres_schema
    direct = make_url(base)
    proxy = CuttableProxy(direct.host or "127.0.0.1", direct.port or 5432)
    via_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        server = server_factory(db=_with_schema(via_proxy, schema), **OUTAGE_SERVER)
        summaries, resumed = _outage(server, device_threads, proxy.cut, proxy.restore)
    finally:
        proxy.close()
    failed = [s for s in summaries if s.status == "failed"]
    assert resumed < 30
    store = Store(_with_schema(base, schema))
    try:
        assert_version_chain(store)
        stored = {r.id: r for r in store.list_rounds("digits-mlp")}
        for s in failed:  # every failure reported in memory is recorded as a failure
            if s.round_id in stored:
                assert stored[s.round_id].status == "failed"
    finally:
        store.close()


@pytest.mark.slow
def test_sqlite_out_of_space_mid_federation_rounds_resume_once_space_is_freed(
    server_factory: Any, device_threads: Any, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path}/full.db"
    server = server_factory(db=db, **OUTAGE_SERVER)
    engine = server.store.engine
    limit = {"pages": 0}

    @event.listens_for(engine, "connect")
    def _cap(dbapi_conn: Any, _record: Any) -> None:
        if limit["pages"]:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA max_page_count={limit['pages']}")
            cur.close()

    def fill_disk() -> None:
        with engine.connect() as conn:
            pages = conn.execute(text("PRAGMA page_count")).scalar_one()
        limit["pages"] = int(pages) + 1
        engine.dispose()  # every new connection gets the cap

    def free_space() -> None:
        limit["pages"] = 0
        engine.dispose()

    summaries, resumed = _outage(server, device_threads, fill_disk, free_space)
    assert resumed < 30
    failed = [s for s in summaries if s.status == "failed"]
    assert any("full" in s.failure_reason for s in failed), [s.failure_reason for s in failed]
    assert_version_chain(server.store)


def test_check_in_during_a_postgres_outage_is_unavailable_with_a_retry_hint(
    server_factory: Any, raw_device: Any, postgres_schema: tuple[str, str]
) -> None:
    """Before: psycopg's error escaped the servicer and the device saw UNKNOWN."""
    from client.retry import RETRY_AFTER_KEY

    base, schema = postgres_schema
    direct = make_url(base)
    proxy = CuttableProxy(direct.host or "127.0.0.1", direct.port or 5432)
    via_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        server = server_factory(db=_with_schema(via_proxy, schema), **OUTAGE_SERVER)
        device = raw_device(server)
        assert device.check_in(0).WhichOneof("outcome") == "wait"
        proxy.cut()
        refused: list[grpc.RpcError] = []

        def refused_once() -> bool:  # the A/B assignments it reads are cached for 1 s
            try:
                device.check_in(0)
            except grpc.RpcError as exc:
                refused.append(exc)
            return bool(refused)

        _wait(refused_once, 15, "a check-in that needs the database")
        err = pytest.ExceptionInfo.from_exc_info((type(refused[0]), refused[0], None))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "database is unavailable; retry in 2000 ms" in err.value.details()
        assert (RETRY_AFTER_KEY, "2000") in tuple(err.value.trailing_metadata())
        _wait(lambda: server.guard.calls.active == 0, 5, "the refused call to give its slot back")
        proxy.restore()
        _wait(lambda: _check_in_outcome(device) == "wait", 30, "check-ins to work again")
    finally:
        proxy.close()


def _check_in_outcome(device: Any) -> str | None:
    try:
        return str(device.check_in(0).WhichOneof("outcome"))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        return None


def _lock_holders(base: str, schema: str) -> list[tuple[int, str]]:
    """(backend pid, mode) of every session holding schema's database lock, from pg_locks.

    The key is derived as documented in server/store/lock.py; PostgreSQL shows a
    bigint advisory key as classid (high 32 bits) and objid (low 32 bits).
    """
    where = f"{make_url(base).database}/{schema}".encode()
    digest = hashlib.sha256(b"xeno-fl database lock " + where).digest()
    key = int.from_bytes(digest[:8], "big")
    engine = create_engine(base)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid, mode FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = :hi AND objid = :lo AND objsubid = 1"
                ),
                {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
            ).all()
            return sorted((int(pid), str(mode)) for pid, mode in rows)
    finally:
        engine.dispose()


def _terminate(base: str, pid: int) -> None:
    engine = create_engine(base)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    finally:
        engine.dispose()


def test_postgres_lock_lost_with_its_connection_is_taken_again(
    server_factory: Any,
    postgres_schema: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, schema = postgres_schema
    url = _with_schema(base, schema)
    key = parse_key(os.environ["XENO_DATA_KEY"])  # the tests' data key (conftest.py)
    server = server_factory(db=url, rounds=0, health_interval=0.1)
    [(first, mode)] = _lock_holders(base, schema)
    assert mode == "ShareLock"
    _terminate(base, first)  # what an outage does to the lock's connection
    _wait(lambda: [p for p, _ in _lock_holders(base, schema) if p != first] != [], 5, "retake")
    [(second, mode)] = _lock_holders(base, schema)
    assert second != first and mode == "ShareLock"
    with pytest.raises(DatabaseInUseError, match="stop the server"):
        rotate(url, key, bytes(range(32)))
    assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING

    # Checked by hand from here on, so that a rotation gets in before the server's check.
    server.health_monitor.stop()
    time.sleep(0.3)
    engine = create_engine(url)
    rotation = DatabaseLock(engine)
    caplog.set_level(logging.WARNING)
    _terminate(base, second)
    _wait(lambda: rotation.acquire(exclusive=True), 5, "the rotation to take the lock")
    try:
        problems = server.health_monitor.check_now()
        assert "rotate-key) holds the database lock" in problems["database_lock"]
        assert _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "this server stopped writing" in caplog.text
        audit_rows = _count_audit(base, schema)
        with pytest.raises(WritesSuspendedError, match="holds the database lock"):
            server.store.append_audit([("system", "test.write", "x", {})])
        assert _count_audit(base, schema) == audit_rows  # nothing written
    finally:
        rotation.release()
        engine.dispose()
    assert server.health_monitor.check_now() == {}
    assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
    server.store.append_audit([("system", "test.write", "x", {})])  # writes again

    # A rotation that ran while the lock was away: the server's key is no longer the
    # database's, so it keeps refusing writes (not one under the old key).
    [(third, _)] = _lock_holders(base, schema)
    _terminate(base, third)
    new_key = bytes(range(32))
    _wait(lambda: _try_rotate(url, key, new_key), 5, "the rotation to run")
    problems = server.health_monitor.check_now()
    assert "not this database's key" in problems["database_lock"]
    assert _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(WritesSuspendedError, match="writes stopped"):
        server.store.append_audit([("system", "test.write", "x", {})])
    assert server.health_monitor.check_now() != {}  # until restarted with the new key


def _try_rotate(url: str, old: bytes, new: bytes) -> bool:
    try:
        rotate(url, old, new)
    except DatabaseInUseError:
        return False
    return True


def _count_audit(base: str, schema: str) -> int:
    engine = create_engine(_with_schema(base, schema))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM audit_log")).scalar_one())
    finally:
        engine.dispose()
