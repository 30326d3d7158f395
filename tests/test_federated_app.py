"""The seed's in-process federation: real rounds (coordinator, SecAgg+, DP) over the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import ModelSpec, build_model
from common.tensors import flatten_state_dict
from server.errors import ErrorKind, FederationError
from xeno.federated_learning import FederationSettings, PersonalizedModelManager
from xeno.model_versioning import ModelVersionControl

SPEC = ModelSpec("mlp", {"input_dim": 6, "hidden": [5], "num_classes": 3})


def user_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def manager(tmp_path) -> PersonalizedModelManager:
    m = PersonalizedModelManager(
        db=f"sqlite:///{tmp_path}/fl.db",
        home=tmp_path,
        settings=FederationSettings(local_epochs=2, learning_rate=0.05, min_secagg_cohort=2),
    )
    yield m
    m.close()


def test_a_round_is_the_weighted_mean_of_the_users_updates(
    manager: PersonalizedModelManager,
) -> None:
    base = build_model(SPEC, seed=0)
    model_id = manager.create_model("m", base, privacy_enabled=False)
    sizes = {"ann": 10, "bob": 30, "cyd": 20}
    for i, (user, n) in enumerate(sizes.items()):
        out = manager.train_local_model(user, model_id, user_data(i, n))
        assert out["success"] and out["pending_updates"] == i + 1 and not out["privacy_enabled"]
    trainer = manager._trainers[model_id]
    deltas = {u: p.result.delta.astype(np.float64) for u, p in trainer._pending.items()}
    result = manager.update_global_model(model_id, min_updates=3)
    assert result == {
        "success": True,
        "new_version": 2,
        "round": 1,
        "model_updated": True,
        "participants": 3,
        "privacy_enabled": False,
    }
    expected = flatten_state_dict(base.state_dict()) + sum(
        sizes[u] * deltas[u] for u in sizes
    ) / sum(sizes.values())
    got = flatten_state_dict(manager.get_global_model(model_id))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # fixed-point rounding only
    rec = ModelVersionControl(store=manager._store).get_version(model_id)
    assert rec["created_by"] == "federation" and rec["round"] == 1
    [rnd] = manager._store.list_rounds(model_id)
    assert rnd.metrics["secagg"] == 1.0  # the server saw only the masked sum
    assert trainer.pending_updates == 0


def test_privacy_enabled_runs_distributed_dp_and_fills_the_ledger(
    manager: PersonalizedModelManager,
) -> None:
    model_id = manager.create_model("m", build_model(SPEC, seed=0).state_dict(), True)
    for i, user in enumerate(["a", "b", "c"]):
        assert manager.train_local_model(user, model_id, user_data(i, 12))["privacy_enabled"]
    result = manager.update_global_model(model_id, min_updates=3)
    assert result["success"] and result["new_version"] == 2
    [entry] = manager._store.privacy_ledger(model_id)
    assert entry.level == "user" and entry.mechanism.startswith("skellam") and entry.cohort == 3
    assert entry.epsilon > 0


def test_default_intent_model_trains_on_the_trainers_examples(
    manager: PersonalizedModelManager,
) -> None:
    model_id = manager.create_model("intents", None, privacy_enabled=False)
    examples = [
        {"input_text": "Schedule a meeting with team", "context": {"intent": "schedule_meeting"}},
        {"input_text": "will it rain tomorrow", "context": {"intent": "weather"}},
    ]
    for user in ("u1", "u2"):
        assert manager.train_local_model(user, model_id, examples)["examples"] == 2
    assert manager.update_global_model(model_id, min_updates=2)["new_version"] == 2


BAD = [
    (
        lambda m: m.train_local_model("u", "nope", user_data(0, 4)),
        ErrorKind.NOT_FOUND,
        "create_model first",
    ),
    (lambda m: m.update_global_model("nope", 2), ErrorKind.NOT_FOUND, "no federated model 'nope'"),
    (lambda m: m.update_global_model("m", 0), ErrorKind.INVALID_ARGUMENT, "min_updates"),
    (lambda m: m.train_local_model("u", "m", []), ErrorKind.INVALID_ARGUMENT, "non-empty list"),
    (
        lambda m: m.train_local_model("", "m", user_data(0, 4)),
        ErrorKind.INVALID_ARGUMENT,
        "user_id",
    ),
    (
        lambda m: m.train_local_model("u", "m", [{"input_text": "hi", "context": {"intent": "x"}}]),
        ErrorKind.INVALID_ARGUMENT,
        "takes (inputs, labels) tensors",
    ),
    (
        lambda m: m.train_local_model("u", "m", (torch.zeros(3, 6), torch.zeros(2))),
        ErrorKind.INVALID_ARGUMENT,
        "same, non-zero, length",
    ),
    (lambda m: m.create_model("m", torch.nn.Linear(2, 2)), ErrorKind.INVALID_ARGUMENT, "model-zoo"),
]


@pytest.mark.parametrize(("call", "kind", "needle"), BAD)
def test_bad_input_is_refused(manager: PersonalizedModelManager, call, kind, needle: str) -> None:
    manager.create_model("m", build_model(SPEC, seed=0), privacy_enabled=False)
    manager.train_local_model("keep", "m", user_data(0, 4))
    with pytest.raises(FederationError) as info:
        call(manager)
    assert info.value.kind is kind and needle in str(info.value), str(info.value)
    assert manager._trainers["m"].pending_updates == 1
    assert [v.version for v in manager._store.list_versions("m")] == [1]


def test_too_few_updates_is_a_clear_refusal(manager: PersonalizedModelManager) -> None:
    model_id = manager.create_model("m", build_model(SPEC, seed=0), privacy_enabled=False)
    manager.train_local_model("a", model_id, user_data(0, 4))
    out = manager.update_global_model(model_id, min_updates=5)
    assert out["success"] is False and out["model_updated"] is False
    assert "1 user update(s) pending, 5 needed" in out["error"]
    out = manager.update_global_model(model_id, min_updates=1)
    assert "secure aggregation here needs at least 2 users" in out["error"]
    assert [v.version for v in manager._store.list_versions(model_id)] == [1]


def test_users_register_once_and_keep_their_identity_across_rounds(
    manager: PersonalizedModelManager,
) -> None:
    model_id = manager.create_model("m", build_model(SPEC, seed=0), privacy_enabled=False)
    store = manager._store
    ids_per_round = []
    for rnd in range(3):
        for i, user in enumerate(["ann", "bob", "cyd"]):
            manager.train_local_model(user, model_id, user_data(10 * rnd + i, 12))
        result = manager.update_global_model(model_id, min_updates=3)
        assert result["success"] and result["round"] == rnd + 1, result
        [last] = [r for r in store.list_rounds(model_id) if r.number == rnd + 1]
        ids_per_round.append({p.device_id for p in store.round_participants(last.id)})
    records = store.device_records()
    # Three users, three registrations, none revoked: each round's devices are the same.
    assert len(records) == 3 and all(r.revoked_at is None for r in records)
    assert (
        ids_per_round[0] == ids_per_round[1] == ids_per_round[2] == {r.device_id for r in records}
    )
