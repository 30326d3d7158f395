"""A consenting user's device trains the federated intent model in a real round; no text leaves.

Everything the device sends passes through a TCP relay that records the
bytes (gRPC messages are not compressed here, so a text sent in any message
would appear in them verbatim).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.assistant import consent
from client.assistant.consent import Scope
from client.assistant.federated import federated_shard
from client.assistant.store import UserStore
from client.assistant.trainer import CustomModelTrainer
from client.runtime import ClientConfig, DeviceClient
from common.data.clinc150 import load_clinc150
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc

SENTINEL = "please reserve the quokka lounge for zanzibar night"


class RecordingRelay:
    """127.0.0.1 relay to target; keeps every byte the client side sends."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture
def relay_for() -> Iterator[list[RecordingRelay]]:
    relays: list[RecordingRelay] = []
    yield relays
    for r in relays:
        r.close()


@pytest.mark.slow
def test_consented_examples_train_a_real_round_and_no_text_leaves(
    server_factory, tmp_path: Path, relay_for: list[RecordingRelay]
) -> None:
    data = load_clinc150()
    intents = data.intents
    store = UserStore("lee", home=tmp_path / "home")
    trainer = CustomModelTrainer("lee", store=store)
    picked = [i for i in range(len(data.train.texts)) if data.train.labels[i] < 3][:60]
    texts = [data.train.texts[i] for i in picked]
    for i in picked:
        trainer.add_training_example(
            data.train.texts[i], "ok", {"intent": intents[data.train.labels[i]]}, 5
        )
    trainer.add_training_example(SENTINEL, "ok", {"intent": intents[0]}, 5)
    trainer.add_training_example("hum my private song", "ok", {"intent": "my_own_intent"}, 5)
    consent.record(store, Scope.FEDERATED_TRAINING, True)
    shard = federated_shard(store, intents)
    assert len(shard) == 61  # the personal intent is not the shared model's

    server = server_factory(
        task="intents",
        rounds=1,
        min_clients=1,
        clients_per_round=1,
        selection_window=0.1,
        eval_data="none",
    )
    relay = RecordingRelay(server.address)
    relay_for.append(relay)
    config = ClientConfig(
        server=relay.address,
        state_dir=str(tmp_path / "device"),
        task="intents",
        allow_plaintext=True,
        max_wait_ms=2000,
        max_backoff=1.0,
    )
    stop = threading.Event()
    client = DeviceClient(config, shard, stop)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        assert server.coordinator.wait_finished(timeout=120)
    finally:
        stop.set()
        thread.join(timeout=30)
        client.close()
    [rnd] = server.store.list_rounds(server.config.model)
    assert rnd.status == "completed" and rnd.participants == 1
    [participant] = server.store.round_participants(rnd.id)
    assert participant.num_examples == 61
    sent = bytes(relay.sent)
    assert len(sent) > 100_000  # the update itself went through the relay
    for text in [SENTINEL, *texts]:
        assert text.encode() not in sent, text
    for word in ("quokka", "zanzibar"):
        assert word.encode() not in sent
    # Control: text that is sent does show up in the recording.
    with grpc.insecure_channel(relay.address) as channel:
        federation_pb2_grpc.FederationStub(channel).Register(
            pb.RegisterRequest(labels={"note": SENTINEL}), timeout=10
        )
    assert SENTINEL.encode() in bytes(relay.sent)
    store.close()


def _user_with_examples(home: Path) -> tuple[UserStore, list[str]]:
    data = load_clinc150()
    store = UserStore("kim", home=home)
    trainer = CustomModelTrainer("kim", store=store)
    picked = [i for i in range(len(data.train.texts)) if data.train.labels[i] < 3][:40]
    for i in picked:
        trainer.add_training_example(
            data.train.texts[i], "ok", {"intent": data.intents[data.train.labels[i]]}, 5
        )
    trainer.add_training_example(SENTINEL, "ok", {"intent": data.intents[1]}, 5)
    return store, [data.train.texts[i] for i in picked]


def test_cli_client_user_without_consent_reads_nothing_and_sends_nothing(
    server_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xeno import cli

    home = tmp_path / "home"
    store, _ = _user_with_examples(home)
    consent.record(store, Scope.FEDERATED_TRAINING, True)
    consent.record(store, Scope.FEDERATED_TRAINING, False)  # withdrawn: no
    store.close()
    server = server_factory(task="intents", min_clients=1, clients_per_round=1)
    monkeypatch.setenv("XENO_HOME", str(home))
    statements: list[str] = []
    real_query = UserStore.query

    def spy(self: UserStore, sql: str, params: tuple = ()) -> list:
        statements.append(sql)
        return real_query(self, sql, params)

    monkeypatch.setattr(UserStore, "query", spy)
    argv = ["client", "--user", "kim", "--server", server.address, "--state-dir"]
    assert cli.main([*argv, str(tmp_path / "dev"), "--allow-plaintext"]) == 2
    assert statements and not any("training_examples" in s for s in statements), statements
    assert server.store.device_records() == []  # it never even registered


@pytest.mark.slow
def test_cli_client_user_with_consent_takes_part_and_no_text_leaves(
    server_factory, tmp_path: Path, relay_for: list[RecordingRelay], monkeypatch
) -> None:
    import signal

    from xeno import cli

    home = tmp_path / "home"
    store, texts = _user_with_examples(home)
    consent.record(store, Scope.FEDERATED_TRAINING, True)
    store.close()
    server = server_factory(
        task="intents",
        rounds=1,
        min_clients=1,
        clients_per_round=1,
        selection_window=0.1,
        eval_data="none",
    )
    relay = RecordingRelay(server.address)
    relay_for.append(relay)
    monkeypatch.setenv("XENO_HOME", str(home))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main(
            [
                "client",
                "--user",
                "kim",
                "--server",
                relay.address,
                "--state-dir",
                str(tmp_path / "dev"),
                "--allow-plaintext",
                "--max-wait-ms",
                "2000",
            ]
        )
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 0
    [rnd] = server.store.list_rounds(server.config.model)
    assert rnd.status == "completed" and rnd.participants == 1
    [participant] = server.store.round_participants(rnd.id)
    assert participant.num_examples == 33  # of 41 stored: a fifth (8) kept held out on the device
    sent = bytes(relay.sent)
    assert len(sent) > 100_000
    for text in [SENTINEL, *texts]:
        assert text.encode() not in sent, text
