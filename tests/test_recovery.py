"""A server killed with SIGKILL mid-round restarts consistent; devices reconnect by themselves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.ledger import LedgerEntry, PrivacyLedger
from client.storage import LocalStore
from common.atrest import Sealer
from server.store import Store

XENO = [sys.executable, "-m", "xeno.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(port: int, db: str, rounds: int, crash_at: str | None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XENO_LOG_LEVEL": "warning"}
    env.pop("XENO_CRASH_AT", None)
    if crash_at:
        env["XENO_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [
            *XENO,
            "server",
            "--port",
            str(port),
            "--db",
            db,
            "--rounds",
            str(rounds),
            "--clients-per-round",
            "3",
            "--min-clients",
            "3",
            "--local-epochs",
            "1",
            "--selection-window",
            "1",
            "--metrics-port",
            "-1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _device(address: str, i: int, tmp_path: Path) -> subprocess.Popen[str]:
    """A real device process holding shard i, its store in tmp_path/dev{i}."""
    return subprocess.Popen(
        [
            *XENO,
            "client",
            "--server",
            address,
            "--partition",
            str(i),
            "--num-partitions",
            "3",
            "--state-dir",
            str(tmp_path / f"dev{i}"),
            "--max-backoff",
            "1",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XENO_LOG_LEVEL": "warning"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _healthy(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                .status
            )
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["upload", "unmask", "version-write"])
def test_server_killed_mid_round_resumes_consistent(crash_at: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/fl.db"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    server = _server(port, db, rounds=3, crash_at=crash_at)
    clients = [_device(address, i, tmp_path) for i in range(3)]
    restarted = None
    try:
        out, _ = server.communicate(timeout=120)
        assert server.returncode == -signal.SIGKILL, out
        assert f"crash point {crash_at}" in out
        store = Store(db)
        before = [(r.number, r.status) for r in store.list_rounds("digits-mlp")]
        versions_before = [v.version for v in store.list_versions("digits-mlp")]
        store.close()
        assert before[-1][1] == "running"  # the killed round, left as it was
        started = time.monotonic()
        restarted = _server(port, db, rounds=2, crash_at=None)
        while not _healthy(address):
            assert restarted.poll() is None, restarted.communicate()[0]
            time.sleep(0.2)
        assert time.monotonic() - started < 10, "restart took longer than 10 s"
        for c in clients:  # devices reconnect by themselves and finish
            c_out, _ = c.communicate(timeout=150)
            assert c.returncode == 0, c_out
        out, _ = restarted.communicate(timeout=60)
        assert restarted.returncode == 0, out
    finally:
        for p in [server, *clients, *([restarted] if restarted else [])]:
            p.kill()
    store = Store(db)
    rounds = store.list_rounds("digits-mlp")
    versions = store.list_versions("digits-mlp")
    store.close()
    interrupted = next(r for r in rounds if r.number == before[-1][0])
    assert interrupted.status == "failed" and "restarted" in interrupted.failure_reason
    # every completed round made exactly one version, in a chain, nothing applied twice
    completed = [r for r in rounds if r.status == "completed"]
    assert len(completed) == len(versions) - 1
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert all(v.parent_version == v.version - 1 for v in versions[1:])
    assert [v.version for v in versions][: len(versions_before)] == versions_before
    assert sum(r.number > interrupted.number and r.status == "completed" for r in rounds) == 2


@pytest.mark.slow
def test_device_killed_mid_federation_comes_back_as_itself(server_factory, tmp_path: Path) -> None:
    """SIGKILL a device, start it again on the same store: same identity, no re-enrollment,
    and its privacy ledger keeps every round it spent before the kill."""
    server = server_factory(
        rounds=4,
        clients_per_round=3,
        min_clients=3,
        secagg=True,
        dp_sgd=True,
        dp_sgd_noise_multiplier=1.0,
    )

    def ledger() -> list[LedgerEntry]:
        key = bytes.fromhex(os.environ["XENO_DEVICE_KEY"])
        return PrivacyLedger(LocalStore(tmp_path / "dev0", Sealer(key))).entries

    devices = [_device(server.address, i, tmp_path) for i in range(3)]
    try:
        deadline = time.monotonic() + 90
        while server.store.get_model("digits-mlp").current_version < 2:
            assert time.monotonic() < deadline, "no round completed"
            time.sleep(0.1)
        devices[0].send_signal(signal.SIGKILL)
        devices[0].wait(timeout=10)
        before = ledger()  # opens and parses: the kill left no torn file
        assert before, "the device spent in round 1 but its ledger is empty"
        enrolled = len(server.registry)
        devices[0] = _device(
            server.address, 0, tmp_path
        )  # same state dir: credentials, identity key and ledger survive
        for d in devices:
            out, _ = d.communicate(timeout=150)
            assert d.returncode == 0, out
    finally:
        for d in devices:
            d.kill()
    assert server.coordinator.finished
    assert len(server.registry) == enrolled == 3  # it came back as itself
    rounds = server.store.list_rounds("digits-mlp")
    assert sum(r.status == "completed" for r in rounds) == 4
    after = ledger()
    assert after[: len(before)] == before and len(after) > len(before)
    assert after[-1].epsilon > before[-1].epsilon
