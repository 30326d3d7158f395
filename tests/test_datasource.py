"""Devices train on their own data: pluggable local sources (simulated, JSONL, the assistant's)."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.assistant import consent
from client.assistant.consent import Scope
from client.assistant.store import UserStore
from client.assistant.trainer import CustomModelTrainer
from client.datasource import (
    AssistantExamples,
    DataSourceError,
    DeviceData,
    JsonlFile,
    SimulatedShard,
    split_heldout,
)
from client.runtime import ClientConfig, DeviceClient, data_source
from common.data import Dataset
from common.data.clinc150 import load_clinc150, user_partitions
from common.tasks import TaskName, TextShard
from tests.test_cli import XENO, _env

INTENTS = load_clinc150().intents


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _clinc_rows(n: int) -> list[dict[str, str]]:
    data = load_clinc150()
    train = data.train
    return [{"text": train.texts[i], "intent": INTENTS[train.labels[i]]} for i in range(n)]


def test_a_jsonl_file_gives_labelled_texts_and_a_held_out_fifth(tmp_path: Path) -> None:
    rows = _clinc_rows(50)
    path = _write_jsonl(tmp_path / "mine.jsonl", [*rows[:25], "", *rows[25:]])  # blank line ok
    loaded = JsonlFile(path, INTENTS, heldout_fraction=0.2, seed=3).load()
    assert isinstance(loaded.train, TextShard) and isinstance(loaded.heldout, TextShard)
    assert len(loaded.train) == 40 and len(loaded.heldout) == 10
    pairs = {
        (t, INTENTS[int(y)])
        for part in (loaded.train, loaded.heldout)
        for t, y in zip(part.texts, part.labels, strict=True)
    }
    assert pairs == {(r["text"], r["intent"]) for r in rows}
    assert not set(loaded.train.texts) & set(loaded.heldout.texts)
    # Seeded: the same split every time; no held-out part when asked for none.
    again = JsonlFile(path, INTENTS, heldout_fraction=0.2, seed=3).load()
    assert again.heldout is not None and again.heldout.texts == loaded.heldout.texts
    assert JsonlFile(path, INTENTS, heldout_fraction=0.0).load().heldout is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], "line 1: not JSON"),
        ([[1, 2]], 'line 1: expected an object with exactly "text" and "intent"'),
        ([{"text": "hi"}], 'line 1: expected an object with exactly "text" and "intent"'),
        (
            [{"text": "hi", "intent": "greeting", "user": "x"}],
            'line 1: expected an object with exactly "text" and "intent"',
        ),
        ([{"text": "  ", "intent": "greeting"}], 'line 1: "text" must be a non-empty string'),
        ([{"text": 5, "intent": "greeting"}], 'line 1: "text" must be a non-empty string'),
        (
            [{"text": "x" * 10_001, "intent": "greeting"}],
            'line 1: "text" has 10001 characters, more than 10000',
        ),
        (
            [{"text": "ok", "intent": "greeting"}, {"text": "hum", "intent": "my_song"}],
            "line 2: intent 'my_song' is not one of the model's 150 intents",
        ),
        ([""], "no examples"),
    ],
)
def test_a_bad_jsonl_file_is_refused_naming_the_line(
    tmp_path: Path, lines: list[Any], message: str
) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataSourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        JsonlFile(path, INTENTS).load()


def test_a_missing_or_binary_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no such file"):
        JsonlFile(tmp_path / "absent.jsonl", INTENTS).load()
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataSourceError, match="not UTF-8 text"):
        JsonlFile(tmp_path / "bin.jsonl", INTENTS).load()


def test_the_client_command_refuses_a_bad_file_before_registering(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "hum", "intent": "my_song"}])
    run = subprocess.run(
        [*XENO, "client", "--task", "intents", "--data", str(path), "--server", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert run.returncode == 2
    assert "line 1: intent 'my_song' is not one of the model's 150 intents" in run.stderr
    with pytest.raises(ValueError, match="--data and --user are two data sources"):
        ClientConfig(data="a.jsonl", user="lee")
    with pytest.raises(DataSourceError, match="does not train on text"):
        data_source(ClientConfig(data=str(path)))  # the digits task has no intents


def test_a_simulated_user_holds_out_the_fifth_it_keeps(tmp_path: Path) -> None:
    data = load_clinc150()
    users = user_partitions(data.train.labels, 20, alpha=0.5, seed=4)
    loaded = SimulatedShard(TaskName.INTENTS, 7, 20, alpha=0.5, seed=4).load()
    assert isinstance(loaded.heldout, TextShard)
    assert loaded.heldout.texts == tuple(data.train.texts[i] for i in users[7].heldout)
    np.testing.assert_array_equal(loaded.heldout.labels, data.train.labels[users[7].heldout])
    assert len(loaded.heldout) == 150 and not set(loaded.heldout.texts) & set(loaded.train.texts)
    assert SimulatedShard(TaskName.DIGITS, 0, 10).load().heldout is None
    auto = SimulatedShard(TaskName.INTENTS, -1, 20, alpha=0.5, seed=4)
    picked = auto.load(27).heldout  # enrollment 27 of 20 shards: shard 7
    assert auto.needs_enrollment and picked is not None
    assert picked.texts == loaded.heldout.texts
    with pytest.raises(DataSourceError, match="must be -1"):
        SimulatedShard(TaskName.DIGITS, -2, 10)


def test_assistant_examples_need_consent_and_come_with_a_held_out_part(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = UserStore("lee", home=home)
    trainer = CustomModelTrainer("lee", store=store)
    for row in _clinc_rows(30):
        trainer.add_training_example(row["text"], "ok", {"intent": row["intent"]}, 5)
    trainer.add_training_example("hum my private song", "ok", {"intent": "my_own_intent"}, 5)
    source = AssistantExamples("lee", INTENTS, home=home, heldout_fraction=0.2)
    with pytest.raises(
        DataSourceError, match="xeno-fl user consent lee --grant federated_training"
    ):
        source.load()
    consent.record(store, Scope.FEDERATED_TRAINING, True)
    store.close()
    loaded = source.load()
    assert loaded.heldout is not None
    assert len(loaded.train) == 24 and len(loaded.heldout) == 6  # the own intent is not shared
    texts = set(loaded.train.texts) | set(loaded.heldout.texts)
    assert texts == {r["text"] for r in _clinc_rows(30)}


@dataclass(frozen=True)
class _Recorded:
    """A source of the test's own making: the runtime trains on whatever it is given."""

    rows: int

    @property
    def needs_enrollment(self) -> bool:
        return True

    def load(self, enrollment_index: int | None = None) -> DeviceData:
        assert enrollment_index is not None
        rng = np.random.default_rng(enrollment_index)
        x = rng.random((self.rows, 64), dtype=np.float32)
        return DeviceData(Dataset(x, rng.integers(0, 10, self.rows)))

    def describe(self) -> str:
        return f"{self.rows} random rows"


def test_a_device_trains_a_real_round_on_any_source(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(rounds=1, min_clients=1, clients_per_round=1, selection_window=0.1)
    config = ClientConfig(
        server=server.address,
        state_dir=str(tmp_path / "dev"),
        allow_plaintext=True,
        max_wait_ms=2000,
        max_backoff=1.0,
    )
    stop = threading.Event()
    client = DeviceClient(config, _Recorded(37), stop)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        assert server.coordinator.wait_finished(timeout=120)
    finally:
        stop.set()
        thread.join(timeout=30)
        client.close()
    [rnd] = server.store.list_rounds(server.config.model)
    assert rnd.status == "completed"
    [participant] = server.store.round_participants(rnd.id)
    assert participant.num_examples == 37


@pytest.mark.slow
def test_the_client_command_trains_on_a_jsonl_file(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(
        task="intents",
        rounds=1,
        min_clients=1,
        clients_per_round=1,
        selection_window=0.1,
        eval_data="none",
    )
    path = _write_jsonl(tmp_path / "mine.jsonl", _clinc_rows(100))
    device = subprocess.Popen(
        [
            *XENO,
            "client",
            "--server",
            server.address,
            "--task",
            "intents",
            "--data",
            str(path),
            "--state-dir",
            str(tmp_path / "dev"),
            "--allow-plaintext",
            "--max-backoff",
            "1",
        ],
        env=_env(),
    )
    try:
        assert server.coordinator.wait_finished(timeout=180)
        assert device.wait(timeout=60) == 0
    finally:
        if device.poll() is None:
            device.kill()
    [rnd] = server.store.list_rounds(server.config.model)
    [participant] = server.store.round_participants(rnd.id)
    assert rnd.status == "completed" and participant.num_examples == 80  # a fifth held out


def test_split_heldout_refuses_a_fraction_outside_0_1() -> None:
    shard = TextShard(("a", "b"), np.array([0, 1]))
    with pytest.raises(DataSourceError, match=r"in \[0, 1\)"):
        split_heldout(shard, 1.0, 0)
