"""`xeno-fl user export|delete|consent|retention`, and consent gating of federated training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.assistant import consent
from client.assistant.consent import ConsentRequiredError, Scope
from client.assistant.store import UserStore
from xeno.cli import main
from xeno.model_finetuning import ContextualMemory, CustomModelTrainer


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XENO_HOME", str(tmp_path))
    monkeypatch.setenv("XENO_DEVICE_KEY", "ab" * 32)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["user", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_consent_grant_revoke_and_history(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "consent", "ana", "--grant", "federated_training")
    assert code == 0
    assert [(h["scope"], h["granted"]) for h in json.loads(out)] == [("federated_training", True)]
    code, out, _ = run(capsys, "consent", "ana", "--revoke", "federated_training")
    history = json.loads(out)
    assert [h["granted"] for h in history] == [True, False]
    assert history[0]["timestamp"] <= history[1]["timestamp"]
    with UserStore("ana") as store:
        assert not consent.given(store, Scope.FEDERATED_TRAINING)
    with pytest.raises(SystemExit):
        main(["user", "consent", "ana", "--grant", "selling_my_data"])


def test_retention_set_and_show(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "retention", "ben")[1].strip() == '{"retention_days": 365.0}'
    assert json.loads(run(capsys, "retention", "ben", "--days", "30")[1]) == {
        "retention_days": 30.0
    }
    code, _, err = run(capsys, "retention", "ben", "--days", "-1")
    assert code == 2 and "retention must be between" in err
    assert json.loads(run(capsys, "retention", "ben")[1]) == {"retention_days": 30.0}


def test_export_then_delete(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    memory = ContextualMemory(user_id="cy")
    memory.store_fact("work", "role", "Engineer")
    memory.close()
    out_file = home / "cy.json"
    code, out, _ = run(capsys, "export", "cy", "--out", str(out_file))
    assert code == 0
    archive = json.loads(out_file.read_text())
    assert archive["store"]["facts"][0]["value"] == '"Engineer"'
    code, _, err = run(capsys, "delete", "cy")
    assert code == 2 and "--yes" in err
    assert (home / "users" / "cy").exists()
    code, out, _ = run(capsys, "delete", "cy", "--yes")
    assert json.loads(out) == {"user_id": "cy", "store_deleted": True}
    assert not (home / "users" / "cy").exists()


def test_wrong_key_is_a_clear_cli_error(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "retention", "dee")
    monkeypatch.setenv("XENO_DEVICE_KEY", "cd" * 32)
    code, _, err = run(capsys, "export", "dee")
    assert code == 2
    assert "does not open" in err


def test_federated_training_never_reads_examples_without_consent(home: Path) -> None:
    trainer = CustomModelTrainer(user_id="eve")
    trainer.add_training_example("book a table", "ok", {"intent": "restaurant"}, 4)
    store = trainer.store
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    with pytest.raises(ConsentRequiredError, match="has not consented"):
        consent.federated_examples(store)
    assert statements, "the trace saw nothing: the check would prove nothing"
    assert not any("training_examples" in s for s in statements)
    consent.record(store, Scope.FEDERATED_TRAINING, True)
    assert consent.federated_examples(store) == [("book a table", "restaurant")]
    consent.record(store, Scope.FEDERATED_TRAINING, False)
    with pytest.raises(ConsentRequiredError):
        consent.federated_examples(store)
    trainer.close()


def test_federated_shard_is_consented_and_holds_only_the_shared_intents(home: Path) -> None:
    from client.assistant.federated import federated_shard
    from common.text import TextFeatures

    trainer = CustomModelTrainer(user_id="fay")
    trainer.add_training_example("book a table for two", "ok", {"intent": "restaurant"}, 4)
    trainer.add_training_example("what is my balance", "ok", {"intent": "balance"}, 4)
    trainer.add_training_example("hum a tune", "ok", {"intent": "my_own_intent"}, 4)
    with pytest.raises(ConsentRequiredError):
        federated_shard(trainer.store, ["balance", "restaurant"])
    consent.record(trainer.store, Scope.FEDERATED_TRAINING, True)
    shard = federated_shard(trainer.store, ["balance", "restaurant"])
    # Only the shared model's intents, as label indices.
    assert shard.texts == ("book a table for two", "what is my balance")
    assert shard.labels.tolist() == [1, 0]
    data = shard.featurized(TextFeatures(buckets=1024))
    assert data.x.dtype == np.int64 and data.x.shape[0] == 2
    trainer.close()


def test_export_of_an_unknown_user_creates_nothing(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "export", "nobody")
    assert code == 2 and "no data is kept for user 'nobody'" in err
    assert not (home / "users" / "nobody").exists()
