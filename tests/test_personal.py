"""Personalization (FedRep): the personal head stays on the device, sealed, and is never sent."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.datasource import SimulatedShard
from client.personal import (
    PersonalStore,
    personal_names,
    personalization_of,
    train_fedrep,
)
from client.runtime import ClientConfig, DeviceClient, data_source
from client.storage import LocalStore
from client.training import LocalTrainingConfig
from common.atrest import DataKeyError, Sealer
from common.models import MLP, FastText
from common.tasks import TaskName
from common.tensors import flatten_state_dict, load_flat_into_module, to_wire
from tests.test_assistant_federated import RecordingRelay


def test_the_task_extras_name_the_method_and_its_epochs() -> None:
    assert personalization_of({}) == ("", 0, 0.0)
    assert personalization_of({"personalization": "none"}) == ("", 0, 0.0)
    assert personalization_of({"personalization": "fedrep"}) == ("fedrep", 2, 0.5)
    extra = {"personalization": "fedrep", "personal_epochs": "3", "personal_learning_rate": "0.5"}
    assert personalization_of(extra) == ("fedrep", 3, 0.5)
    with pytest.raises(ValueError, match="unknown personalization 'ditto'"):
        personalization_of({"personalization": "ditto"})
    with pytest.raises(ValueError, match="personal_epochs must be an integer, got 'x'"):
        personalization_of({"personalization": "fedrep", "personal_epochs": "x"})
    with pytest.raises(ValueError, match=r"personal_epochs must be in 1\.\.100, got 0"):
        personalization_of({"personalization": "fedrep", "personal_epochs": "0"})
    with pytest.raises(ValueError, match=r"personal_learning_rate must be in \(0, 100\], got -1"):
        personalization_of({"personalization": "fedrep", "personal_learning_rate": "-1"})


def test_the_head_is_the_last_linear_layer() -> None:
    assert personal_names(FastText(buckets=64, dim=4, num_classes=5)) == (
        "head.weight",
        "head.bias",
    )
    mlp = MLP(8, [6, 4], 3)
    weight, bias = personal_names(mlp)
    assert mlp.state_dict()[weight].shape == (3, 4) and mlp.state_dict()[bias].shape == (3,)


def _user(partition: int = 3) -> tuple[Any, Any]:
    loaded = SimulatedShard(TaskName.INTENTS, partition, 20, alpha=0.5, seed=0).load()
    features = FastText().features
    assert loaded.heldout is not None
    return loaded.train.featurized(features), loaded.heldout.featurized(features)


def _accuracy(model: torch.nn.Module, data: Any) -> int:
    with torch.no_grad():
        return int((model(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).sum())


def test_a_fedrep_round_trains_head_then_body_and_reports_both_models() -> None:
    torch.manual_seed(0)
    model = FastText()
    train, heldout = _user()
    start = flatten_state_dict(model.state_dict())
    config = LocalTrainingConfig(local_epochs=1, batch_size=32, learning_rate=5.0)
    out = train_fedrep(model, start, train, heldout, config, 2, personal_lr=5.0, seed=1)
    metrics = out.result.metrics
    # Independent references: the global model as downloaded, and its body under the head.
    reference = FastText()
    load_flat_into_module(reference, start)
    assert metrics["heldout_global_correct"] == _accuracy(reference, heldout)
    with torch.no_grad():
        for name, value in out.personal_head.items():
            reference.state_dict()[name].copy_(torch.from_numpy(value))
    assert metrics["heldout_personal_correct"] == _accuracy(reference, heldout)
    assert metrics["heldout_examples"] == len(heldout) == 150
    assert metrics["heldout_personal_accuracy"] > metrics["heldout_global_accuracy"]
    # The upload: the body moved; the head part is the global head refitted, not the personal.
    upload = start + out.result.delta
    e_end = 8192 * 48
    assert np.abs(out.result.delta[:e_end]).max() > 0
    head = upload[e_end : e_end + 150 * 48].reshape(150, 48)
    assert not np.allclose(head, out.personal_head["head.weight"], atol=1e-3)
    # The personal head is the global head fine-tuned: from the same global model and seed,
    # the same head, whatever earlier rounds did.
    again = train_fedrep(model, start, train, heldout, config, 2, personal_lr=5.0, seed=1)
    for name, value in out.personal_head.items():
        np.testing.assert_array_equal(again.personal_head[name], value)


def test_the_personal_head_is_sealed_and_refused_under_another_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = PersonalStore(LocalStore(tmp_path, Sealer(key)))
    head = {"head.weight": np.arange(12, dtype=np.float32).reshape(3, 4) + 0.25}
    head["head.bias"] = np.array([1.5, -2.5, 3.5], dtype=np.float32)
    store.save("intents-fasttext", head)
    raw = (tmp_path / "personal-intents-fasttext.npz").read_bytes()
    assert not raw.startswith(b"PK")  # not a plain .npz (a zip)
    assert head["head.weight"].tobytes()[:16] not in raw
    shapes = {"head.weight": (3, 4), "head.bias": (3,)}
    loaded = store.load("intents-fasttext", shapes)
    assert set(loaded) == set(head) and all(np.array_equal(loaded[k], head[k]) for k in head)
    assert store.load("intents-fasttext", {"head.weight": (5, 4), "head.bias": (5,)}) == {}
    assert store.load("other-model", shapes) == {}
    with pytest.raises(DataKeyError):
        PersonalStore(LocalStore(tmp_path, Sealer(os.urandom(32)))).load("intents-fasttext", shapes)


class _Recording(DeviceClient):
    """A device that remembers the updates it uploaded (plain rounds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uploads: list[np.ndarray] = []

    def _upload(self, task: Any, manifest: Any, delta: np.ndarray, *args: Any) -> None:
        self.uploads.append(delta.copy())
        super()._upload(task, manifest, delta, *args)


@pytest.mark.slow
def test_fedrep_over_grpc_keeps_each_head_on_its_device(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory(
        task="intents",
        personalization="fedrep",
        personal_epochs=2,
        personal_learning_rate=1.0,
        learning_rate=5.0,
        local_epochs=1,
        batch_size=32,
        rounds=2,
        min_clients=3,
        clients_per_round=3,
        eval_data="none",
        round_deadline=120.0,
    )
    relay = RecordingRelay(server.address)
    devices: list[tuple[_Recording, threading.Thread, threading.Event]] = []
    try:
        for i in range(3):
            config = ClientConfig(
                server=relay.address,
                state_dir=str(tmp_path / f"dev{i}"),
                task="intents",
                partition=i,
                num_partitions=10,
                allow_plaintext=True,
                max_wait_ms=2000,
                max_backoff=1.0,
            )
            stop = threading.Event()
            client = _Recording(config, data_source(config).load(), stop)
            thread = threading.Thread(target=client.run, daemon=True)
            thread.start()
            devices.append((client, thread, stop))
        assert server.coordinator.wait_finished(timeout=300)
    finally:
        for client, thread, stop in devices:
            stop.set()
            thread.join(timeout=30)
            client.close()
        relay.close()
    rounds = server.store.list_rounds(server.config.model)
    assert [r.status for r in rounds] == ["completed", "completed"]
    last = max(rounds, key=lambda r: r.number)
    reports = [p.metrics for p in server.store.round_participants(last.id)]
    assert len(reports) == 3 and all(m and m["heldout_examples"] > 0 for m in reports)
    personal = np.mean([m["heldout_personal_accuracy"] for m in reports])
    global_ = np.mean([m["heldout_global_accuracy"] for m in reports])
    assert personal > global_
    sent = bytes(relay.sent)
    spec = FastText()
    shapes = {n: tuple(spec.state_dict()[n].shape) for n in personal_names(spec)}
    for client, _, _ in devices:
        assert len(client.uploads) == 2
        # Control: what the device uploads does appear in its bytes on the wire.
        assert to_wire(client.uploads[-1])[:32] in sent
        head = client.personal.load(server.config.model, shapes)
        assert set(head) == set(shapes)
        weights = head["head.weight"].astype("<f4").tobytes()
        for offset in range(0, len(weights) - 32, 4 * 97):
            assert weights[offset : offset + 32] not in sent
        path = client.personal.path(server.config.model)
        assert path.exists() and not path.read_bytes().startswith(b"PK")
