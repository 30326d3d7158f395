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


def _wait_healthy(server: subprocess.Popen[str], address: str) -> None:
    # How fast it restarts is a figure (benchmarks/restart.py), not a test: this
    # bound only keeps a wedged start from hanging the suite on a loaded machine.
    give_up = time.monotonic() + 90
    while not _healthy(address):
        assert server.poll() is None, server.communicate()[0]
        assert time.monotonic() < give_up, "the restarted server never became healthy"
        time.sleep(0.2)


def _rounds_and_versions(db: str) -> tuple[list[tuple[int, str]], list[int]]:
    store = Store(db)
    try:
        rounds = [(r.number, r.status) for r in store.list_rounds("digits-mlp")]
        return rounds, [v.version for v in store.list_versions("digits-mlp")]
    finally:
        store.close()


@pytest.mark.slow
def test_server_killed_at_each_step_of_a_round_resumes_consistent(tmp_path: Path) -> None:
    """SIGKILL the server while devices upload, while it unmasks, and while it writes the
    new version, one kill after another with the same devices running throughout: each
    restart marks the killed round failed, and the version chain never skips or repeats."""
    db = f"sqlite:///{tmp_path}/fl.db"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    crash_points = ["upload", "unmask", "version-write"]
    server = _server(port, db, rounds=3, crash_at=crash_points[0])
    started = [server]
    clients = [_device(address, i, tmp_path) for i in range(3)]
    killed_rounds: list[int] = []
    try:
        for i, crash_at in enumerate(crash_points):
            out, _ = server.communicate(timeout=120)
            assert server.returncode == -signal.SIGKILL, out
            assert f"crash point {crash_at}" in out
            rounds, versions = _rounds_and_versions(db)
            assert rounds[-1][1] == "running"  # the killed round, left as it was
            killed_rounds.append(rounds[-1][0])
            following = crash_points[i + 1] if i + 1 < len(crash_points) else None
            server = _server(port, db, rounds=2 if following is None else 3, crash_at=following)
            started.append(server)
            _wait_healthy(server, address)
            after, versions_after = _rounds_and_versions(db)
            # the restart fails the killed round and keeps every version written before it
            assert dict(after)[killed_rounds[-1]] == "failed"
            assert versions_after[: len(versions)] == versions
        for c in clients:  # devices reconnect by themselves, three times, and finish
            c_out, _ = c.communicate(timeout=150)
            assert c.returncode == 0, c_out
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
    finally:
        for p in [*started, *clients]:
            p.kill()
    store = Store(db)
    rounds = store.list_rounds("digits-mlp")
    versions = store.list_versions("digits-mlp")
    store.close()
    for number in killed_rounds:
        interrupted = next(r for r in rounds if r.number == number)
        assert interrupted.status == "failed" and "restarted" in interrupted.failure_reason
    # every completed round made exactly one version, in a chain, nothing applied twice
    completed = [r for r in rounds if r.status == "completed"]
    assert len(completed) == len(versions) - 1
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert all(v.parent_version == v.version - 1 for v in versions[1:])
    assert sum(r.number > killed_rounds[-1] and r.status == "completed" for r in rounds) == 2


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


def _plain_server(port: int, db: str, strategy: str) -> subprocess.Popen[str]:
    """A real `xeno-fl server` for hand-driven devices: plain rounds of 2 uploads."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XENO_LOG_LEVEL": "warning"}
    env.pop("XENO_CRASH_AT", None)
    args = ["--port", str(port), "--db", db, "--strategy", strategy, "--no-secagg"]
    args += ["--min-clients", "2", "--clients-per-round", "2", "--selection-window", "0.2"]
    args += ["--eval-data", "none", "--metrics-port", "-1", "--rounds", "0"]
    return subprocess.Popen(
        [*XENO, "server", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _serving(port: int, db: str, strategy: str) -> subprocess.Popen[str]:
    server = _plain_server(port, db, strategy)
    deadline = time.monotonic() + 120  # a bound for failure only: start-up is not under test
    while not _healthy(f"127.0.0.1:{port}"):
        assert server.poll() is None, server.communicate()[0]
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)
    return server


def _drive_round(address: str, creds: list[tuple[str, str]], number: int, db: str) -> None:
    """Both devices check in and upload fixed updates (in a fixed order); wait for the version."""
    import threading

    import grpc
    import numpy as np

    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc
    from common.tensors import iter_chunks, to_wire

    with grpc.insecure_channel(address) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        mds = [(("x-xeno-device-id", d), ("authorization", f"Bearer {t}")) for d, t in creds]
        tasks: list[pb.Task | None] = [None, None]

        def check_in(i: int) -> None:
            resp = stub.CheckIn(pb.CheckInRequest(max_wait_ms=10_000), metadata=mds[i], timeout=30)
            tasks[i] = resp.task if resp.HasField("task") else None

        threads = [threading.Thread(target=check_in, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, task in enumerate(tasks):
            assert task is not None, f"device {i} got no task in round {number}"
            header = next(
                iter(
                    stub.DownloadModel(
                        pb.DownloadModelRequest(round_id=task.round_id), metadata=mds[i]
                    )
                )
            ).header
            d = header.manifest.total_elements
            update = np.random.default_rng(100 * number + i).normal(0, 0.05, d).astype(np.float32)
            stub.UploadUpdate(
                iter(
                    [
                        pb.UpdateChunk(
                            header=pb.UpdateHeader(
                                round_id=task.round_id,
                                base_version=task.model_version,
                                manifest=header.manifest,
                                total_bytes=4 * d,
                                num_examples=10 + i,
                            )
                        ),
                        *(pb.UpdateChunk(data=c) for c in iter_chunks(to_wire(update), 1 << 16)),
                    ]
                ),
                metadata=mds[i],
                timeout=30,
            )
    deadline = time.monotonic() + 120
    while True:
        store = Store(db)
        version = store.get_model("digits-mlp").current_version  # type: ignore[union-attr]
        store.close()
        if version == number + 1:
            return
        assert time.monotonic() < deadline, f"round {number} made no version"
        time.sleep(0.05)


def _register(address: str, n: int) -> list[tuple[str, str]]:
    import grpc

    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        out = []
        for _ in range(n):
            resp = stub.Register(pb.RegisterRequest(), timeout=10)
            out.append((resp.device_id, resp.token))
        return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_server_optimizer_state_survives_sigkill_between_rounds(
    strategy: str, tmp_path: Path
) -> None:
    """Kill -9 after round 2, restart, run round 3: version 4 equals an uninterrupted run's."""
    import numpy as np

    from server.strategies import make_strategy

    results: dict[str, list[np.ndarray]] = {}
    for run in ("uninterrupted", "killed"):
        db = f"sqlite:///{tmp_path}/{run}.db"
        port = _free_port()
        address = f"127.0.0.1:{port}"
        server = _serving(port, db, strategy)
        try:
            creds = _register(address, 2)
            for number in (1, 2):
                _drive_round(address, creds, number, db)
            if run == "killed":
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=10)
                assert server.returncode == -signal.SIGKILL
                server = _serving(port, db, strategy)  # same database, same credentials
            _drive_round(address, creds, 3, db)
        finally:
            server.kill()
            server.communicate()
        store = Store(db, Sealer(bytes.fromhex(os.environ["XENO_DATA_KEY"])))
        results[run] = [store.load_version("digits-mlp", v) for v in (1, 2, 3, 4)]
        stored = store.load_optimizer_state("digits-mlp", 4)
        store.close()
        assert stored is not None and stored.strategy == strategy
    for before, after in zip(results["uninterrupted"], results["killed"], strict=True):
        np.testing.assert_array_equal(before, after)
    # and the state matters: from fresh optimizer state round 3 would have given another version
    v3, v4 = results["killed"][2], results["killed"][3]
    uninformed = make_strategy(strategy)
    uninformed.initialize(v3)
    mean3 = (
        sum(
            (10 + i) * np.random.default_rng(300 + i).normal(0, 0.05, v3.size).astype(np.float32)
            for i in range(2)
        )
        / 21
    )
    assert not np.allclose(uninformed.aggregate_fit(v3, mean3.astype(np.float32)), v4, atol=1e-6)
