"""The intents task: the fastText model federated over simulated CLINC150 users, end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.protection import TaskDeclined
from client.runtime import ClientConfig, DeviceClient, load_partition
from common.data.clinc150 import load_clinc150, user_partitions
from common.models import MLP, FastText, ModelSpec
from common.tasks import TaskName, TextShard, evaluation_set, simulated_shard
from server.app import ServerConfig
from tests.test_cli import XENO, _env


def test_a_device_holds_its_users_training_texts_only() -> None:
    data = load_clinc150()
    users = user_partitions(data.train.labels, 20, alpha=0.5, seed=4)
    shard = simulated_shard(TaskName.INTENTS, 7, 20, alpha=0.5, seed=4)
    assert isinstance(shard, TextShard)
    assert shard.texts == tuple(data.train.texts[i] for i in users[7].train)
    np.testing.assert_array_equal(shard.labels, data.train.labels[users[7].train])
    held = {data.train.texts[i] for i in users[7].heldout}
    assert len(shard) == 600 and not held & set(shard.texts)  # 750 minus the fifth held out
    features = FastText().features
    x = shard.featurized(features).x
    assert x.shape[0] == 600 and shard.featurized(features).x is x  # cached per feature set


def test_task_settings_choose_model_spec_and_evaluation_data() -> None:
    config = ServerConfig(task="intents")
    assert config.model == "intents-fasttext"
    assert config.model_spec() == ModelSpec("fasttext", {"num_classes": 150})
    assert ServerConfig().model == "digits-mlp"
    assert ServerConfig().model_spec().architecture == "mlp"
    assert ServerConfig(task="intents", model="mine").model == "mine"
    test = evaluation_set(TaskName.INTENTS, config.model_spec(), 0, 0.2)
    assert test.x.shape[0] == 4500 and test.x.dtype == np.int64
    with pytest.raises(ValueError, match="unknown task 'sports'; use one of: digits, intents"):
        ServerConfig(task="sports")
    with pytest.raises(ValueError, match="trains a fasttext model"):
        evaluation_set(TaskName.INTENTS, ModelSpec("mlp", {}), 0, 0.2)


def test_a_device_declines_a_model_that_does_not_fit_its_data(tmp_path: Path) -> None:
    texts = ClientConfig(state_dir=str(tmp_path / "t"), task="intents", num_partitions=50)
    device = DeviceClient(texts, load_partition(texts))
    with pytest.raises(TaskDeclined, match="holds text"):
        device._data_for(MLP(64, [8], 10))
    assert device._data_for(FastText()).x.dtype == np.int64
    digits = ClientConfig(state_dir=str(tmp_path / "d"))
    device = DeviceClient(digits, load_partition(digits))
    with pytest.raises(TaskDeclined, match="takes text"):
        device._data_for(FastText())


def test_federated_intents_learn_over_real_grpc(server_factory: Any, device_threads: Any) -> None:
    server = server_factory(
        task="intents",
        model="intents-fasttext",
        learning_rate=5.0,
        local_epochs=5,
        rounds=2,
        clients_per_round=3,
    )
    devices = device_threads(server, 3, num_partitions=10, task="intents")
    assert server.coordinator.wait_finished(timeout=240)
    versions = server.store.list_versions("intents-fasttext")
    assert [v.version for v in versions] == [1, 2, 3]
    # Chance is 1/150; three users' 3,600 training queries already teach the model something.
    assert versions[-1].metrics["accuracy"] > 0.05
    for d in devices:
        d.stop.set()


@pytest.mark.slow
def test_simulate_task_intents_runs_end_to_end(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            *XENO,
            "simulate",
            "--task",
            "intents",
            "--clients",
            "4",
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--personalization",
            "fedrep",
            "--db",
            f"sqlite:///{tmp_path}/sim.db",
            "--report",
            str(report),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(report.read_text())
    assert data["model"] == "intents-fasttext"
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["participants"] == 4 for r in rounds)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] > 1 / 150
    # Federated evaluation: an evaluation round after the last one (--eval-every defaults to
    # the rounds when fewer than 5) had the devices score version 3 on their users' held-out
    # fifths (4 users of 3,750 queries, each keeping 750); the server got the secure sum.
    evaluation = data["federated_evaluation"]
    assert [e["version"] for e in evaluation] == [3]
    assert all(e["devices"] == 4 and e["heldout_examples"] == 3000 for e in evaluation)
    assert evaluation[0]["server_accuracy"] == rounds[1]["accuracy"]
    assert 0 <= evaluation[0]["federated_accuracy"] <= 1
    assert evaluation[0]["personalized_accuracy"] > evaluation[0]["federated_accuracy"]
    assert "federated accuracy" in out.stdout
