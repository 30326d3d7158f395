"""Prometheus metrics, JSON logs without secrets, and health that follows the database."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb import federation_pb2 as pb
from server.observability import JsonFormatter


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_metrics_endpoint_counts_rounds_bytes_and_participants(
    server_factory, device_threads
) -> None:
    server = server_factory(rounds=2, metrics_port=0)
    device_threads(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    deadline = time.monotonic() + 10
    while True:  # listeners run right after the round's commit: poll until the last one ran
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if _metric(text, "xeno_rounds_completed_total") >= 2:
            break
        assert time.monotonic() < deadline, "the second round never reached the metrics"
        time.sleep(0.05)
    assert _metric(text, "xeno_rounds_started_total") == 2
    assert _metric(text, "xeno_rounds_completed_total") == 2
    assert _metric(text, "xeno_rounds_failed_total") == 0
    assert _metric(text, "xeno_round_participants") == 3
    assert _metric(text, "xeno_bytes_received_total") > 0
    assert _metric(text, "xeno_round_seconds_count") == 2
    assert 0 < _metric(text, "xeno_model_accuracy") <= 1
    assert _metric(text, "xeno_privacy_epsilon_spent") == 0


def test_json_logs_carry_ids_and_never_the_token(server_factory, raw_device) -> None:
    server = server_factory()
    device = raw_device(server)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    audit = logging.getLogger("xeno.audit")
    audit.addHandler(handler)
    level = audit.level
    audit.setLevel(logging.INFO)
    try:
        wrong = (("x-xeno-device-id", device.device_id), ("authorization", "Bearer s3cr3t-tok"))
        with contextlib.suppress(grpc.RpcError):
            device.stub.CheckIn(pb.CheckInRequest(), metadata=wrong, timeout=10)
        upload = [pb.UpdateChunk(header=pb.UpdateHeader(round_id="nope"))]
        with contextlib.suppress(grpc.RpcError):
            device.stub.UploadUpdate(iter(upload), metadata=device.md, timeout=10)
    finally:
        audit.removeHandler(handler)
        audit.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines, "no audit lines"
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    assert any(entry.get("device_id") == device.device_id for entry in lines)
    text = stream.getvalue()
    assert "s3cr3t-tok" not in text and device.token not in text


def test_health_follows_database_reachability(server_factory, monkeypatch) -> None:
    server = server_factory(health_interval=0.2)

    def status() -> int:
        with grpc.insecure_channel(server.address) as channel:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                .status
            )

    def wait_for(expected: int) -> None:
        end = time.monotonic() + 10
        while status() != expected:
            assert time.monotonic() < end, f"health never became {expected}"
            time.sleep(0.1)

    assert status() == health_pb2.HealthCheckResponse.SERVING

    def unreachable() -> None:
        raise ConnectionError("database is down")

    monkeypatch.setattr(server.store, "ping", unreachable)
    wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
    monkeypatch.undo()
    wait_for(health_pb2.HealthCheckResponse.SERVING)


def test_health_is_not_serving_while_the_database_disk_is_nearly_full(server_factory) -> None:
    """--min-free-disk-mb above what the disk has: NOT_SERVING with the reason and the gauge."""
    server = server_factory(health_interval=0.1, min_free_disk_mb=1e12)
    end = time.monotonic() + 10
    while "disk" not in server.health_monitor.problems:
        assert time.monotonic() < end, "the disk check never failed"
        time.sleep(0.05)
    assert "--min-free-disk-mb" in server.health_monitor.problems["disk"]
    with grpc.insecure_channel(server.address) as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            .status
        )
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    registry = server.metrics.registry
    assert registry.get_sample_value("xeno_serving", {"model": "digits-mlp"}) == 0
    labels = {"model": "digits-mlp", "check": "disk"}
    assert registry.get_sample_value("xeno_health_check_ok", labels) == 0
    labels["check"] = "database"
    assert registry.get_sample_value("xeno_health_check_ok", labels) == 1
