"""The model lifecycle over the admin API (real gRPC) and the `xeno-fl admin` CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from common.models import build_model
from common.pb import admin_pb2 as pb
from common.pb import admin_pb2_grpc
from common.pb import federation_pb2 as pb_fed
from common.tensors import flatten_state_dict
from server.app import XenoServer
from server.lifecycle.abtests import assign
from xeno import cli
from xeno.model_versioning import ModelVersionControl


@pytest.fixture
def served(server_factory, tmp_path) -> Iterator[tuple[XenoServer, admin_pb2_grpc.AdminStub]]:
    """A server (no devices) whose model has versions 1-4, the last three pushed by an app."""
    server = server_factory(db=f"sqlite:///{tmp_path}/admin.db")
    vcs = ModelVersionControl(store=server.store)
    spec = server.coordinator.model.spec
    for seed in (1, 2, 3):
        vcs.create_version(
            "digits-mlp", build_model(spec, seed=seed), "app", metrics={"accuracy": seed / 10}
        )
    with grpc.insecure_channel(server.address) as channel:
        yield server, admin_pb2_grpc.AdminStub(channel)


def state(admin: admin_pb2_grpc.AdminStub) -> tuple[object, ...]:
    versions = admin.ListVersions(pb.ListVersionsRequest(model_name="digits-mlp"), timeout=10)
    return tuple(versions.versions)


def test_versions_show_rollback_compare_tag_prune(served) -> None:
    server, admin = served
    versions = admin.ListVersions(pb.ListVersionsRequest(model_name="digits-mlp"), timeout=10)
    assert [(v.version, v.created_by) for v in versions.versions] == [
        (1, "server"),
        (2, "app"),
        (3, "app"),
        (4, "app"),
    ]
    head = admin.GetVersion(pb.GetVersionRequest(model_name="digits-mlp"), timeout=10)
    assert head.version == 4 and head.metrics["accuracy"] == pytest.approx(0.3)
    rolled = admin.Rollback(
        pb.RollbackRequest(model_name="digits-mlp", target_version=2, reason="bad", operator="eve"),
        timeout=10,
    )
    assert rolled.version == 5
    rec = admin.GetVersion(pb.GetVersionRequest(model_name="digits-mlp", version=5), timeout=10)
    assert rec.rollback_of == 2 and rec.created_by == "eve" and "bad" in rec.description
    assert (
        rec.sha256
        == admin.GetVersion(
            pb.GetVersionRequest(model_name="digits-mlp", version=2), timeout=10
        ).sha256
    )
    cmp = admin.CompareVersions(
        pb.CompareVersionsRequest(model_name="digits-mlp", version_a=2, version_b=4), timeout=10
    )
    acc = cmp.metric_changes["accuracy"]
    assert (acc.v1, acc.v2) == pytest.approx((0.1, 0.3)) and acc.change_percent == 200.0
    w2 = server.store.load_version("digits-mlp", 2).astype(np.float64)
    w4 = server.store.load_version("digits-mlp", 4).astype(np.float64)
    assert cmp.l2_distance == pytest.approx(np.linalg.norm(w4 - w2), rel=1e-6)
    tagged = admin.SetTag(pb.SetTagRequest(model_name="digits-mlp", tag="production", version=3))
    assert tagged.version == 3
    by_tag = admin.GetVersion(pb.GetVersionRequest(model_name="digits-mlp", tag="production"))
    assert by_tag.version == 3 and list(by_tag.tags) == ["production"]
    pruned = admin.PruneVersions(pb.PruneVersionsRequest(model_name="digits-mlp", keep=1))
    assert list(pruned.deleted) == [1, 2, 4]
    assert [v.version for v in state(admin)] == [3, 5]
    # The rolled-back head's weights survive their original version's deletion.
    np.testing.assert_array_equal(server.store.load_version("digits-mlp", 5), w2.astype(np.float32))


BAD = [
    ("GetVersion", pb.GetVersionRequest(model_name="nope"), "NOT_FOUND", "no model 'nope'"),
    (
        "GetVersion",
        pb.GetVersionRequest(model_name="digits-mlp", version=42),
        "NOT_FOUND",
        "has no version 42; it has versions 1-4",
    ),
    (
        "GetVersion",
        pb.GetVersionRequest(model_name="digits-mlp", tag="prod"),
        "NOT_FOUND",
        "no tag 'prod'",
    ),
    (
        "Rollback",
        pb.RollbackRequest(model_name="digits-mlp", target_version=9),
        "NOT_FOUND",
        "has no version 9",
    ),
    (
        "Rollback",
        pb.RollbackRequest(model_name="digits-mlp", target_version=0),
        "INVALID_ARGUMENT",
        "version number >= 1",
    ),
    (
        "Rollback",
        pb.RollbackRequest(model_name="digits-mlp", target_version=4),
        "FAILED_PRECONDITION",
        "already the head",
    ),
    (
        "Rollback",
        pb.RollbackRequest(model_name="nope", target_version=1),
        "NOT_FOUND",
        "no model 'nope'",
    ),
    (
        "CompareVersions",
        pb.CompareVersionsRequest(model_name="digits-mlp", version_a=1, version_b=8),
        "NOT_FOUND",
        "no version 8",
    ),
    (
        "SetTag",
        pb.SetTagRequest(model_name="digits-mlp", tag="production", version=8),
        "NOT_FOUND",
        "no version 8",
    ),
    (
        "SetTag",
        pb.SetTagRequest(model_name="digits-mlp", tag="no spaces"),
        "INVALID_ARGUMENT",
        "bad tag",
    ),
    (
        "SetTag",
        pb.SetTagRequest(model_name="digits-mlp", tag="staging", remove=True),
        "NOT_FOUND",
        "no tag 'staging'",
    ),
    (
        "PruneVersions",
        pb.PruneVersionsRequest(model_name="digits-mlp", keep=-1),
        "INVALID_ARGUMENT",
        "keep must be",
    ),
    ("PruneVersions", pb.PruneVersionsRequest(model_name="nope"), "NOT_FOUND", "no model"),
]


@pytest.mark.parametrize(("method", "request_", "code", "needle"), BAD)
def test_bad_admin_requests_get_a_precise_status_and_change_nothing(
    served, method: str, request_: object, code: str, needle: str
) -> None:
    server, admin = served
    before = state(admin)
    with pytest.raises(grpc.RpcError) as err:
        getattr(admin, method)(request_, timeout=10)
    assert err.value.code().name == code and needle in err.value.details(), err.value.details()
    assert state(admin) == before
    assert server.store.get_model("digits-mlp").current_version == 4


def test_cli_lifecycle_commands(served, capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = served
    base = ["admin", "--server", server.address]

    def run(*args: str) -> dict:
        assert cli.main([*base, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    assert int(run("rollback", "--model", "digits-mlp", "2", "--reason", "drift")["version"]) == 5
    shown = run("show", "--model", "digits-mlp")
    assert shown["rollback_of"] == "2" and "drift" in shown["description"]
    assert int(run("tag", "--model", "digits-mlp", "production", "3")["version"]) == 3
    assert run("show", "--model", "digits-mlp", "production")["version"] == "3"
    cmp = run("compare", "--model", "digits-mlp", "2", "3")
    assert cmp["metric_changes"]["accuracy"]["change_percent"] == 100.0
    assert [int(v) for v in run("prune", "--model", "digits-mlp", "--keep", "1")["deleted"]] == [
        1,
        2,
        4,
    ]
    rows = run("versions", "--model", "digits-mlp")["versions"]
    assert [(int(v["version"]), v.get("tags", [])) for v in rows] == [(3, ["production"]), (5, [])]
    # Tables for people, and a refusal with the status's message.
    assert cli.main([*base, "compare", "--model", "digits-mlp", "3", "5"]) == 0
    assert "L2 distance" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "rollback", "--model", "digits-mlp", "99"])
    assert "NOT_FOUND" in str(exit_.value) and "no version 99" in str(exit_.value)
    # The same commands work on the database directly.
    assert (
        cli.main(["admin", "--db", server.config.db, "--json", "show", "--model", "digits-mlp"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["version"] == "5"


def test_rollback_on_a_running_federation(server_factory, device_threads) -> None:
    """Real devices over gRPC: the round after the rollback trains the rolled-back weights."""
    server = server_factory()
    device_threads(server, 3)
    name = server.config.model
    store = server.store

    def completed() -> int:
        return sum(r.status == "completed" for r in store.list_rounds(name))

    _wait(lambda: completed() >= 2)
    target = 1
    with grpc.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        head = admin.Rollback(
            pb.RollbackRequest(model_name=name, target_version=target, reason="test"), timeout=10
        ).version
    # The next round to complete trained the rolled-back weights: its parent is the new head.
    _wait(
        lambda: any(
            r.base_version == head and r.status == "completed" for r in store.list_rounds(name)
        )
    )
    done = next(
        r for r in store.list_rounds(name) if r.base_version == head and r.status == "completed"
    )
    assert done.result_version == head + 1
    # No version lands on a pre-rollback head after the rollback.
    for v in store.list_versions(name):
        if v.version > head:
            assert v.parent_version is not None and v.parent_version >= head
    versions = {v.version: v for v in store.list_versions(name)}
    assert versions[head].blob_sha256 == versions[target].blob_sha256


def _wait(predicate, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_versions_flat_weights_fit_an_existing_model(served) -> None:
    server, _ = served
    vcs = ModelVersionControl(store=server.store)
    w = flatten_state_dict(build_model(server.coordinator.model.spec, seed=9).state_dict())
    assert vcs.create_version("digits-mlp", w, "app") == 5
    np.testing.assert_array_equal(server.store.load_version("digits-mlp", 5), w)


def test_cli_ab_commands(served, capsys: pytest.CaptureFixture[str]) -> None:
    server, admin = served
    base = ["admin", "--server", server.address]

    def run(*args: str) -> dict:
        assert cli.main([*base, "--json", "ab", *args]) == 0
        return json.loads(capsys.readouterr().out)

    created = run("create", "t", "digits-mlp:2", "digits-mlp", "--split", "0.3", "--metrics", "s,l")
    assert created["variant_a"]["version"] == "2" and created["variant_b"]["version"] == "4"
    assert created["traffic_split"] == 0.3 and created["metrics"] == ["s", "l"]
    assert run("show", "t")["status"] == "running"
    assert [t["name"] for t in run("list")["tests"]] == ["t"]
    got = run("assign", "t", "user-1")
    assert got["variant"] == assign("t", "user-1", 0.3).value
    for variant, values in (
        ("variant_a", [1.0, 1.1, 0.9, 1.0]),
        ("variant_b", [2.0, 2.1, 1.9, 2.0]),
    ):
        for v in values:
            admin.RecordAbResult(
                pb.RecordAbResultRequest(test_name="t", variant=variant, metrics={"s": v, "l": v})
            )
    welch = run("analyze", "t")
    assert welch["method"] == "welch" and welch["metrics"]["s"]["winner"] == "variant_b"
    seq = run("analyze", "t", "--method", "sequential")
    assert seq["method"] == "sequential" and seq["metrics"]["s"]["winner"] == "inconclusive"
    # Tables for people.
    assert cli.main([*base, "ab", "analyze", "t"]) == 0
    out = capsys.readouterr().out
    assert "variant_b" in out and "sample ratio" in out
    assert cli.main([*base, "ab", "list"]) == 0
    assert "digits-mlp v2" in capsys.readouterr().out
    # Refusals: the server's status and message, nothing changed.
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "ab", "create", "u", "digits-mlp", "digits-mlp", "--split", "1.5",
                  "--metrics", "s"])  # fmt: skip
    assert "INVALID_ARGUMENT" in str(exit_.value) and "strictly between 0 and 1" in str(exit_.value)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "ab", "analyze", "nope"])
    assert "NOT_FOUND" in str(exit_.value)
    assert cli.main([*base, "ab", "show", "nope"]) == 2
    assert "no A/B test 'nope'; tests: t" in capsys.readouterr().err
    assert [t["name"] for t in run("list")["tests"]] == ["t"]
    ended = run("end", "t", "--tag", "staging")
    assert ended["status"] == "ended" and ended["winner"] == "variant_b"
    assert ModelVersionControl(store=server.store).get_tags("digits-mlp")["staging"] == 4
    # The same on the database directly.
    assert cli.main(["admin", "--db", server.config.db, "--json", "ab", "show", "t"]) == 0
    assert json.loads(capsys.readouterr().out)["winner"] == "variant_b"


@pytest.mark.parametrize(("k_sigma", "alerts"), [(3.0, 1), (4.0, 0)])
def test_alert_thresholds_are_server_settings(
    server_factory, raw_device, capsys: pytest.CaptureFixture[str], k_sigma: float, alerts: int
) -> None:
    """A value 3.2 baseline standard deviations worse alerts at k = 3, not at k = 4."""
    server = server_factory(
        min_clients=5, clients_per_round=5, alert_k_sigma=k_sigma, alert_baseline_window=6
    )
    d = raw_device(server)
    for value in [0.020, 0.022] * 3 + [0.0245]:
        d.stub.ReportPerformance(
            pb_fed.ReportPerformanceRequest(metrics={"inference_latency": value}),
            metadata=d.md,
            timeout=10,
        )
    argv = [
        "admin",
        "--server",
        server.address,
        "--json",
        "alerts",
        "--metric",
        "inference_latency",
    ]
    assert cli.main(argv) == 0
    found = json.loads(capsys.readouterr().out).get("alerts", [])
    assert len(found) == alerts
    if alerts:
        assert found[0]["kind"] == "deviation" and "threshold 3" in found[0]["message"]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("alert_k_sigma", 0.0, "--alert-k-sigma must be > 0"),
        ("alert_k_sigma", float("nan"), "--alert-k-sigma must be > 0"),
        ("alert_baseline_window", 1, "--alert-baseline-window must be at least 2"),
        ("alert_window", 2, "--alert-window must be at least 3"),
    ],
)
def test_bad_alert_settings_are_refused(server_factory, field: str, value: float, needle: str):
    with pytest.raises(ValueError, match=needle):
        server_factory(**{field: value})


def test_alert_flags_exist() -> None:
    parser = cli.build_parser("server")
    args = parser.parse_args(
        [
            "server",
            "--alert-k-sigma",
            "2.5",
            "--alert-window",
            "40",
            "--alert-baseline-window",
            "10",
        ]
    )
    assert (args.alert_k_sigma, args.alert_window, args.alert_baseline_window) == (2.5, 40, 10)
