"""Devices in the model lifecycle: their A/B variant at check-in, their performance reports."""

from __future__ import annotations

import hashlib
import math
import threading
import time

import grpc
import pytest
import torch

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


def _client_in(server, tmp_path, arm: str, test: str) -> DeviceClient:
    """A real device client whose sticky variant in `test` is `arm` (register until one is)."""
    for i in range(64):
        client = DeviceClient(
            ClientConfig(
                server=server.address,
                state_dir=str(tmp_path / f"{arm}-{i}"),
                allow_plaintext=True,
                max_wait_ms=200,
            ),
            None,
        )
        client._ensure_registered()
        assert client._creds is not None
        if assign(test, client._creds.device_id, 0.5).value == arm:
            return client
        client.close()
    raise AssertionError(f"no device landed in {arm} in 64 registrations")


def test_devices_in_different_arms_download_and_serve_their_own_version(
    server_factory, tmp_path
) -> None:
    """Over real gRPC: each device's own loop fetches its arm's exact version and serves it."""
    server = server_factory(min_clients=5, clients_per_round=5)  # no round starts
    name = server.config.model
    vcs = ModelVersionControl(store=server.store)
    v2 = vcs.create_version(name, build_model(server.coordinator.model.spec, seed=11), "app")
    ab = ABTestingManager(store=server.store)
    ab.create_test("serve", f"{name}:1", f"{name}:{v2}", 0.5, ["user_satisfaction"])
    clients = {
        arm: _client_in(server, tmp_path, arm, "serve") for arm in ("variant_a", "variant_b")
    }
    stops = {arm: threading.Event() for arm in clients}
    threads = []
    try:
        for arm, client in clients.items():
            client.stop = stops[arm]
            t = threading.Thread(target=client.run, daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            c.serving("serve") is None for c in clients.values()
        ):
            time.sleep(0.05)
        x = torch.randn(8, 64)
        outputs = {}
        for arm, client in clients.items():
            served = client.serving("serve")
            assert served is not None, f"{arm} never served its variant"
            version = 1 if arm == "variant_a" else v2
            assert (served.variant, served.model_name, served.version) == (arm, name, version)
            # Exactly the stored version's weights: an independent load from the registry.
            reference = build_model(server.coordinator.model.spec)
            reference.load_state_dict(vcs.load_state_dict(name, version))
            for key, value in reference.state_dict().items():
                assert torch.equal(served.model.state_dict()[key], value), key
            outputs[arm] = client.predict("serve", x)
            with torch.no_grad():
                assert torch.equal(outputs[arm], reference.eval()(x))
        assert not torch.equal(outputs["variant_a"], outputs["variant_b"])
        # Ending the test: the next check-in drops the served variant.
        ab.end_test("serve", "variant_b")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(c.serving("serve") for c in clients.values()):
            time.sleep(0.05)
        assert all(c.serving("serve") is None for c in clients.values())
    finally:
        for ev in stops.values():
            ev.set()
        for t in threads:
            t.join(timeout=30)
        for c in clients.values():
            c.close()


def test_variant_download_refusals(server_factory, raw_device, tmp_path) -> None:
    server = server_factory(min_clients=5, clients_per_round=5)
    name = server.config.model
    ab = ABTestingManager(store=server.store)
    ab.create_test("t", name, name, 0.5, ["user_satisfaction"])
    ab.create_test("done", name, name, 0.5, ["user_satisfaction"])
    ab.end_test("done", "none")
    d = raw_device(server)
    cases = [
        (pb.DownloadModelRequest(ab_test="nope"), "NOT_FOUND", "no A/B test 'nope'"),
        (pb.DownloadModelRequest(ab_test="done"), "FAILED_PRECONDITION", "has ended"),
        (pb.DownloadModelRequest(ab_test="t", round_id="r"), "INVALID_ARGUMENT", "not both"),
    ]
    for request, code, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(d.stub.DownloadModel(request, metadata=d.md, timeout=10))
        assert err.value.code().name == code and needle in err.value.details(), err.value.details()
    # Its own variant: the header names the version and the architecture; the digest holds.
    chunks = list(d.stub.DownloadModel(pb.DownloadModelRequest(ab_test="t"), metadata=d.md))
    header = chunks[0].header
    data = b"".join(c.data for c in chunks[1:])
    assert header.version == 1 and header.model_spec.architecture
    assert hashlib.sha256(data).digest() == header.sha256 and len(data) == header.total_bytes
    # A device refuses weights that are not its assigned version; what it served stays.
    client = DeviceClient(
        ClientConfig(server=server.address, state_dir=str(tmp_path / "c"), allow_plaintext=True),
        None,
    )
    try:
        client._ensure_registered()
        client.ab_assignments = {a.test_name: a for a in client._check_in().ab_tests}
        served = client.fetch_variant("t")
        assert served.version == 1
        client.ab_assignments["t"].model_version = 7
        with pytest.raises(RuntimeError, match="assigned"):
            client.fetch_variant("t")
        assert client.serving("t") is served
        with pytest.raises(LookupError, match="no assignment"):
            client.fetch_variant("other")
    finally:
        client.close()
