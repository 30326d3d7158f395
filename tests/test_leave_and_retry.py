"""Devices that leave, leave cleanly; a retry after a lost answer is idempotent in every phase.

Real devices (`DeviceClient`) over real gRPC. A lost answer is played at the
network boundary: the call reaches the server and completes there, and the
device sees UNAVAILABLE instead of the answer, as after a connection reset.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client.runtime import ClientConfig, DeviceClient, load_partition
from common.pb import federation_pb2 as pb
from server.app import XenoServer


class LostAnswer(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (the answer was lost)"


class LossyStub:
    """A device's stub whose first call of `method` completes on the server, answer lost."""

    def __init__(self, stub: Any, method: str) -> None:
        self._stub = stub
        self._method = method
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._stub, name)
        if name != self._method:
            return real

        def call(request: Any, *args: Any, **kwargs: Any) -> Any:
            if self.lost:
                return real(request, *args, **kwargs)
            if not hasattr(request, "ByteSize"):
                request = list(request)  # a stream: keep it to send it again
            real(iter(request) if isinstance(request, list) else request, *args, **kwargs)
            self.lost += 1
            raise LostAnswer()

        return call


def _device(server: XenoServer, tmp_path: Path, i: int, n: int) -> DeviceClient:
    config = ClientConfig(
        server=server.address,
        state_dir=str(tmp_path / f"dev{i}"),
        partition=i,
        num_partitions=n,
        max_wait_ms=2000,
        max_backoff=1.0,
        allow_plaintext=not server.config.secagg,
        min_secagg_cohort=2,
    )
    return DeviceClient(config, load_partition(config), threading.Event())


def _run(clients: list[DeviceClient]) -> list[threading.Thread]:
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def clients() -> Iterator[list[DeviceClient]]:
    made: list[DeviceClient] = []
    yield made
    for c in made:
        c.stop.set()
    for c in made:
        c.close()


@pytest.mark.parametrize(
    ("secagg", "method"),
    [
        (True, "AdvertiseKeys"),
        (True, "ShareKeys"),
        (True, "UploadMasked"),
        (True, "GetUnmaskRequest"),
        (True, "ConfirmSurvivors"),
        (True, "Unmask"),
        (False, "ReportMetrics"),
        (False, "UploadUpdate"),
    ],
)
def test_a_lost_answer_is_retried_with_the_same_message_and_the_device_stays_in(
    server_factory: Callable[..., XenoServer],
    clients: list[DeviceClient],
    tmp_path: Path,
    secagg: bool,
    method: str,
) -> None:
    """Every device is needed (min_clients = cohort): a device that dropped out fails it."""
    server = server_factory(
        rounds=1,
        clients_per_round=3,
        min_clients=3,
        secagg=secagg,
        secagg_phase_timeout=20.0,
        secagg_threshold=3,  # unmasking needs every device's shares: none may drop out
        eval_data="none",
    )
    clients += [_device(server, tmp_path, i, 3) for i in range(3)]
    lossy = LossyStub(clients[0]._stub, method)
    clients[0]._stub = lossy  # type: ignore[assignment]
    trained = {"count": 0}
    real_train = clients[0]._train

    def counting_train(*args: Any, **kwargs: Any) -> Any:
        trained["count"] += 1
        return real_train(*args, **kwargs)

    clients[0]._train = counting_train  # type: ignore[method-assign]
    _run(clients)
    assert server.coordinator.wait_finished(timeout=120)
    assert lossy.lost == 1, f"{method} was never called"
    [rnd] = server.store.list_rounds(server.config.model)
    assert rnd.status == "completed" and rnd.participants == 3, rnd.failure_reason
    assert trained["count"] == 1  # resumed, not retrained


def _available(server: XenoServer) -> set[str]:
    with server.coordinator._cond:
        return set(server.coordinator._available)


def test_a_stopped_device_says_it_leaves_and_is_never_selected(
    server_factory: Callable[..., XenoServer], clients: list[DeviceClient], tmp_path: Path
) -> None:
    """Stop (what SIGTERM does) one of three devices while they wait; a fourth joins.

    The leaver must not be selected: with min_clients = 3 and a 60 s deadline, a round
    that selected it would wait its whole deadline and fail.
    """
    server = server_factory(
        clients_per_round=3, min_clients=3, round_deadline=60.0, selection_window=0.5
    )
    clients += [_device(server, tmp_path, i, 4) for i in range(3)]
    threads = _run(clients)
    coordinator = server.coordinator
    end = time.monotonic() + 90
    while coordinator.model.current_version < 2:
        assert time.monotonic() < end
        time.sleep(0.05)
    leaver = clients[2]
    leaver.stop.set()
    threads[2].join(timeout=30)
    assert not threads[2].is_alive()
    assert leaver._creds is not None
    gone = leaver._creds.device_id
    assert gone not in _available(server)
    # A round that selected the leaver before it left may still finish with its upload (a
    # stopping device completes its step): only rounds that began after it left count.
    began_before = {r.id for r in server.store.list_rounds(server.config.model)}
    clients.append(_device(server, tmp_path, 3, 4))
    _run(clients[3:])
    started = time.monotonic()

    def later() -> list[Any]:
        rounds = server.store.list_rounds(server.config.model)
        return [r for r in rounds if r.id not in began_before]

    while sum(r.result_version is not None for r in later()) < 2:
        assert time.monotonic() - started < 40, "rounds stalled: the leaver was selected?"
        time.sleep(0.05)
    assert all(r.status != "failed" for r in later()), [r.failure_reason for r in later()]
    for r in later():
        assert gone not in {p.device_id for p in server.store.round_participants(r.id)}


def test_a_device_that_hangs_up_mid_poll_stops_being_available(
    server_factory: Callable[..., XenoServer], raw_device: Any
) -> None:
    """SIGKILL closes the connection: the cancelled CheckIn takes the device off the list."""
    server = server_factory(clients_per_round=3, min_clients=3)
    device = raw_device(server)
    call = device.stub.CheckIn.future(
        pb.CheckInRequest(max_wait_ms=10_000), metadata=device.md, timeout=30
    )
    end = time.monotonic() + 10
    while device.device_id not in _available(server):
        assert time.monotonic() < end
        time.sleep(0.02)
    call.cancel()
    while device.device_id in _available(server):
        assert time.monotonic() < end, "a hung-up device stayed available"
        time.sleep(0.02)


def test_leave_takes_a_selected_device_out_of_the_open_round(
    server_factory: Callable[..., XenoServer], raw_device: Any
) -> None:
    """Both selected devices leave: the round stops waiting for them (no 60 s deadline)."""
    server = server_factory(clients_per_round=2, min_clients=2, round_deadline=60.0)
    summaries: list[Any] = []
    server.coordinator.add_listener(summaries.append)
    a, b = raw_device(server), raw_device(server)
    got: dict[str, pb.CheckInResponse] = {}
    polls = [
        threading.Thread(target=lambda d=d: got.__setitem__(d.device_id, d.check_in(10_000)))
        for d in (a, b)
    ]
    for t in polls:
        t.start()
    for t in polls:
        t.join(timeout=20)
    assert all(r.WhichOneof("outcome") == "task" for r in got.values())
    for d in (a, b, b):  # the second Leave of b is a no-op
        d.stub.Leave(pb.LeaveRequest(reason="SIGTERM"), metadata=d.md, timeout=5)
    end = time.monotonic() + 10
    while not summaries:
        assert time.monotonic() < end, "the round kept waiting for devices that left"
        time.sleep(0.02)
    [summary] = summaries
    assert summary.status == "failed" and summary.participants == 0
    for p in server.store.round_participants(summary.round_id):
        assert p.status == "declined" and p.note == "left: SIGTERM"


def test_temporary_files_of_a_killed_write_are_removed_when_the_device_starts(
    tmp_path: Path,
) -> None:
    state = tmp_path / "dev"
    state.mkdir()
    (state / ".tmp-k1ll3d").write_bytes(b"half a credentials file")
    (state / "notes.txt").write_text("not ours")
    config = ClientConfig(server="127.0.0.1:1", state_dir=str(state), partition=0)
    client = DeviceClient(config, None, threading.Event())
    client.close()
    assert sorted(p.name for p in state.iterdir()) == ["notes.txt"]
    assert client.store.remove_leftovers() == []


class UnreachableFor:
    """A device's stub for which the server is gone for `method`: every call UNAVAILABLE."""

    def __init__(self, stub: Any, method: str) -> None:
        self._stub = stub
        self._method = method
        self.refused = threading.Event()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._stub, name)
        if name != self._method:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.refused.set()
            raise LostAnswer()

        return call


def test_a_device_stopped_while_it_resends_a_phase_call_leaves_at_once(
    server_factory: Callable[..., XenoServer], clients: list[DeviceClient], tmp_path: Path
) -> None:
    """SIGTERM while the server is away mid-round: the device must not keep resending
    until the phase gives up (a minute and more), it leaves the round and stops."""
    server = server_factory(
        rounds=1, clients_per_round=3, min_clients=3, secagg=True, secagg_phase_timeout=20.0
    )
    clients += [_device(server, tmp_path, i, 3) for i in range(3)]
    away = UnreachableFor(clients[0]._stub, "ShareKeys")
    clients[0]._stub = away  # type: ignore[assignment]
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(clients[0].run()), daemon=True)
    thread.start()
    _run(clients[1:])
    assert away.refused.wait(timeout=90), "the device never reached ShareKeys"
    time.sleep(0.3)  # it is now between resends
    clients[0].stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the stopped device kept resending"
    assert exit_code == [0]
