"""Devices in the model lifecycle: their A/B variant at check-in, their performance reports."""

from __future__ import annotations

import math

import grpc
import pytest

from client.runtime import ClientConfig, DeviceClient
from common.models import build_model
from common.pb import federation_pb2 as pb
from server.lifecycle.abtests import assign
from xeno.model_versioning import ABTestingManager, ModelVersionControl, PerformanceTracker


def test_variant_at_check_in_and_reports_per_variant(server_factory, raw_device, tmp_path) -> None:
    server = server_factory(min_clients=5, clients_per_round=5)  # no round starts
    name = server.config.model
    vcs = ModelVersionControl(store=server.store)
    vcs.create_version(name, build_model(server.coordinator.model.spec, seed=3), "app")
    ab = ABTestingManager(store=server.store)
    ab.create_test("t", f"{name}:1", f"{name}:2", 0.5, ["user_satisfaction", "inference_latency"])
    devices = [raw_device(server) for _ in range(6)]
    seen = set()
    for d in devices:
        [a] = d.check_in(wait_ms=0).ab_tests
        expected = assign("t", d.device_id, 0.5).value
        assert a.test_name == "t" and a.variant == expected and a.model_name == name
        assert a.model_version == (1 if expected == "variant_a" else 2)
        assert list(a.metrics) == ["user_satisfaction", "inference_latency"]
        seen.add(a.variant)
        d.stub.ReportPerformance(
            pb.ReportPerformanceRequest(
                metrics={"user_satisfaction": 4.0, "inference_latency": 0.02}, ab_test="t"
            ),
            metadata=d.md,
            timeout=10,
        )
    out = ab.analyze_test("t")["metrics"]["user_satisfaction"]
    per_arm = {v: sum(assign("t", d.device_id, 0.5).value == v for d in devices) for v in seen}
    assert out["count_a"] == per_arm.get("variant_a", 0)
    assert out["count_b"] == per_arm.get("variant_b", 0)
    tracker = PerformanceTracker(store=server.store)
    rows = tracker.get_history(name, "inference_latency", context={"source": "device"})
    assert len(rows) == 6 and {r["version"] for r in rows} <= {1, 2}
    # A plain report (no test) lands in the history only.
    d = devices[0]
    d.stub.ReportPerformance(
        pb.ReportPerformanceRequest(metrics={"inference_latency": 0.03}),
        metadata=d.md,
        timeout=10,
    )
    assert len(tracker.get_history(name, "inference_latency")) == 7
    # The device runtime keeps its assignments and reports through the same RPC.
    client = DeviceClient(
        ClientConfig(server=server.address, state_dir=str(tmp_path / "dc"), allow_plaintext=True),
        None,
    )
    try:
        client._ensure_registered()
        client.ab_assignments = {a.test_name: a for a in client._check_in().ab_tests}
        assert client.inference_version("t") in (1, 2) and client.inference_version("x") is None
        client.report_performance({"user_satisfaction": 5.0}, ab_test="t")
    finally:
        client.close()
    assert len(tracker.get_history(name, "user_satisfaction")) == 7


BAD = [
    ({"clicks": 1.0}, "t", "INVALID_ARGUMENT", "does not measure clicks"),
    ({"user_satisfaction": math.nan}, "t", "INVALID_ARGUMENT", "not finite"),
    ({}, "", "INVALID_ARGUMENT", "no metrics"),
    ({"user_satisfaction": 1.0}, "nope", "NOT_FOUND", "no A/B test 'nope'"),
    ({"user_satisfaction": 1.0}, "done", "FAILED_PRECONDITION", "has ended"),
    ({f"m{i}": 1.0 for i in range(17)}, "", "INVALID_ARGUMENT", "at most 16"),
]


@pytest.mark.parametrize(("metrics", "test", "code", "needle"), BAD)
def test_bad_reports_are_refused_and_record_nothing(
    server_factory, raw_device, metrics, test, code, needle
) -> None:
    server = server_factory(min_clients=5, clients_per_round=5)
    name = server.config.model
    ab = ABTestingManager(store=server.store)
    ab.create_test("t", name, name, 0.5, ["user_satisfaction"])
    ab.create_test("done", name, name, 0.5, ["user_satisfaction"])
    ab.end_test("done", "none")
    d = raw_device(server)
    with pytest.raises(grpc.RpcError) as err:
        d.stub.ReportPerformance(
            pb.ReportPerformanceRequest(metrics=metrics, ab_test=test), metadata=d.md, timeout=10
        )
    assert err.value.code().name == code and needle in err.value.details(), err.value.details()
    assert PerformanceTracker(store=server.store).get_history(name) == []
    assert ab.analyze_test("t")["metrics"]["user_satisfaction"]["count_a"] == 0
