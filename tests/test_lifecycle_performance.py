"""Performance tracking over the server's store: history, trends, alerts; rounds record theirs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest

from common.models import ModelSpec, build_model
from common.pb import admin_pb2 as pb
from common.pb import admin_pb2_grpc
from server.errors import ErrorKind, FederationError
from server.lifecycle.performance import AlertSettings
from xeno import cli
from xeno.model_versioning import ModelVersionControl, PerformanceTracker

SPEC = ModelSpec("mlp", {"input_dim": 4, "hidden": [3], "num_classes": 2})


@pytest.fixture
def tracker(db_url: str) -> PerformanceTracker:
    vcs = ModelVersionControl(db=db_url)
    vcs.create_version("clf", build_model(SPEC, seed=0), "test")
    vcs.close()
    t = PerformanceTracker(db=db_url)
    yield t
    t.close()


def test_history_with_filters(tracker: PerformanceTracker) -> None:
    start = datetime.now(UTC)
    for i in range(6):
        tracker.record_metric("clf", "accuracy", 0.5 + i / 100, {"dataset": ["a", "b"][i % 2]})
    tracker.record_metric("clf", "latency", 0.2, {"dataset": "a"})
    everything = tracker.get_history("clf")
    assert len(everything) == 7
    acc_b = tracker.get_history("clf", "accuracy", context={"dataset": "b"})
    assert [h["value"] for h in acc_b] == [0.51, 0.53, 0.55]
    assert [h["value"] for h in tracker.get_history("clf", "accuracy", limit=2)] == [0.54, 0.55]
    assert tracker.get_history("clf", since=datetime.now(UTC) + timedelta(seconds=5)) == []
    assert len(tracker.get_history("clf", until=datetime.now(UTC), since=start)) == 7


def test_trend_knows_which_direction_is_good(tracker: PerformanceTracker) -> None:
    rng = np.random.default_rng(0)
    for i in range(40):
        tracker.record_metric("clf", "accuracy", 0.5 + 0.01 * i + rng.normal(0, 0.01))
        tracker.record_metric("clf", "loss", 2.0 - 0.03 * i + rng.normal(0, 0.02))
        tracker.record_metric("clf", "latency", 0.1 + 0.002 * i + rng.normal(0, 0.002))
        tracker.record_metric("clf", "engagement", 0.7 + rng.normal(0, 0.05))
    assert tracker.get_trend("clf", "accuracy") == "improving"
    assert tracker.get_trend("clf", "loss") == "improving"  # falling loss is better
    assert tracker.get_trend("clf", "latency") == "degrading"  # rising latency is worse
    assert tracker.get_trend("clf", "engagement") == "stable"
    stats = tracker.get_trend_statistics("clf", "loss")
    assert stats["n"] == 40 and stats["p_value"] < 0.05 and stats["tau"] < 0
    assert stats["slope"] == pytest.approx(-0.03, abs=0.005) and stats["direction"] == "lower"
    assert tracker.get_trend_statistics("clf", "accuracy", window=3)["n"] == 3
    summary = tracker.get_statistics("clf", "engagement")
    assert summary["count"] == 40 and summary["std"] > 0 and summary["trend"]["trend"] == "stable"
    tracker.set_direction("engagement", "lower")
    assert tracker.get_trend("clf", "accuracy") == "improving"


def test_deviation_and_trend_alerts(db_url: str) -> None:
    vcs = ModelVersionControl(db=db_url)
    vcs.create_version("clf", build_model(SPEC, seed=0), "test")
    t = PerformanceTracker(db=db_url, alert_settings=AlertSettings(alert_window=10))
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert t.record_metric("clf", "accuracy", 0.9 + rng.normal(0, 0.005)) == []
    [alert] = t.record_metric("clf", "accuracy", 0.80)  # 20 sigmas down
    assert alert["kind"] == "deviation" and alert["baseline"] == pytest.approx(0.9, abs=0.01)
    assert "standard deviations" in alert["message"]
    # A rising latency degrades steadily: one trend alert per window, not one per value.
    raised = []
    for i in range(15):
        raised += t.record_metric("clf", "latency", 0.1 + 0.01 * i)
    trend_alerts = [a for a in raised if a["kind"] == "trend"]
    assert len(trend_alerts) == 1 and "degrading" in trend_alerts[0]["message"]
    stored = t.get_alerts("clf")
    assert [a["metric"] for a in stored][-1] == "accuracy"
    assert {a["kind"] for a in stored} == {"deviation", "trend"}
    assert t.get_alerts("clf", "latency") == [a for a in stored if a["metric"] == "latency"]


BAD = [
    (lambda t: t.record_metric("nope", "accuracy", 1.0), ErrorKind.NOT_FOUND, "no model 'nope'"),
    (lambda t: t.record_metric("clf", "", 1.0), ErrorKind.INVALID_ARGUMENT, "bad metric name"),
    (lambda t: t.record_metric("clf", "acc", float("inf")), ErrorKind.INVALID_ARGUMENT, "finite"),
    (lambda t: t.record_metric("clf", "acc", "high"), ErrorKind.INVALID_ARGUMENT, "a number"),
    (
        lambda t: t.record_metric("clf", "acc", 1.0, {"when": datetime.now(UTC)}),
        ErrorKind.INVALID_ARGUMENT,
        "context must be JSON",
    ),
    (lambda t: t.get_trend("clf", "nothing"), ErrorKind.NOT_FOUND, "no recorded metric 'nothing'"),
    (lambda t: t.get_trend("nope", "accuracy"), ErrorKind.NOT_FOUND, "no model 'nope'"),
    (lambda t: t.get_trend("clf", "accuracy", window=0), ErrorKind.INVALID_ARGUMENT, "window"),
    (lambda t: t.set_direction("loss", "down"), ErrorKind.INVALID_ARGUMENT, "'higher' or 'lower'"),
]


@pytest.mark.parametrize(("call", "kind", "needle"), BAD)
def test_bad_input_is_refused_and_records_nothing(
    tracker: PerformanceTracker, call, kind: ErrorKind, needle: str
) -> None:
    tracker.record_metric("clf", "accuracy", 0.5)
    with pytest.raises(FederationError) as info:
        call(tracker)
    assert info.value.kind is kind and needle in str(info.value), str(info.value)
    assert [h["value"] for h in tracker.get_history("clf")] == [0.5]


def test_rounds_record_their_metrics_and_alerts_reach_prometheus_and_the_cli(
    server_factory, device_threads, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(rounds=2)
    name = server.config.model
    tracker = PerformanceTracker(store=server.store)
    for v in [0.5, 0.51, 0.5, 0.49, 0.5, 0.51]:  # an app's own metric, then a bad value
        tracker.record_metric(name, "user_satisfaction", v)
    assert tracker.record_metric(name, "user_satisfaction", 0.1)[0]["kind"] == "deviation"
    device_threads(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    deadline = time.monotonic() + 30
    while len(tracker.get_history(name, "round_seconds")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for metric in ("accuracy", "loss", "participants", "dropouts", "round_seconds"):
        rows = tracker.get_history(name, metric, context={"source": "round"})
        assert [r["round"] for r in rows] == [1, 2], metric
        assert [r["version"] for r in rows] == [2, 3]
    rounds = server.store.list_rounds(name)
    assert [r["value"] for r in tracker.get_history(name, "accuracy")] == [
        r.metrics["accuracy"] for r in rounds
    ]
    assert [r["value"] for r in tracker.get_history(name, "participants")] == [3.0, 3.0]
    gauge = server.metrics.registry.get_sample_value(
        "xeno_performance_alerts", {"model": name, "metric": "user_satisfaction"}
    )
    assert gauge == 1.0
    # Over the admin API and the CLI.
    with grpc.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        [alert] = admin.ListAlerts(pb.ListAlertsRequest(model_name=name), timeout=10).alerts
        assert alert.metric == "user_satisfaction" and alert.kind == "deviation"
        info = admin.GetTrend(pb.GetTrendRequest(model_name=name, metric="round_seconds"))
        assert info.n == 2 and info.trend == "stable" and info.direction == "lower"
        for request, code in (
            (pb.GetTrendRequest(model_name="nope", metric="loss"), "NOT_FOUND"),
            (pb.GetTrendRequest(model_name=name, metric="nothing"), "NOT_FOUND"),
            (pb.GetTrendRequest(model_name=name, metric="loss", window=-1), "INVALID_ARGUMENT"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                admin.GetTrend(request, timeout=10)
            assert err.value.code().name == code
        with pytest.raises(grpc.RpcError) as err:
            admin.ListAlerts(pb.ListAlertsRequest(model_name="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert cli.main(["admin", "--server", server.address, "--json", "alerts"]) == 0
    [shown] = json.loads(capsys.readouterr().out)["alerts"]
    assert shown["metric"] == "user_satisfaction"
    assert cli.main(["admin", "--server", server.address, "alerts"]) == 0
    assert "deviation" in capsys.readouterr().out
    assert cli.main(["admin", "--server", server.address, "trend", "--model", name, "loss"]) == 0
    assert "Kendall tau" in capsys.readouterr().out
