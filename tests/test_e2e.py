"""End-to-end federations over real gRPC on ephemeral loopback ports."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.pb import admin_pb2, admin_pb2_grpc
from common.pb import federation_pb2 as pb
from common.tensors import Manifest


def wait_until(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_three_devices_two_rounds(server_factory, device_threads) -> None:
    server = server_factory(rounds=2)
    devices = device_threads(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    rounds = server.store.list_rounds(server.config.model)
    assert [r.status for r in rounds] == ["completed", "completed"]
    assert [r.result_version for r in rounds] == [2, 3]
    assert all(r.participants == 3 and r.dropouts == 0 for r in rounds)
    assert all(0 < r.metrics["accuracy"] <= 1 for r in rounds)
    # every device downloaded the model and uploaded an update of the same size
    model_bytes = server.coordinator.model.manifest.total_bytes
    assert rounds[0].bytes_in == 3 * model_bytes and rounds[0].bytes_out == 3 * model_bytes
    for p in server.store.round_participants(rounds[0].id):
        assert p.status == "reported" and p.metrics["train_loss"] > 0
    # devices hear that the federation finished and exit by themselves
    for d in devices:
        d.thread.join(timeout=30)
        assert not d.thread.is_alive() and d.client.rounds_done == 2


def test_admin_service_reports_versions_and_rounds(server_factory, device_threads) -> None:
    server = server_factory(rounds=1, admin_token="s3cret")
    device_threads(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    with grpc.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            admin.ListModels(admin_pb2.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", "Bearer s3cret"),)
        [model] = admin.ListModels(admin_pb2.ListModelsRequest(), metadata=md, timeout=10).models
        assert model.name == "digits-mlp" and model.current_version == 2
        versions = admin.ListVersions(
            admin_pb2.ListVersionsRequest(model_name="digits-mlp"), metadata=md, timeout=10
        ).versions
        assert [v.version for v in versions] == [1, 2]
        assert versions[1].parent_version == 1
        for key in ("accuracy", "loss", "participants", "dropouts", "bytes_in", "bytes_out"):
            assert key in versions[1].metrics
        assert versions[1].metrics["participants"] == 3 and versions[1].metrics["round_seconds"] > 0
        [rnd] = admin.GetRoundHistory(
            admin_pb2.GetRoundHistoryRequest(model_name="digits-mlp"), metadata=md, timeout=10
        ).rounds
        assert rnd.status == "completed" and rnd.participants == 3
        with pytest.raises(grpc.RpcError) as err:
            admin.ListVersions(
                admin_pb2.ListVersionsRequest(model_name="nope"), metadata=md, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_device_dying_mid_round_does_not_block_it(
    server_factory, device_threads, raw_device
) -> None:
    server = server_factory(rounds=2, round_deadline=3.0, selection_window=0.5)
    doomed = raw_device(server)
    got: list[pb.CheckInResponse] = []
    poll = threading.Thread(target=lambda: got.append(doomed.check_in(10_000)))
    poll.start()
    wait_until(lambda: len(server.coordinator._available) == 1, 10)
    device_threads(server, 2)
    poll.join(timeout=30)
    task = got[0].task
    # the doomed device downloads the model, then vanishes without uploading
    chunks = list(
        doomed.stub.DownloadModel(
            pb.DownloadModelRequest(round_id=task.round_id), metadata=doomed.md
        )
    )
    assert chunks[0].header.total_bytes == task.model_bytes
    doomed.channel.close()
    assert server.coordinator.wait_finished(timeout=60)
    rounds = server.store.list_rounds(server.config.model)
    assert rounds[0].status == "completed"
    assert rounds[0].participants == 2 and rounds[0].dropouts == 1 and rounds[0].selected == 3
    assert rounds[0].seconds >= 2.9
    assert (
        rounds[-1].status == "completed"
        and server.store.get_model("digits-mlp").current_version == 3
    )
    statuses = {p.device_id: p.status for p in server.store.round_participants(rounds[0].id)}
    assert statuses[doomed.device_id] == "dropped"


def test_health_and_reflection_are_served(server_factory) -> None:
    server = server_factory(reflection=True)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "xeno.fl.v1.Federation", "xeno.fl.v1.Admin"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in resp.list_services_response.service}
        assert {"xeno.fl.v1.Federation", "xeno.fl.v1.Admin", "grpc.health.v1.Health"} <= names


def test_reflection_is_off_unless_asked_for(server_factory) -> None:
    server = server_factory()
    with grpc.insecure_channel(server.address) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(
                refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.slow
def test_fifty_megabyte_model_completes_a_round(server_factory, device_threads) -> None:
    server = server_factory(rounds=1, params=13_000_000, clients_per_round=2, round_deadline=240.0)
    manifest: Manifest = server.coordinator.model.manifest
    assert manifest.total_bytes >= 50_000_000
    device_threads(server, 2)
    assert server.coordinator.wait_finished(timeout=280)
    [rnd] = server.store.list_rounds(server.config.model)
    assert rnd.status == "completed" and rnd.participants == 2
    assert rnd.bytes_in == 2 * manifest.total_bytes and rnd.bytes_out == 2 * manifest.total_bytes
    new = server.store.load_version(server.config.model, 2)
    assert new.shape == (manifest.total_elements,) and np.isfinite(new).all()
    assert not np.array_equal(new, server.store.load_version(server.config.model, 1))
