"""Model version control over the server's store: history, rollback, compare, tags, retention."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.models import ModelSpec, build_model
from common.tensors import flatten_state_dict, to_wire
from server.errors import ErrorKind, FederationError
from server.rounds import RoundConfig, RoundCoordinator
from server.store import Store
from server.strategies import FedAvg
from xeno.model_versioning import ModelVersionControl

SPEC = ModelSpec("mlp", {"input_dim": 4, "hidden": [3], "num_classes": 2})


def module(seed: int) -> torch.nn.Module:
    return build_model(SPEC, seed=seed)


@pytest.fixture
def vcs(db_url: str) -> ModelVersionControl:
    v = ModelVersionControl(db=db_url)
    yield v
    v.close()


def test_create_from_module_state_dict_and_flat(vcs: ModelVersionControl) -> None:
    m1, m2, m3 = module(1), module(2), module(3)
    assert vcs.create_version("clf", m1, "alice", "first", {"accuracy": 0.5}) == 1
    assert vcs.create_version("clf", m2.state_dict(), "bob", "second") == 2
    flat = to_wire(flatten_state_dict(m3.state_dict()))
    assert vcs.create_version("clf", flat, "carol", "third", {"accuracy": 0.7}) == 3
    head = vcs.get_version("clf")
    assert head["version"] == 3 and head["parent_version"] == 2
    assert head["created_by"] == "carol" and head["metrics"] == {"accuracy": 0.7}
    assert vcs.get_version("clf", 1)["parent_version"] is None
    for version, m in ((1, m1), (2, m2), (3, m3)):
        state = vcs.load_state_dict("clf", version)
        for name, tensor in m.state_dict().items():
            assert torch.equal(state[name], tensor)
    assert [v["version"] for v in vcs.list_versions("clf")] == [1, 2, 3]
    # A zoo architecture is recognised: the server could train it.
    assert vcs._versions.spec("clf") == SPEC


def test_identical_weights_share_one_blob(vcs: ModelVersionControl, db_url: str) -> None:
    m = module(1)
    vcs.create_version("clf", m, "a")
    vcs.create_version("clf", m, "a")
    a, b = vcs.list_versions("clf")
    assert a["sha256"] == b["sha256"]


def test_rollback_appends_a_head_with_the_targets_weights(vcs: ModelVersionControl) -> None:
    for seed in (1, 2, 3):
        vcs.create_version("clf", module(seed), "alice", metrics={"accuracy": seed / 10})
    new = vcs.rollback("clf", target_version=1, created_by="oncall", reason="v3 hurts recall")
    assert new == 4
    rec = vcs.get_version("clf")
    assert rec["version"] == 4 and rec["parent_version"] == 3 and rec["rollback_of"] == 1
    assert rec["created_by"] == "oncall" and "v3 hurts recall" in rec["description"]
    assert rec["sha256"] == vcs.get_version("clf", 1)["sha256"]
    assert rec["metrics"] == {"accuracy": 0.1}
    # History is intact.
    assert [v["version"] for v in vcs.list_versions("clf")] == [1, 2, 3, 4]
    assert vcs.get_version("clf", 3)["metrics"] == {"accuracy": 0.3}


def test_compare_reports_metric_changes_and_weight_distance(vcs: ModelVersionControl) -> None:
    a, b = module(1), module(2)
    vcs.create_version("clf", a, "x", metrics={"accuracy": 0.92, "latency": 0.2, "f1": 0.5})
    vcs.create_version("clf", b, "x", metrics={"accuracy": 0.95, "latency": 0.1})
    out = vcs.compare_versions("clf", 1, 2)
    acc = out["metric_changes"]["accuracy"]
    assert acc["v1"] == 0.92 and acc["v2"] == 0.95
    assert acc["change"] == pytest.approx(0.03) and acc["change_percent"] == 3.26
    assert out["metric_changes"]["latency"]["change_percent"] == -50.0
    assert out["only_in_a"] == ["f1"]
    wa = flatten_state_dict(a.state_dict()).astype(np.float64)
    wb = flatten_state_dict(b.state_dict()).astype(np.float64)
    dist = out["weight_distance"]
    assert dist["l2"] == pytest.approx(np.linalg.norm(wb - wa), rel=1e-9)
    cos = wa @ wb / np.linalg.norm(wa) / np.linalg.norm(wb)
    assert dist["cosine_similarity"] == pytest.approx(cos, rel=1e-9)
    assert vcs.compare_versions("clf", 1, 1)["weight_distance"]["l2"] == 0.0


def test_tags_resolve_move_and_show_on_the_record(vcs: ModelVersionControl) -> None:
    for seed in (1, 2, 3):
        vcs.create_version("clf", module(seed), "x")
    vcs.tag_version("clf", "production", 2)
    vcs.tag_version("clf", "staging")  # the head
    assert vcs.get_tags("clf") == {"production": 2, "staging": 3}
    assert vcs.get_version("clf", "production")["version"] == 2
    assert vcs.get_version("clf", 2)["tags"] == ["production"]
    assert vcs.resolve("clf@staging") == ("clf", 3) and vcs.resolve("clf:1") == ("clf", 1)
    vcs.tag_version("clf", "production", 3)
    assert vcs.get_version("clf", 3)["tags"] == ["production", "staging"]
    assert vcs.untag("clf", "staging") == 3
    assert vcs.get_tags("clf") == {"production": 3}


def test_prune_keeps_newest_tagged_and_ab_tested(vcs: ModelVersionControl) -> None:
    for seed in range(1, 9):
        vcs.create_version("clf", module(seed), "x")
    vcs.tag_version("clf", "production", 2)
    store = vcs._store
    assert store.protected_versions("clf") == {8, 2}
    pruned = vcs.prune("clf", keep=3)
    assert pruned == [1, 3, 4, 5]
    assert [v["version"] for v in vcs.list_versions("clf")] == [2, 6, 7, 8]
    assert vcs.load_state_dict("clf", 2)  # its blob is still there
    assert vcs.prune("clf") == []


def test_rounds_appear_in_the_history_as_the_federations(db_url: str) -> None:
    store = Store(db_url)
    store.create_schema()
    vcs = ModelVersionControl(store=store)
    m = module(1)
    vcs.create_version("clf", m, "alice", "seeded by the app")
    clock = [1000.0]
    coord = RoundCoordinator(
        store,
        "clf",
        FedAvg(),
        RoundConfig(min_clients=1, clients_per_round=1, selection_window_s=0),
        clock=lambda: clock[0],
        rng=random.Random(0),
    )
    store.add_device("d", "0" * 64, {})
    task = _one_round_task(coord, clock, "d")
    _upload(coord, "d", task, np.full(task.model.manifest.total_elements, 0.5, np.float32))
    summary = coord.step()
    assert summary is not None and summary.status == "completed" and summary.version == 2
    rec = vcs.get_version("clf")
    assert rec["created_by"] == "federation" and rec["round"] == 1 and rec["parent_version"] == 1
    store.close()


def _one_round_task(coord: RoundCoordinator, clock: list[float], device: str):
    coord.check_in(device, 0)
    coord.step()
    clock[0] += 1
    coord.step()
    task = coord.task_for(device)
    assert task is not None
    return task


def _upload(coord: RoundCoordinator, device: str, task, vector: np.ndarray) -> None:
    manifest = task.model.manifest
    session = coord.begin_upload(
        device, task.round_id, task.model_version, manifest, manifest.total_bytes, 1
    )
    session.add_chunk(to_wire(vector))
    session.commit()


def test_rollback_on_a_running_coordinator(db_url: str) -> None:
    """A round in flight fails as superseded; the next round trains the rolled-back weights."""
    store = Store(db_url)
    store.create_schema()
    vcs = ModelVersionControl(store=store)
    for seed in (1, 2):
        vcs.create_version("clf", module(seed), "alice")
    v1 = flatten_state_dict(module(1).state_dict())
    clock = [1000.0]
    coord = RoundCoordinator(
        store,
        "clf",
        FedAvg(),
        RoundConfig(min_clients=1, clients_per_round=1, selection_window_s=0),
        clock=lambda: clock[0],
        rng=random.Random(0),
    )
    store.add_device("d", "0" * 64, {})
    task = _one_round_task(coord, clock, "d")
    assert task.model_version == 2
    assert vcs.rollback("clf", 1, "oncall", "bad push") == 3
    _upload(coord, "d", task, np.ones(v1.size, np.float32))
    summary = coord.step()
    assert summary is not None and summary.status == "failed"
    assert "superseded" in summary.failure_reason
    assert vcs.get_version("clf")["version"] == 3  # nothing landed on the old head
    task = _one_round_task(coord, clock, "d")
    assert task.model_version == 3
    _, served, _ = coord.model_for_download("d", task.round_id)
    np.testing.assert_array_equal(np.frombuffer(served, np.float32), v1)
    _upload(coord, "d", task, np.ones(v1.size, np.float32))
    summary = coord.step()
    assert summary is not None and summary.status == "completed" and summary.version == 4
    np.testing.assert_allclose(store.load_version("clf", 4), v1 + 1, rtol=1e-6)
    store.close()


@pytest.mark.parametrize(
    ("call", "kind", "needle"),
    [
        (lambda v: v.get_version("nope"), ErrorKind.NOT_FOUND, "no model 'nope'; models: clf"),
        (
            lambda v: v.get_version("clf", 9),
            ErrorKind.NOT_FOUND,
            "has no version 9; it has versions 1-2",
        ),
        (lambda v: v.get_version("clf", "prod"), ErrorKind.NOT_FOUND, "no tag 'prod'"),
        (lambda v: v.rollback("clf", 7), ErrorKind.NOT_FOUND, "has no version 7"),
        (lambda v: v.rollback("clf", 0), ErrorKind.INVALID_ARGUMENT, "version number >= 1"),
        (lambda v: v.rollback("clf", 2), ErrorKind.FAILED_PRECONDITION, "already the head"),
        (lambda v: v.rollback("nope", 1), ErrorKind.NOT_FOUND, "no model 'nope'"),
        (lambda v: v.compare_versions("clf", 1, 5), ErrorKind.NOT_FOUND, "no version 5"),
        (lambda v: v.tag_version("clf", "production", 5), ErrorKind.NOT_FOUND, "no version 5"),
        (lambda v: v.tag_version("clf", "7up", 1), ErrorKind.INVALID_ARGUMENT, "bad tag"),
        (lambda v: v.prune("clf", keep=0), ErrorKind.INVALID_ARGUMENT, "keep must be"),
        (lambda v: v.prune("nope"), ErrorKind.NOT_FOUND, "no model 'nope'"),
        (
            lambda v: v.create_version("clf", module(1), "x", metrics={"accuracy": float("nan")}),
            ErrorKind.INVALID_ARGUMENT,
            "not finite",
        ),
        (
            lambda v: v.create_version("new", np.zeros(3, np.float32), "x"),
            ErrorKind.NOT_FOUND,
            "flat weights carry no tensor layout",
        ),
        (
            lambda v: v.create_version("clf", build_model(ModelSpec("mlp", {})), "x"),
            ErrorKind.INVALID_ARGUMENT,
            "do not match model 'clf'",
        ),
        (
            lambda v: v.create_version("clf", "weights", "x"),
            ErrorKind.INVALID_ARGUMENT,
            "model_data",
        ),
        (
            lambda v: v.create_version("clf", module(1), " "),
            ErrorKind.INVALID_ARGUMENT,
            "created_by",
        ),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    vcs: ModelVersionControl, call, kind: ErrorKind, needle: str
) -> None:
    vcs.create_version("clf", module(1), "x")
    vcs.create_version("clf", module(2), "x")
    before = (vcs.list_versions("clf"), vcs.get_tags("clf"))
    with pytest.raises(FederationError) as info:
        call(vcs)
    assert info.value.kind is kind and needle in str(info.value), str(info.value)
    assert (vcs.list_versions("clf"), vcs.get_tags("clf")) == before
    assert [m.name for m in vcs._store.list_models()] == ["clf"]


def test_migration_0004_backfills_who_made_each_version(db_url: str) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import text

    store = Store(db_url)
    store.migrate("0003")
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO blobs (sha256, size, data) VALUES (:d, 4, :b)"),
            {"d": "a" * 64, "b": b"\x00\x00\x00\x00"},
        )
        conn.execute(
            text(
                "INSERT INTO models (id, name, architecture, config, manifest, num_parameters, "
                "strategy, current_version, created_at) VALUES (1, 'old', 'mlp', '{}', '[]', 1, "
                "'fedavg', 2, :now)"
            ),
            {"now": now},
        )
        for version, round_id in ((1, None), (2, "r1")):
            conn.execute(
                text(
                    "INSERT INTO model_versions (model_id, version, parent_version, blob_sha256, "
                    "round_id, metrics, description, created_at) VALUES (1, :v, NULL, :d, :r, "
                    "'{}', '', :now)"
                ),
                {"v": version, "d": "a" * 64, "r": round_id, "now": now},
            )
    store.create_schema()
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT version, created_by FROM model_versions ORDER BY version")
        ).all()
    assert [tuple(r) for r in rows] == [(1, "server"), (2, "federation")]
    store.close()
