"""Restart-to-SERVING time of a server killed with SIGKILL, on a machine kept busy; one JSON line.

    python benchmarks/restart.py --restarts 10
    python benchmarks/restart.py --restarts 10 --db postgresql+psycopg://postgres@127.0.0.1:5432/test

One busy loop per core (`--busy`, default os.cpu_count()) runs the whole time. Each
restart starts `xeno-fl server` on the same database, polls gRPC health every 50 ms
until it reports SERVING, records the time since the process was started, and kills
it with SIGKILL (no clean shutdown, as after a crash). The first start, which creates
the schema and the model, is not counted. Also reported: the same restarts on the
idle machine (before the busy loops start) and the import time of the server module.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                .status
            )
        except grpc.RpcError:
            return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def start_server(db: str, port: int, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "XENO_LOG_LEVEL": "warning"}
    env.setdefault("XENO_DATA_KEY", "11" * 32)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xeno.cli",
            "server",
            "--port",
            str(port),
            "--db",
            db,
            "--metrics-port",
            "-1",
            *(extra or []),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def time_to_serving(db: str, port: int, timeout: float = 120.0) -> float:
    """Start a server, wait for SERVING, SIGKILL it; seconds from start to SERVING."""
    started = time.monotonic()
    proc = start_server(db, port)
    try:
        while not _serving(f"127.0.0.1:{port}"):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            if time.monotonic() - started > timeout:
                raise RuntimeError("the server did not serve in time")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _busy() -> None:
    while True:
        pass


def _import_seconds() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import server.app"], cwd=ROOT, check=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--idle-restarts", type=int, default=3)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--db", default="", help="database URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or f"sqlite:///{tmp}/restart.db"
        port = _free_port()
        time_to_serving(db, port)  # creates the schema and the model
        idle = [time_to_serving(db, port) for _ in range(args.idle_restarts)]
        idle_import = _import_seconds()
        loops = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.busy)]
        for p in loops:
            p.start()
        try:
            busy_import = _import_seconds()
            loaded = [time_to_serving(db, port) for _ in range(args.restarts)]
            load = os.getloadavg()[0]
        finally:
            for p in loops:
                p.kill()
    print(
        json.dumps(
            {
                "db": "postgresql" if args.db.startswith("postgres") else "sqlite",
                "busy_loops": args.busy,
                "cores": os.cpu_count(),
                "load_average_1m": round(load, 1),
                "restarts": args.restarts,
                "serving_s_median": round(statistics.median(loaded), 2),
                "serving_s_max": round(max(loaded), 2),
                "serving_s": [round(s, 2) for s in loaded],
                "idle_serving_s_median": round(statistics.median(idle), 2) if idle else None,
                "import_s_idle": round(idle_import, 2),
                "import_s_busy": round(busy_import, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
