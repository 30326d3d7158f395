"""Crash recovery under chaos, bounded in time; one JSON line out.

    python benchmarks/chaos.py --kills 5
    python benchmarks/chaos.py --kills 5 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

Four experiments, each on a fresh database, with real servers and devices on loopback:

* `sigkill`: `xeno-fl server` (secure aggregation on) and three `xeno-fl client`
  processes; `--kills` times, once a round has completed since the last restart and
  after a random 0-1 s, the server is killed with SIGKILL and started again. Reported:
  restart-to-SERVING seconds, and the version chain (no gap, no duplicate) at the end.
  On SQLite, and on PostgreSQL with `--postgres` (in a schema of its own, dropped after).
* `postgres_outage`: the same server reaches PostgreSQL through a TCP proxy that is cut
  (every connection reset, new ones refused) for `--outage` seconds mid-federation.
  Reported: whether health went NOT_SERVING, seconds from the restore to the next
  completed version, the failed rounds, the chain.
* `sqlite_full`: an in-process server whose SQLite connections are capped
  (`PRAGMA max_page_count`) for `--outage` seconds, i.e. a full disk, then freed.
* `resets`: plain rounds (no secure aggregation, so updates can be checked) while a
  TCP proxy between devices and server resets every connection every 0.2-0.6 s. Each
  device records the update it sent per round; every stored version is re-derived as
  its parent plus the example-weighted mean of the updates of the round's recorded
  participants. A double-counted (or lost) update would not match.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XENO_DATA_KEY", "11" * 32)
os.environ.setdefault("XENO_DEVICE_KEY", "22" * 32)

sys.path.insert(0, str(ROOT / "benchmarks"))
from restart import _free_port, _serving  # noqa: E402

from server.store import Store  # noqa: E402

MODEL = "digits-mlp"
SERVER_FLAGS = [
    "--rounds", "0", "--clients-per-round", "3", "--min-clients", "3",
    "--selection-window", "0.5", "--local-epochs", "1", "--round-deadline", "20",
    "--secagg-phase-timeout", "5", "--metrics-port", "-1", "--eval-data", "none",
    "--stall-grace", "3", "--health-interval", "0.2", "--store-retry", "0.5",
]  # fmt: skip


class Proxy:
    """TCP proxy to a port; cut() resets every connection and refuses new ones."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.down = False
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if self.down:
                    raise OSError("cut")
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def reset_all(self) -> None:
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    s.close()
            self.resets += len(self._open) // 2
            self._open.clear()

    def cut(self) -> None:
        self.down = True
        self.reset_all()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


def _in_process(**overrides: Any) -> Any:
    from server.app import ServerConfig

    base = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, max_workers=64)
    return replace(base, **overrides)


def chain(store: Store) -> dict[str, Any]:
    """The version chain: gaps, duplicates, versions per completed round."""
    versions = store.list_versions(MODEL)
    numbers = [v.version for v in versions]
    rounds = store.list_rounds(MODEL)
    completed = [r for r in rounds if r.status == "completed"]
    round_ids = [v.round_id for v in versions if v.round_id]
    return {
        "versions": len(numbers),
        "completed_rounds": len(completed),
        "failed_rounds": sum(r.status == "failed" for r in rounds),
        "no_gap": numbers == list(range(1, len(numbers) + 1))
        and all(v.parent_version == v.version - 1 for v in versions[1:]),
        "no_duplicate": len(round_ids) == len(set(round_ids)) == len(completed),
    }


def _server(db: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "XENO_LOG_LEVEL": "warning"}
    return subprocess.Popen(
        [sys.executable, "-m", "xeno.cli", "server", "--port", str(port), "--db", db,
         *SERVER_FLAGS],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _devices(address: str, state: Path, n: int = 3) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "XENO_LOG_LEVEL": "error"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xeno.cli",
                "client",
                "--server",
                address,
                "--partition",
                str(i),
                "--num-partitions",
                str(n),
                "--state-dir",
                str(state / f"dev{i}"),
                "--max-backoff",
                "1",
                "--min-secagg-cohort",
                "2",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(n)
    ]


def _version(db: str) -> int:
    store = Store(db)
    try:
        model = store.get_model(MODEL)
        return model.current_version if model else 0
    except Exception:
        return 0
    finally:
        store.close()


def _wait(predicate: Callable[[], bool], timeout: float) -> float | None:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.1)
    return time.monotonic() - started


def _until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
    started = time.monotonic()
    while not _serving(f"127.0.0.1:{port}"):
        if proc.poll() is not None or time.monotonic() - started > timeout:
            raise RuntimeError("the server did not come back")
        time.sleep(0.05)
    return time.monotonic() - started


def sigkill(db: str, kills: int, tmp: Path, rng: random.Random) -> dict[str, Any]:
    port = _free_port()
    server = _server(db, port)
    _until_serving(port, server)
    devices = _devices(f"127.0.0.1:{port}", tmp / f"devices-{uuid.uuid4().hex[:6]}")
    restarts: list[float] = []
    stalls = 0
    try:
        for _ in range(kills):
            before = _version(db)
            if _wait(lambda b=before: _version(db) > b, 90) is None:
                stalls += 1
            time.sleep(rng.uniform(0, 1))
            server.send_signal(signal.SIGKILL)
            server.wait()
            started = time.monotonic()
            server = _server(db, port)
            _until_serving(port, server)
            restarts.append(round(time.monotonic() - started, 2))
        final = _version(db)
        resumed = _wait(lambda: _version(db) >= final + 2, 120)
    finally:
        for p in [server, *devices]:
            p.kill()
            p.wait()
    store = Store(db)
    out = {
        "restart_to_serving_s": restarts,
        "rounds_resumed_after_last_kill": resumed is not None,
        "kills_without_progress_before": stalls,
        **chain(store),
    }
    store.close()
    return out


def postgres_outage(url: str, seconds: float, tmp: Path) -> dict[str, Any]:
    direct = make_url(url)
    proxy = Proxy(direct.port or 5432, direct.host or "127.0.0.1")
    via = direct.set(port=proxy.port).render_as_string(hide_password=False)
    port = _free_port()
    server = _server(via, port)
    _until_serving(port, server)
    devices = _devices(f"127.0.0.1:{port}", tmp / "devices-outage")
    try:
        _wait(lambda: _version(url) >= 3, 120)
        proxy.cut()
        not_serving = _wait(lambda: not _serving(f"127.0.0.1:{port}"), seconds)
        time.sleep(max(0.0, seconds - (not_serving or seconds)))
        at_restore = _version(url)
        proxy.restore()
        resumed = _wait(lambda: _version(url) > at_restore, 120)
        serving = _wait(lambda: _serving(f"127.0.0.1:{port}"), 60)
    finally:
        for p in [server, *devices]:
            p.kill()
            p.wait()
        proxy.close()
    store = Store(url)
    out = {
        "outage_s": seconds,
        "health_not_serving_after_s": None if not_serving is None else round(not_serving, 2),
        "resume_after_restore_s": None if resumed is None else round(resumed, 2),
        "serving_again": serving is not None,
        **chain(store),
    }
    store.close()
    return out


def sqlite_full(seconds: float, tmp: Path) -> dict[str, Any]:
    from server.app import XenoServer

    db = f"sqlite:///{tmp}/full.db"
    server = XenoServer(
        _in_process(
            db=db, clients_per_round=3, min_clients=3, selection_window=0.5,
            eval_data="none", stall_grace=3.0, health_interval=0.2, store_retry=0.5,
            secagg=True, secagg_phase_timeout=5.0,
        )
    ).start()  # fmt: skip
    engine = server.store.engine
    cap = {"pages": 0}

    @event.listens_for(engine, "connect")
    def _cap(dbapi_conn: Any, _record: Any) -> None:
        if cap["pages"]:
            dbapi_conn.execute(f"PRAGMA max_page_count={cap['pages']}")

    devices = _devices(server.address, tmp / "devices-full")
    version = lambda: server.coordinator.model.current_version  # noqa: E731
    try:
        _wait(lambda: version() >= 3, 120)
        with engine.connect() as conn:
            cap["pages"] = int(conn.execute(text("PRAGMA page_count")).scalar_one()) + 1
        engine.dispose()
        not_serving = _wait(lambda: not _serving(server.address), seconds + 30)
        time.sleep(max(0.0, seconds - (not_serving or 0.0)))
        at_free = version()
        cap["pages"] = 0
        engine.dispose()
        resumed = _wait(lambda: version() > at_free, 120)
        serving = _wait(lambda: _serving(server.address), 60)
    finally:
        for p in devices:
            p.kill()
            p.wait()
        server.stop(grace=0.5)
    store = Store(db)
    out = {
        "full_s": seconds,
        "health_not_serving_after_s": None if not_serving is None else round(not_serving, 2),
        "resume_after_freeing_s": None if resumed is None else round(resumed, 2),
        "serving_again": serving is not None,
        **chain(store),
    }
    store.close()
    return out


def resets(rounds: int, tmp: Path, rng: random.Random) -> dict[str, Any]:
    from client.runtime import ClientConfig, DeviceClient, load_partition
    from server.app import XenoServer

    db = f"sqlite:///{tmp}/resets.db"
    server = XenoServer(
        _in_process(db=db, secagg=False, rounds=rounds, clients_per_round=3, min_clients=2,
                selection_window=0.5, eval_data="none", round_deadline=15.0)
    ).start()  # fmt: skip
    proxy = Proxy(server.port)
    sent: dict[tuple[str, str], tuple[np.ndarray, int]] = {}

    class Recording(DeviceClient):
        def _deliver(self, task: Any, pending: Any) -> None:
            assert self._creds is not None
            key = (task.round_id, self._creds.device_id)
            sent[key] = (pending.result.delta.copy(), pending.result.num_examples)
            super()._deliver(task, pending)

    clients = []
    for i in range(3):
        config = ClientConfig(
            server=f"127.0.0.1:{proxy.port}", state_dir=str(tmp / f"reset-dev{i}"),
            partition=i, num_partitions=3, max_wait_ms=2000, max_backoff=0.5,
            allow_plaintext=True, local_epochs=1,
        )  # fmt: skip
        clients.append(Recording(config, load_partition(config), threading.Event()))
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    stop = threading.Event()

    def chaos() -> None:
        while not stop.wait(rng.uniform(0.2, 0.6)):
            proxy.reset_all()

    threading.Thread(target=chaos, daemon=True).start()
    try:
        finished = server.coordinator.wait_finished(timeout=60 + 20 * rounds)
    finally:
        stop.set()
        for c in clients:
            c.stop.set()
        for t in threads:
            t.join(timeout=30)
        for c in clients:
            c.close()
        proxy.close()
    store = server.store
    checked = mismatched = 0
    worst = 0.0
    for v in store.list_versions(MODEL)[1:]:
        if not v.round_id:
            continue
        parts = [
            p for p in store.round_participants(v.round_id) if p.status in ("uploaded", "reported")
        ]
        updates = [sent.get((v.round_id, p.device_id)) for p in parts]
        if any(u is None for u in updates):
            mismatched += 1
            continue
        deltas = np.stack([u[0] for u in updates if u]).astype(np.float64)
        weights = np.array([u[1] for u in updates if u], dtype=np.float64)
        mean = weights @ deltas / weights.sum()
        expected = store.load_version(MODEL, v.version - 1).astype(np.float64) + mean
        error = float(np.max(np.abs(store.load_version(MODEL, v.version) - expected)))
        worst = max(worst, error)
        checked += 1
        mismatched += error > 1e-5
    out = {
        "finished": finished,
        "connection_resets": proxy.resets,
        "versions_rederived": checked,
        "versions_mismatched": mismatched,
        "max_abs_error": worst,
        **chain(store),
    }
    server.stop(grace=0.5)
    return out


def _pg_schema(base: str) -> tuple[str, Callable[[], None]]:
    schema = "chaos_" + uuid.uuid4().hex[:10]
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--outage", type=float, default=10.0, help="seconds of each outage")
    parser.add_argument("--reset-rounds", type=int, default=8)
    parser.add_argument("--postgres", default="", help="PostgreSQL URL (a schema is made)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default="", help="comma-separated: sigkill,postgres_outage,sqlite_full,resets"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    only = set(args.only.split(",")) if args.only else None
    out: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if only is None or "sigkill" in only:
            out["sigkill_sqlite"] = sigkill(f"sqlite:///{tmp}/kill.db", args.kills, tmp, rng)
            if args.postgres:
                url, drop = _pg_schema(args.postgres)
                try:
                    out["sigkill_postgres"] = sigkill(url, args.kills, tmp, rng)
                finally:
                    drop()
        if args.postgres and (only is None or "postgres_outage" in only):
            url, drop = _pg_schema(args.postgres)
            try:
                out["postgres_outage"] = postgres_outage(url, args.outage, tmp)
            finally:
                drop()
        if only is None or "sqlite_full" in only:
            out["sqlite_full"] = sqlite_full(args.outage, tmp)
        if only is None or "resets" in only:
            out["resets"] = resets(args.reset_rounds, tmp, rng)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["load_average_1m"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
