"""Restart-to-SERVING time of a server killed with SIGKILL, on a machine kept busy; one JSON line.

    python benchmarks/restart.py --restarts 10
    python benchmarks/restart.py --restarts 10 --db postgresql+psycopg://postgres@127.0.0.1:5432/test

One busy loop per core (`--busy`, default os.cpu_count()) runs the whole time. Each
restart starts `xeno-fl server` on the same database, polls gRPC health every 50 ms
until it reports SERVING, records the time since the process was started, then
registers a device (a real call that writes to the database) and records when that
was answered, and kills the server with SIGKILL (no clean shutdown, as after a
crash). The first start, which creates the schema and the model, is not counted.
Also reported: the CPU time the server process had used when it reported SERVING
(what start-up costs; the rest of the wall time is waiting for a core on a busy
machine), the same restarts on the idle machine (before the busy loops start) and
the import time of the server module.
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _register(address: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc

    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with grpc.insecure_channel(address) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        stub.Register(pb.RegisterRequest(identity_public_key=key), timeout=60)


def time_to_serving(
    db: str, port: int, extra: list[str] | None = None, timeout: float = 120.0
) -> tuple[float, float, float]:
    """Start a server, wait for SERVING, register a device, SIGKILL it.

    Returns the seconds from start to SERVING, the server's CPU seconds by then, and the
    seconds from start until the registration was answered.
    """
    started = time.monotonic()
    proc = start_server(db, port, extra)
    address = f"127.0.0.1:{port}"
    try:
        while not _serving(address):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            if time.monotonic() - started > timeout:
                raise RuntimeError("the server did not serve in time")
            time.sleep(0.05)
        serving = time.monotonic() - started
        cpu = _cpu_seconds(proc.pid)
        _register(address)
        return serving, cpu, time.monotonic() - started
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
    parser.add_argument(
        "--server-args", default="", help="more flags for `xeno-fl server`, space-separated"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or f"sqlite:///{tmp}/restart.db"
        extra = args.server_args.split()
        port = _free_port()
        time_to_serving(db, port, extra)  # creates the schema and the model
        idle_runs = [time_to_serving(db, port, extra) for _ in range(args.idle_restarts)]
        idle_import = _import_seconds()
        loops = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.busy)]
        for p in loops:
            p.start()
        try:
            busy_import = _import_seconds()
            loaded_runs = [time_to_serving(db, port, extra) for _ in range(args.restarts)]
            load = os.getloadavg()[0]
        finally:
            for p in loops:
                p.kill()
    loaded = [r[0] for r in loaded_runs]
    idle = [r[0] for r in idle_runs]
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
                "serving_cpu_s_median": round(statistics.median(r[1] for r in loaded_runs), 2),
                "registered_s_median": round(statistics.median(r[2] for r in loaded_runs), 2),
                "registered_s_max": round(max(r[2] for r in loaded_runs), 2),
                "idle_serving_cpu_s_median": (
                    round(statistics.median(r[1] for r in idle_runs), 2) if idle_runs else None
                ),
                "idle_serving_s_median": round(statistics.median(idle), 2) if idle else None,
                "import_s_idle": round(idle_import, 2),
                "import_s_busy": round(busy_import, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
