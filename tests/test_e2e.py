"""End-to-end federations over real gRPC on ephemeral loopback ports."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.pb import admin_pb2, admin_pb2_grpc, federation_pb2_grpc
from common.pb import federation_pb2 as pb
from common.tensors import Manifest, iter_chunks, to_wire

HEALTH = "grpc.health.v1.Health"


def wait_until(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


class SentUpdates:
    """What each device actually sent, recorded on the device side: round id -> uploads."""

    def __init__(self) -> None:
        self.by_round: dict[str, list[tuple[np.ndarray, int]]] = {}
        self._lock = threading.Lock()

    def install(self, client) -> None:
        send = client._upload

        def recording(task, manifest, delta, num_examples, timeout):
            result = send(task, manifest, delta, num_examples, timeout)
            with self._lock:  # recorded once the server accepted it
                sent = np.array(delta, dtype=np.float32)
                self.by_round.setdefault(task.round_id, []).append((sent, num_examples))
            return result

        client._upload = recording


def assert_versions_are_weighted_means(server, sent: SentUpdates, cap: int) -> None:
    """Each new version = the previous one + the example-weighted mean of the updates sent.

    Weights are the example counts the devices claimed, capped at `cap`; the reference is
    computed here in float64 from the device-side records, not by the server's code.
    """
    name = server.config.model
    for rnd in server.store.list_rounds(name):
        assert rnd.status == "completed"
        uploads = sent.by_round[rnd.id]
        assert len(uploads) == rnd.participants
        weights = np.array([min(n, cap) for _, n in uploads], dtype=np.float64)
        mean = sum(w * u.astype(np.float64) for w, (u, _) in zip(weights, uploads, strict=True))
        mean = mean / weights.sum()
        new = server.store.load_version(name, rnd.result_version).astype(np.float64)
        old = server.store.load_version(name, rnd.base_version).astype(np.float64)
        np.testing.assert_allclose(new - old, mean, rtol=0, atol=1e-6)


def test_each_new_version_is_the_example_weighted_mean_devices_sent(
    server_factory, device_threads
) -> None:
    cap = 500  # the three digits shards hold 411, 395 and 632 examples: one above the cap
    server = server_factory(rounds=2, min_clients=3, max_examples_weight=cap)
    sent = SentUpdates()
    devices = device_threads(server, 3, before_start=sent.install)
    assert server.coordinator.wait_finished(timeout=90)
    # devices hear that the federation finished and exit by themselves (and the last
    # upload's response has reached its device, which records it then)
    for d in devices:
        d.thread.join(timeout=30)
        assert not d.thread.is_alive() and d.client.rounds_done == 2
    claimed = sorted(n for uploads in sent.by_round.values() for _, n in uploads)
    assert claimed[-1] > cap > claimed[0]
    assert_versions_are_weighted_means(server, sent, cap)
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


def test_admin_service_reports_versions_and_rounds(server_factory, device_threads) -> None:
    server = server_factory(rounds=1, admin_token="s3cret", min_clients=3)
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
    # round 1 starts the moment all three are in; the window only delays round 2 (two left)
    server = server_factory(rounds=2, round_deadline=3.0, selection_window=5.0)
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
        # the health contract docs/protocol.md 13 spells out is the one the server serves
        [resp] = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=HEALTH)])
            )
        )
        served = descriptor_pb2.FileDescriptorProto.FromString(
            resp.file_descriptor_response.file_descriptor_proto[0]
        )
        assert served.package == "grpc.health.v1"
        methods = {
            m.name: (m.input_type, m.output_type, m.server_streaming)
            for m in served.service[0].method
        }
        request, response = (
            ".grpc.health.v1.HealthCheckRequest",
            ".grpc.health.v1.HealthCheckResponse",
        )
        assert methods == {
            "Check": (request, response, False),
            "Watch": (request, response, True),
            "List": (
                ".grpc.health.v1.HealthListRequest",
                ".grpc.health.v1.HealthListResponse",
                False,
            ),
        }
        messages = {m.name: m for m in served.message_type}
        assert [(f.name, f.number) for f in messages["HealthCheckRequest"].field] == [
            ("service", 1)
        ]
        [status] = messages["HealthCheckResponse"].field
        assert (status.name, status.number) == ("status", 1)
        [enum] = messages["HealthCheckResponse"].enum_type
        assert [(v.name, v.number) for v in enum.value] == [
            ("UNKNOWN", 0),
            ("SERVING", 1),
            ("NOT_SERVING", 2),
            ("SERVICE_UNKNOWN", 3),
        ]
        assert [(f.name, f.number) for f in messages["HealthListResponse"].field] == [
            ("statuses", 1)
        ]
        with pytest.raises(grpc.RpcError) as err:  # in the proto, not served (documented)
            health.List(health_pb2.HealthListRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


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


def _upload_exact(device, task: pb.Task, vector: np.ndarray, num_examples: int) -> None:
    """Download the round's model, then upload `vector` claiming `num_examples`."""
    header = next(
        iter(
            device.stub.DownloadModel(
                pb.DownloadModelRequest(round_id=task.round_id), metadata=device.md, timeout=30
            )
        )
    ).header
    chunks = [
        pb.UpdateChunk(
            header=pb.UpdateHeader(
                round_id=task.round_id,
                base_version=task.model_version,
                manifest=header.manifest,
                total_bytes=task.model_bytes,
                num_examples=num_examples,
            )
        ),
        *(pb.UpdateChunk(data=c) for c in iter_chunks(to_wire(vector), 1 << 16)),
    ]
    device.stub.UploadUpdate(iter(chunks), metadata=device.md, timeout=30)


def test_example_weight_cap_stops_a_device_claiming_a_billion_examples(
    server_factory, raw_device
) -> None:
    server = server_factory(
        clients_per_round=3, min_clients=3, max_examples_weight=100, eval_data="none"
    )
    devices = [raw_device(server) for _ in range(3)]
    tasks: dict[str, pb.Task] = {}
    polls = [
        threading.Thread(target=lambda d=d: tasks.__setitem__(d.device_id, d.check_in(10_000).task))
        for d in devices
    ]
    for t in polls:
        t.start()
    for t in polls:
        t.join()
    d = server.coordinator.model.manifest.total_elements
    rng = np.random.default_rng(11)
    updates = [rng.normal(0, 0.1, d).astype(np.float32) for _ in devices]
    claims = [10**9, 100, 30]  # the first claims a billion examples; the cap is 100
    for dev, u, k in zip(devices, updates, claims, strict=True):
        _upload_exact(dev, tasks[dev.device_id], u, k)
    wait_until(lambda: server.store.get_model(server.config.model).current_version == 2, 30)
    name = server.config.model
    delta = server.store.load_version(name, 2).astype(np.float64) - server.store.load_version(
        name, 1
    )
    weights = [100, 100, 30]  # min(claim, cap)
    expected = sum(w * u.astype(np.float64) for w, u in zip(weights, updates, strict=True)) / sum(
        weights
    )
    np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-6)
    participants = {
        p.device_id: p
        for p in server.store.round_participants(server.store.list_rounds(name)[0].id)
    }
    assert participants[devices[0].device_id].num_examples == 100


def test_admin_api_refuses_a_wrong_admin_token(server_factory) -> None:
    server = server_factory(admin_token="s3cret-admin-token")
    with grpc.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for wrong in ("nope", "s3cret-admin-toke", "s3cret-admin-token2", "S3CRET-ADMIN-TOKEN"):
            with pytest.raises(grpc.RpcError) as err:
                admin.ListModels(
                    admin_pb2.ListModelsRequest(),
                    metadata=(("authorization", f"Bearer {wrong}"),),
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, wrong
        # a device's own valid credentials are no admin token either
        device = federation_pb2_grpc.FederationStub(channel).Register(
            pb.RegisterRequest(), timeout=10
        )
        with pytest.raises(grpc.RpcError) as err:
            admin.ListModels(
                admin_pb2.ListModelsRequest(),
                metadata=(
                    ("x-xeno-device-id", device.device_id),
                    ("authorization", f"Bearer {device.token}"),
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        right = (("authorization", "Bearer s3cret-admin-token"),)
        [model] = admin.ListModels(admin_pb2.ListModelsRequest(), metadata=right, timeout=10).models
        assert model.name == server.config.model
