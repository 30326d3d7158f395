"""Several federated models on one server: the models file, routing, pause/resume, restart.

End-to-end over real gRPC on loopback: a mixed fleet (digits devices and CLINC150 intents
devices) trains two models at once, each version chain checked against an independent
recomputation from what the devices sent; pausing one model stops only its rounds; a
restarted server restores every model with its pause state; bad input is refused with
the right status and changes nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client.runtime import ClientConfig, DeviceClient
from common.certs import Role
from common.pb import admin_pb2, admin_pb2_grpc
from common.pb import federation_pb2 as pb
from server.app import ServerConfig, XenoServer
from server.modelconf import (
    MODEL_KEYS,
    ModelSettings,
    ModelsFileError,
    parse_models_text,
    parse_settings,
)
from server.security import add_admin_token
from server.store import audit_entries
from tests.conftest import FAST_SERVER
from xeno.model_versioning import PerformanceTracker


def wait_until(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout}s")


class SentUpdates:
    """Recorded on the device side: round id -> (update, examples), device -> models trained."""

    def __init__(self) -> None:
        self.by_round: dict[str, list[tuple[np.ndarray, int]]] = {}
        self.models_of: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def install(self, client: Any) -> None:
        send = client._upload
        who = client.config.state_dir

        def recording(task: Any, manifest: Any, delta: Any, num_examples: int, timeout: Any) -> Any:
            result = send(task, manifest, delta, num_examples, timeout)
            with self._lock:
                sent = np.array(delta, dtype=np.float32)
                self.by_round.setdefault(task.round_id, []).append((sent, num_examples))
                self.models_of.setdefault(who, set()).add(task.model_name)
            return result

        client._upload = recording


def assert_chain_is_weighted_means(server: XenoServer, name: str, sent: SentUpdates) -> int:
    """Every completed round of `name`: new version = base + example-weighted mean sent.

    The reference is computed here in float64 from the device-side records.
    """
    completed = 0
    for rnd in server.store.list_rounds(name):
        if rnd.status != "completed":
            continue
        uploads = sent.by_round[rnd.id]
        assert len(uploads) == rnd.participants
        weights = np.array([n for _, n in uploads], dtype=np.float64)
        mean = sum(w * u.astype(np.float64) for w, (u, _) in zip(weights, uploads, strict=True))
        mean = mean / weights.sum()
        new = server.store.load_version(name, rnd.result_version).astype(np.float64)
        old = server.store.load_version(name, rnd.base_version).astype(np.float64)
        np.testing.assert_allclose(new - old, mean, rtol=0, atol=1e-6)
        completed += 1
    return completed


# ---------------------------------------------------------------------- the models file
def test_model_settings_defaults_are_the_server_flags_defaults() -> None:
    flags = ServerConfig()
    defaults = ModelSettings()
    assert {k: getattr(flags, k) for k in MODEL_KEYS} == dataclasses.asdict(defaults)


def test_models_file_sets_each_models_settings_over_the_server_flags() -> None:
    base = ServerConfig(rounds=7, learning_rate=0.1).model_settings()
    text = """
# two models
[models.intents-fasttext]
task = "intents"
strategy = "fedprox"
clients-per-round = 4
paused = true

[models."digits-small"]
hidden = "16"
dp = "central"
secagg = false
dp_noise_multiplier = 1.0
round_deadline = 30
"""
    intents, small = parse_models_text(text, base, "models.toml")
    assert (intents.name, intents.line, intents.paused) == ("intents-fasttext", 3, True)
    assert intents.settings.task == "intents" and intents.settings.strategy == "fedprox"
    assert intents.settings.clients_per_round == 4
    assert intents.settings.rounds == 7 and intents.settings.learning_rate == 0.1  # flags
    assert (small.name, small.line, small.paused) == ("digits-small", 9, False)
    assert small.settings.round_deadline == 30.0 and isinstance(
        small.settings.round_deadline, float
    )
    policy = small.settings.user_dp_policy()
    assert policy is not None and policy.noise_multiplier == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.a]\ntask = 'digits'\nrounds = \n", r"models\.toml: not valid TOML: .*line 3"),
        (
            "[models.a]\ntask = 'digits'\n\n[models.b]\nclients_per_rnd = 3\n",
            r"^models\.toml:5: model 'b': unknown key 'clients_per_rnd' "
            r"\(did you mean 'clients_per_round'\?\)$",
        ),
        (
            "[models.a]\nrounds = 'ten'\n",
            r"^models\.toml:2: model 'a': rounds must be an integer, got 'ten'$",
        ),
        ("[models.a]\nsecagg = 1\n", r"^models\.toml:2: model 'a': secagg must be a boolean"),
        ("[models.a]\ntask = 'sports'\n", r"^models\.toml:1: model 'a': unknown task 'sports'"),
        (
            "\n[models.a]\nstrategy = 'median'\n",
            r"^models\.toml:2: model 'a': strategy 'median' needs each device's update",
        ),
        ("[models.a]\nmin_clients = 5\nclients_per_round = 3\n", r"^models\.toml:1: .*min_clients"),
        ("[models.'bad name']\n", r"^models\.toml:1: model 'bad name': invalid model name"),
        ("rounds = 3\n", r"^models\.toml: unknown top-level key 'rounds'"),
        ("", r"^models\.toml: no models"),
        ("[models]\na = 3\n", r"^models\.toml:1: models\.a must be a table"),
    ],
)
def test_a_bad_models_file_is_refused_naming_the_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ModelsFileError, match=message):
        parse_models_text(text, ModelSettings(), "models.toml")


def test_a_bad_models_file_stops_the_server_before_anything_is_created(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text("[models.intents]\ntask = 'intents'\nlearning_rat = 5.0\n")
    db = tmp_path / "never.db"
    config = dataclasses.replace(FAST_SERVER, db=f"sqlite:///{db}", models=str(models))
    with pytest.raises(ModelsFileError, match=r"models\.toml:3: model 'intents': unknown key"):
        XenoServer(config)
    assert not db.exists()


def test_settings_of_an_admin_create_are_checked_like_the_file() -> None:
    table = parse_settings("m", "task = 'intents'\nrounds = 3\n", ModelSettings())
    assert table.settings.task == "intents" and table.settings.rounds == 3
    with pytest.raises(ModelsFileError, match=r"^settings:2: model 'm': unknown key 'roundz'"):
        parse_settings("m", "task = 'intents'\nroundz = 3\n", ModelSettings())
    with pytest.raises(ModelsFileError, match=r"^settings: model 'm': unknown --dp 'maybe'"):
        parse_settings("m", "dp = 'maybe'\n", ModelSettings())


# ---------------------------------------------------------------------- over gRPC
def _admin(server: XenoServer, token: str = "") -> tuple[admin_pb2_grpc.AdminStub, Any]:
    channel = grpc.insecure_channel(server.address)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return admin_pb2_grpc.AdminStub(channel), md


def _models(stub: admin_pb2_grpc.AdminStub, md: Any) -> dict[str, admin_pb2.ModelInfo]:
    return {m.name: m for m in stub.ListModels(admin_pb2.ListModelsRequest(), metadata=md).models}


def test_a_mixed_fleet_trains_two_models_at_once(
    server_factory: Any, device_threads: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        """
[models.intents-fasttext]
task = "intents"
strategy = "fedprox"
learning_rate = 5.0
min_clients = 2
clients_per_round = 2
eval_data = "none"
"""
    )
    server = server_factory(rounds=2, min_clients=3, models=str(models))
    sent = SentUpdates()
    digits = device_threads(server, 3, before_start=sent.install)
    intents = device_threads(
        server, 2, num_partitions=10, task="intents", before_start=sent.install
    )
    text_model = server.models.get("intents-fasttext").coordinator
    assert text_model.wait_finished(timeout=240) and server.coordinator.wait_finished(timeout=120)
    # Each device trained only the model of its data.
    for d in digits:
        assert sent.models_of[d.client.config.state_dir] == {"digits-mlp"}
    for d in intents:
        assert sent.models_of[d.client.config.state_dir] == {"intents-fasttext"}
    # Each chain: versions 1, 2, 3, each the weighted mean its own devices sent.
    for name in ("digits-mlp", "intents-fasttext"):
        assert [v.version for v in server.store.list_versions(name)] == [1, 2, 3]
        assert assert_chain_is_weighted_means(server, name, sent) == 2
    digit_rounds = server.store.list_rounds("digits-mlp")
    text_rounds = server.store.list_rounds("intents-fasttext")
    assert [r.participants for r in digit_rounds] == [3, 3]
    assert [r.participants for r in text_rounds] == [2, 2]
    assert {r.id for r in digit_rounds}.isdisjoint({r.id for r in text_rounds})
    # The rounds ran at the same time, not one model after the other.
    assert min(r.started_at for r in text_rounds) < max(r.started_at for r in digit_rounds)
    # Per-model strategies, settings and metrics labels.
    stub, md = _admin(server)
    listed = _models(stub, md)
    assert listed["digits-mlp"].strategy == "fedavg" and listed["digits-mlp"].task == "digits"
    assert listed["intents-fasttext"].strategy == "fedprox"
    assert listed["intents-fasttext"].source == "file" and listed["intents-fasttext"].training
    registry = server.metrics.registry
    for name in ("digits-mlp", "intents-fasttext"):
        assert registry.get_sample_value("xeno_rounds_completed_total", {"model": name}) == 2


def _pinned_fleet(server: XenoServer, device_threads: Any, names: tuple[str, ...]) -> None:
    """Two devices per model, each checking in for that model only (client --models)."""
    for name in names:
        device_threads(server, 2, models=name)


def _completed(server: XenoServer, name: str) -> int:
    return server.store.count_completed_rounds(name)


def test_pause_stops_one_models_rounds_and_resume_restarts_them(
    server_factory: Any, device_threads: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text("[models.digits-b]\nhidden = '16'\n")
    server = server_factory(
        rounds=0, min_clients=2, clients_per_round=2, selection_window=0.1, models=str(models)
    )
    _pinned_fleet(server, device_threads, ("digits-mlp", "digits-b"))
    wait_until(lambda: _completed(server, "digits-b") >= 1, 120, "a digits-b round")
    stub, md = _admin(server)
    info = stub.PauseModel(admin_pb2.PauseModelRequest(name="digits-b"), metadata=md)
    assert info.paused and info.name == "digits-b"
    b = server.models.get("digits-b").coordinator
    wait_until(lambda: b.health_problem() == "" and b._round is None, 60, "its open round")
    frozen = _completed(server, "digits-b")
    other = _completed(server, "digits-mlp")
    wait_until(lambda: _completed(server, "digits-mlp") >= other + 2, 120, "two more rounds")
    assert _completed(server, "digits-b") == frozen
    assert b._round is None
    assert _models(stub, md)["digits-b"].paused
    stub.ResumeModel(admin_pb2.ResumeModelRequest(name="digits-b"), metadata=md)
    wait_until(lambda: _completed(server, "digits-b") >= frozen + 1, 120, "rounds after resume")
    assert not _models(stub, md)["digits-b"].paused
    # The audit log names who paused and resumed which model.
    actions = [e.action for e in audit_entries(server.store)]
    assert actions.count("model.paused") == 1 and actions.count("model.resumed") == 1


def test_a_restart_restores_every_model_and_its_pause_state(
    tmp_path: Path, device_threads: Any, raw_device: Any
) -> None:
    models = tmp_path / "models.toml"
    models.write_text("[models.digits-b]\nhidden = '16'\nrounds = 5\n")
    config = dataclasses.replace(
        FAST_SERVER, db=f"sqlite:///{tmp_path}/xeno.db", models=str(models), rounds=0
    )
    server = XenoServer(config).start()
    try:
        stub, md = _admin(server)
        created = stub.CreateModel(
            admin_pb2.CreateModelRequest(
                name="digits-c", settings_toml="hidden = '8'\nclients_per_round = 2\n"
            ),
            metadata=md,
        )
        assert created.training and created.source == "admin" and not created.paused
        # A model created while serving trains at once.
        fleet = device_threads(server, 2, models="digits-c")
        wait_until(lambda: _completed(server, "digits-c") >= 1, 120, "a round of the new model")
        stub.PauseModel(admin_pb2.PauseModelRequest(name="digits-c"), metadata=md)
        for d in fleet:
            d.halt()
        before = _models(stub, md)
    finally:
        server.stop(grace=0.5)
    # Restarted without the models file: both models come back from their definitions.
    server = XenoServer(dataclasses.replace(config, models="")).start()
    try:
        stub, md = _admin(server)
        after = _models(stub, md)
        assert set(after) == {"digits-mlp", "digits-b", "digits-c"}
        for name in after:
            assert after[name].training and after[name].paused == before[name].paused
            assert after[name].settings_json == before[name].settings_json
        assert after["digits-c"].paused and not after["digits-b"].paused
        assert server.models.get("digits-c").coordinator.config.clients_per_round == 2
        assert server.models.get("digits-b").coordinator.config.rounds == 5
        device = raw_device(server)
        answer = device.stub.CheckIn(
            pb.CheckInRequest(models=["digits-c"], max_wait_ms=0), metadata=device.md, timeout=10
        )
        assert answer.wait.reason == "model digits-c is paused"
        device_threads(server, 2, models="digits-c")
        time.sleep(1.0)
        assert server.models.get("digits-c").coordinator._round is None  # paused: no round
        done = _completed(server, "digits-c")
        stub.ResumeModel(admin_pb2.ResumeModelRequest(name="digits-c"), metadata=md)
        wait_until(lambda: _completed(server, "digits-c") > done, 120, "a digits-c round")
    finally:
        server.stop(grace=0.5)


def test_bad_model_requests_are_refused_and_change_nothing(
    server_factory: Any, raw_device: Any
) -> None:
    server = server_factory(eval_data="none")
    stub, md = _admin(server)
    stub.CreateModel(admin_pb2.CreateModelRequest(name="digits-b"), metadata=md)
    listed = _models(stub, md)
    audit = len(audit_entries(server.store))

    def refused(call: Any, request: Any, code: grpc.StatusCode, details: str) -> None:
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=md)
        assert err.value.code() == code
        assert details in err.value.details(), err.value.details()

    refused(
        stub.CreateModel,
        admin_pb2.CreateModelRequest(name="digits-b"),
        grpc.StatusCode.ALREADY_EXISTS,
        "a model named 'digits-b' already exists",
    )
    refused(
        stub.CreateModel,
        admin_pb2.CreateModelRequest(name="x", settings_toml="task = 'digits'\nclients = 3\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "settings:2: model 'x': unknown key 'clients'",
    )
    refused(
        stub.CreateModel,
        admin_pb2.CreateModelRequest(name="x", settings_toml="rounds = [1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "settings: not valid TOML",
    )
    refused(
        stub.CreateModel,
        admin_pb2.CreateModelRequest(name="no/slash"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid model name 'no/slash'",
    )
    refused(
        stub.PauseModel,
        admin_pb2.PauseModelRequest(name="nope"),
        grpc.StatusCode.NOT_FOUND,
        "no model 'nope' is trained here; models: digits-b, digits-mlp",
    )
    refused(
        stub.ResumeModel,
        admin_pb2.ResumeModelRequest(name="digits-b"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "model 'digits-b' is already running",
    )
    assert _models(stub, md) == listed
    assert len(audit_entries(server.store)) == audit
    assert {m.name for m in server.store.list_models()} == {"digits-mlp", "digits-b"}
    # A device naming a model or data kind the server does not know.
    device = raw_device(server)
    for request, code, details in (
        (pb.CheckInRequest(models=["nope"]), grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
        (pb.CheckInRequest(tasks=["sports"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown task"),
        (
            pb.CheckInRequest(tasks=["intents"], models=["digits-b"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model 'digits-b' trains on digits data and this device holds intents",
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            device.stub.CheckIn(request, metadata=device.md, timeout=10)
        assert err.value.code() == code and details in err.value.details()
    # A device of a kind no model trains waits, and hears why.
    answer = device.stub.CheckIn(
        pb.CheckInRequest(tasks=["intents"], max_wait_ms=0), metadata=device.md, timeout=10
    )
    assert answer.wait.reason == "no model on this server trains on this device's data"


def test_model_commands_need_the_operator_role(server_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "admin.tokens"
    viewer = add_admin_token(path, "vera", Role.VIEWER)
    operator = add_admin_token(path, "otto", Role.OPERATOR)
    server = server_factory(admin_token_file=str(path), eval_data="none")
    stub, md = _admin(server, viewer)
    assert set(_models(stub, md)) == {"digits-mlp"}
    for call, request in (
        (stub.CreateModel, admin_pb2.CreateModelRequest(name="b")),
        (stub.PauseModel, admin_pb2.PauseModelRequest(name="digits-mlp")),
        (stub.ResumeModel, admin_pb2.ResumeModelRequest(name="digits-mlp")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not server.coordinator.paused and set(_models(stub, md)) == {"digits-mlp"}
    stub, md = _admin(server, operator)
    stub.CreateModel(admin_pb2.CreateModelRequest(name="b"), metadata=md)
    stub.PauseModel(admin_pb2.PauseModelRequest(name="digits-mlp"), metadata=md)
    assert server.coordinator.paused
    entries = [e for e in audit_entries(server.store) if e.action == "model.paused"]
    assert [e.actor for e in entries] == ["admin otto (operator)"]


@pytest.mark.slow
def test_admin_models_commands(server_factory: Any) -> None:
    import json
    import subprocess

    from tests.test_cli import XENO, _env

    server = server_factory(eval_data="none")

    def admin(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*XENO, "admin", "--server", server.address, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )

    out = admin(
        "models", "create", "intents-b", "--task", "intents", "--set", "rounds=3",
        "--set", "strategy=fedadam", "--set", "eval_data=none",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "model intents-b: version 1, task intents, training"
    out = admin("models", "pause", "intents-b")
    assert out.stdout.strip() == "model intents-b: version 1, task intents, paused"
    out = admin("--json", "models", "list")
    listed = {m["name"]: m for m in json.loads(out.stdout)["models"]}
    assert listed["intents-b"]["paused"] and listed["intents-b"]["strategy"] == "fedadam"
    assert json.loads(listed["intents-b"]["settings_json"])["rounds"] == 3
    assert "paused" not in listed["digits-mlp"]  # proto3 JSON leaves false out
    out = admin("models", "pause", "intents-b")
    assert out.returncode != 0
    assert "FAILED_PRECONDITION: model 'intents-b' is already paused" in out.stderr
    out = admin("models", "create", "c", "--set", "roundz=3")
    assert out.returncode != 0 and "settings:1: model 'c': unknown key 'roundz'" in out.stderr
    assert admin("models", "resume", "intents-b").returncode == 0
    assert not server.models.get("intents-b").paused
    assert "intents-b" in admin("models").stdout  # `models` alone lists them
    out = admin("models", "delete", "intents-b")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "model intents-b: version 1, task -, not trained"
    out = admin("models", "delete", "digits-mlp")
    assert out.returncode != 0 and "FAILED_PRECONDITION: model 'digits-mlp' is the" in out.stderr
    assert "history is never rewritten" in admin("models", "--help").stdout


def test_each_model_has_its_own_dp_policy_and_privacy_ledger(
    server_factory: Any, device_threads: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        """
[models.digits-dp]
hidden = "16"
dp = "central"
dp_noise_multiplier = 1.5
dp_clip_norm = 2.0
privacy_budget = 40.0
min_clients = 2
clients_per_round = 2
"""
    )
    server = server_factory(
        rounds=2, min_clients=2, clients_per_round=2, selection_window=0.1, models=str(models)
    )
    _pinned_fleet(server, device_threads, ("digits-mlp", "digits-dp"))
    dp = server.models.get("digits-dp").coordinator
    assert dp.wait_finished(timeout=120) and server.coordinator.wait_finished(timeout=120)
    stub, md = _admin(server)

    def report(name: str) -> admin_pb2.PrivacyReport:
        return stub.GetPrivacyReport(
            admin_pb2.GetPrivacyReportRequest(model_name=name), metadata=md
        )

    private, plain = report("digits-dp"), report("digits-mlp")
    assert [e.round_number for e in private.entries] == [1, 2]
    assert all(e.noise_multiplier == 1.5 and e.clip_norm == 2.0 for e in private.entries)
    assert private.budget == 40.0 and private.epsilon > 0
    assert list(plain.entries) == [] and plain.budget == 0.0 and plain.status == "none"
    # Each ledger is the model's own: the DP model's tasks carried its policy, the other's none.
    assert server.models.get("digits-mlp").coordinator.config.user_dp is None
    epsilon = server.metrics.registry.get_sample_value(
        "xeno_privacy_epsilon_spent", {"model": "digits-dp"}
    )
    assert epsilon == pytest.approx(private.epsilon)
    assert (
        server.metrics.registry.get_sample_value(
            "xeno_privacy_epsilon_spent", {"model": "digits-mlp"}
        )
        == 0.0
    )


def test_the_store_keeps_definitions_and_pause_state(db_url: str) -> None:
    import numpy as np

    from common.modelspec import ModelSpec
    from common.tensors import Manifest
    from server.store import ModelDefinition, ModelExistsError, Store

    store = Store(db_url)
    store.create_schema()
    try:
        manifest = Manifest.from_json([{"name": "w", "shape": [2]}])
        spec = ModelSpec("mlp", {"input_dim": 2, "hidden": [], "num_classes": 2})
        first = ModelDefinition("a", "digits", {"rounds": 3}, paused=True, source="file")
        store.create_model("a", spec, manifest, "fedavg", np.zeros(2, np.float32), first)
        store.create_model("b", spec, manifest, "fedavg", np.zeros(2, np.float32))
        with pytest.raises(ModelExistsError):
            store.create_model("a", spec, manifest, "fedavg", np.zeros(2, np.float32), first)
        assert store.model_definitions() == [first]
        # New settings keep the stored pause state; unchanged ones write nothing.
        audit = len(audit_entries(store))
        stored = store.define_model(
            dataclasses.replace(first, settings={"rounds": 4}, paused=False)
        )
        assert stored.paused and stored.settings == {"rounds": 4}
        assert store.define_model(stored) == stored
        assert store.set_model_paused("a", True) is False
        assert store.set_model_paused("a", False) is True
        b = store.define_model(ModelDefinition("b", "digits", {}, source="admin"))
        assert [d.name for d in store.model_definitions()] == ["a", "b"] and not b.paused
        actions = [e.action for e in audit_entries(store)[audit:]]
        assert actions == ["model.redefined", "model.resumed", "model.defined"]
        with pytest.raises(KeyError):
            store.set_model_paused("nope", True)
        with pytest.raises(KeyError):
            store.define_model(ModelDefinition("nope", "digits", {}))
    finally:
        store.close()


def test_concurrent_creates_of_one_name_make_one_model(server_factory: Any) -> None:
    server = server_factory(eval_data="none")
    stub, md = _admin(server)
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def create() -> None:
        try:
            stub.CreateModel(admin_pb2.CreateModelRequest(name="twin"), metadata=md, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(c.name for c in codes) == ["ALREADY_EXISTS"] * 3 + ["OK"]
    assert [v.version for v in server.store.list_versions("twin")] == [1]
    assert [m.name for m in server.models.models()] == ["digits-mlp", "twin"]


def test_a_device_checks_in_for_the_kind_of_data_it_holds(tmp_path: Path) -> None:
    from client.runtime import ClientConfig, DeviceClient, load_partition
    from common.tasks import TaskName, simulated_shard

    texts = simulated_shard(TaskName.INTENTS, 0, 50, alpha=0.5, seed=0)
    device = DeviceClient(ClientConfig(state_dir=str(tmp_path / "t")), texts)
    assert device._data_kind() == "intents"  # texts, whatever --task says
    digits = ClientConfig(state_dir=str(tmp_path / "d"))
    assert DeviceClient(digits, load_partition(digits))._data_kind() == "digits"


def test_ab_tests_of_a_model_reach_only_its_devices(
    server_factory: Any, device_threads: Any, raw_device: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text("[models.digits-b]\nhidden = '16'\nrounds = 1\n")
    server = server_factory(
        rounds=0, min_clients=2, clients_per_round=2, selection_window=0.1, models=str(models)
    )
    fleet = device_threads(server, 2, models="digits-b")
    assert server.models.get("digits-b").coordinator.wait_finished(timeout=120)
    for d in fleet:
        d.halt()
    stub, md = _admin(server)
    stub.CreateAbTest(
        admin_pb2.CreateAbTestRequest(
            name="b-test",
            model_a="digits-b:1",
            model_b="digits-b:2",
            traffic_split=0.5,
            metrics=["user_satisfaction"],
        ),
        metadata=md,
    )
    device = raw_device(server)

    def assignments(**names: Any) -> list[pb.AbAssignment]:
        request = pb.CheckInRequest(max_wait_ms=0, **names)
        return list(device.stub.CheckIn(request, metadata=device.md, timeout=10).ab_tests)

    # Running tests are re-read at most once a second.
    wait_until(lambda: assignments(models=["digits-b"]), 10, "the test's assignment")
    [assignment] = assignments(models=["digits-b"])
    assert (assignment.test_name, assignment.model_name) == ("b-test", "digits-b")
    assert assignments() == []  # a device of the default model: it runs no test
    # The device serves its variant's version of digits-b and reports on it.
    chunks = list(
        device.stub.DownloadModel(
            pb.DownloadModelRequest(ab_test="b-test"), metadata=device.md, timeout=30
        )
    )
    header = chunks[0].header
    assert (header.model_name, header.version) == ("digits-b", assignment.model_version)
    expected = server.store.load_version("digits-b", assignment.model_version)
    data = b"".join(c.data for c in chunks[1:])
    np.testing.assert_array_equal(np.frombuffer(data, dtype="<f4"), expected)
    # Naming another model than the test's is refused, and records nothing.
    with pytest.raises(grpc.RpcError) as err:
        device.stub.ReportPerformance(
            pb.ReportPerformanceRequest(
                metrics={"user_satisfaction": 0.9}, ab_test="b-test", model_name="digits-mlp"
            ),
            metadata=device.md,
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    device.stub.ReportPerformance(
        pb.ReportPerformanceRequest(
            metrics={"user_satisfaction": 0.9}, ab_test="b-test", model_name="digits-b"
        ),
        metadata=device.md,
        timeout=10,
    )
    analysis = stub.AnalyzeAbTest(admin_pb2.AnalyzeAbTestRequest(test_name="b-test"), metadata=md)
    result = analysis.metrics["user_satisfaction"]
    assert result.count_a + result.count_b == 1


def test_performance_reports_go_to_the_model_the_device_serves(
    server_factory: Any, raw_device: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text("[models.digits-b]\nhidden = '16'\n")
    server = server_factory(min_clients=5, clients_per_round=5, models=str(models))
    tracker = PerformanceTracker(store=server.store)

    def latencies(name: str) -> list[float]:
        rows = tracker.get_history(name, "inference_latency", context={"source": "device"})
        return [r["value"] for r in rows]

    device = raw_device(server)

    def report(value: float, model_name: str) -> None:
        device.stub.ReportPerformance(
            pb.ReportPerformanceRequest(
                metrics={"inference_latency": value}, model_name=model_name
            ),
            metadata=device.md,
            timeout=10,
        )

    report(0.25, "digits-b")
    assert latencies("digits-b") == [0.25] and latencies("digits-mlp") == []
    report(0.5, "digits-mlp")
    # A device older than the field names no model: the default model's history.
    report(0.75, "")
    assert latencies("digits-mlp") == [0.5, 0.75] and latencies("digits-b") == [0.25]
    with pytest.raises(grpc.RpcError) as err:
        report(1.0, "digits-zz")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no model 'digits-zz'" in (err.value.details() or "")
    assert latencies("digits-mlp") == [0.5, 0.75] and latencies("digits-b") == [0.25]
    # The device runtime names the model it serves: here the one it is configured for.
    client = DeviceClient(
        ClientConfig(
            server=server.address,
            state_dir=str(tmp_path / "dc"),
            allow_plaintext=True,
            models="digits-b",
        ),
        None,
    )
    try:
        client.report_performance({"inference_latency": 0.125})
    finally:
        client.close()
    assert latencies("digits-b") == [0.25, 0.125] and latencies("digits-mlp") == [0.5, 0.75]


def test_delete_stops_a_model_and_a_restart_does_not_train_it(
    tmp_path: Path, device_threads: Any
) -> None:
    tokens = tmp_path / "admin.tokens"
    operator = add_admin_token(tokens, "otto", Role.OPERATOR)
    admin = add_admin_token(tokens, "ada", Role.ADMIN)
    models = tmp_path / "models.toml"
    models.write_text("[models.digits-b]\nhidden = '16'\n")
    config = dataclasses.replace(
        FAST_SERVER,
        db=f"sqlite:///{tmp_path}/xeno.db",
        models=str(models),
        rounds=0,
        min_clients=2,
        clients_per_round=2,
        admin_token_file=str(tokens),
    )
    server = XenoServer(config).start()
    try:
        fleet = device_threads(server, 2, models="digits-b")
        wait_until(lambda: _completed(server, "digits-b") >= 1, 120, "a digits-b round")
        stub, md = _admin(server, operator)
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteModel(admin_pb2.DeleteModelRequest(name="digits-b"), metadata=md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub, md = _admin(server, admin)
        for name, code, words in (
            ("", grpc.StatusCode.INVALID_ARGUMENT, "name the model"),
            ("digits-mlp", grpc.StatusCode.FAILED_PRECONDITION, "default model"),
            ("digits-zz", grpc.StatusCode.NOT_FOUND, "no model 'digits-zz'"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.DeleteModel(admin_pb2.DeleteModelRequest(name=name), metadata=md)
            assert err.value.code() == code and words in (err.value.details() or ""), name
        listed = _models(stub, md)
        assert listed["digits-b"].training and listed["digits-mlp"].training
        assert {d.name for d in server.store.model_definitions()} == {"digits-mlp", "digits-b"}
        info = stub.DeleteModel(admin_pb2.DeleteModelRequest(name="digits-b"), metadata=md)
        assert info.name == "digits-b" and not info.training
        versions = [v.version for v in server.store.list_versions("digits-b")]
        assert info.current_version == versions[-1] and versions[:2] == [1, 2]
        done = _completed(server, "digits-b")
        time.sleep(1.5)
        assert _completed(server, "digits-b") == done  # no more rounds
        # Its history is kept: versions, rounds; only the definition is gone.
        assert [v.version for v in server.store.list_versions("digits-b")] == versions
        assert {d.name for d in server.store.model_definitions()} == {"digits-mlp"}
        assert not _models(stub, md)["digits-b"].training
        [entry] = [e for e in audit_entries(server.store) if e.action == "model.deleted"]
        assert entry.actor == "admin ada (admin)"
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteModel(admin_pb2.DeleteModelRequest(name="digits-b"), metadata=md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for d in fleet:
            d.halt()
    finally:
        server.stop(grace=0.5)
    # Restarted without it in the models file: it is not trained again; its versions stay.
    server = XenoServer(dataclasses.replace(config, models="")).start()
    try:
        assert [m.name for m in server.models.models()] == ["digits-mlp"]
        stub, md = _admin(server, admin)
        listed = _models(stub, md)
        assert (
            not listed["digits-b"].training and listed["digits-b"].current_version == (versions[-1])
        )
        assert [v.version for v in server.store.list_versions("digits-b")] == versions
    finally:
        server.stop(grace=0.5)


def test_deleting_a_model_aborts_its_open_round(
    server_factory: Any, raw_device: Any, tmp_path: Path
) -> None:
    """A round open when its model is deleted ends "aborted", not "running" for ever."""
    models = tmp_path / "models.toml"
    models.write_text("[models.digits-b]\nhidden = '16'\n")
    server = server_factory(
        rounds=0,
        min_clients=2,
        clients_per_round=2,
        selection_window=0.1,
        round_deadline=600.0,  # the round stays open until the delete
        models=str(models),
    )
    devices = [raw_device(server) for _ in range(2)]
    tasks: list[pb.CheckInResponse] = []

    def check_in(device: Any) -> None:
        request = pb.CheckInRequest(max_wait_ms=20_000, models=["digits-b"])
        tasks.append(device.stub.CheckIn(request, metadata=device.md, timeout=30))

    threads = [threading.Thread(target=check_in, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert len(tasks) == 2 and all(r.HasField("task") for r in tasks), tasks
    [running] = server.store.list_rounds("digits-b")
    assert running.status == "running"
    stub, md = _admin(server)
    stub.DeleteModel(admin_pb2.DeleteModelRequest(name="digits-b"), metadata=md)
    [ended] = server.store.list_rounds("digits-b")
    assert (ended.id, ended.status) == (running.id, "aborted")
    assert ended.failure_reason == "model 'digits-b' was deleted during the round"
    assert ended.ended_at is not None and ended.result_version is None
    assert sorted(p.status for p in server.store.round_participants(ended.id)) == ["dropped"] * 2
    [entry] = [e for e in audit_entries(server.store) if e.action == "round.aborted"]
    assert entry.target == running.id
    # The other model's rounds are untouched, and the store refuses a made-up end state.
    assert server.store.list_rounds("digits-mlp") == []
    with pytest.raises(ValueError, match="failed or aborted"):
        server.store.fail_round(running.id, "x", 0.0, [], status="done")
