"""Federation.Forget: a user's deletion request erases the device's records on the server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from common.pb import federation_pb2 as pb
from server.store.models import AbResultRow, DeviceRow, PerformanceMetricRow
from xeno.model_finetuning import ContextualMemory, delete_user_data
from xeno.model_versioning import ABTestingManager


def test_delete_user_data_erases_the_devices_records_on_the_server(
    server_factory, device_threads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENO_HOME", str(tmp_path / "home"))
    server = server_factory(rounds=1)
    devices = device_threads(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    for d in devices:
        d.thread.join(timeout=30)
    gone = devices[0].client._creds
    assert gone is not None
    [rnd] = server.store.list_rounds(server.config.model)
    assert len(server.store.round_participants(rnd.id)) == 3
    versions_before = [v.version for v in server.store.list_versions(server.config.model)]
    # Per-device observations: A/B results (by device) and performance reports.
    ab = ABTestingManager(store=server.store)
    name = server.config.model
    ab.create_test("t", name, name, 0.5, ["user_satisfaction"])
    for d, value in zip(devices[:2], (4.0, 5.0), strict=True):
        d.client.report_performance({"user_satisfaction": value}, ab_test="t")
    memory = ContextualMemory(user_id="zoe")
    memory.store_fact("work", "role", "pilot")
    memory.close()

    result = delete_user_data("zoe", server=server.address, device_state_dir=tmp_path / "device-0")

    assert result["store_deleted"] is True
    assert result["server"]["device_id"] == gone.device_id
    assert result["server"]["participations_deleted"] == 1
    assert result["server"]["ab_results_deleted"] == 1
    with server.store.session() as s:
        kept = s.scalars(select(AbResultRow.device_ref)).all()
        contexts = s.scalars(select(PerformanceMetricRow.context)).all()
    other = devices[1].client._creds.device_id
    # Stored under a keyed pseudonym (the server has a data key), never the device id.
    assert kept == [server.store.device_ref(other)] and other not in kept[0]
    assert kept[0].startswith(server.store.sealer.key_id + ":")
    # The performance history never names a device: nothing per device is left there.
    assert contexts and not any(gone.device_id in str(c) for c in contexts)
    left = {p.device_id for p in server.store.round_participants(rnd.id)}
    assert gone.device_id not in left and len(left) == 2
    with server.store.session() as s:
        assert s.execute(select(DeviceRow.id).where(DeviceRow.id == gone.device_id)).first() is None
    # The aggregated models stay: they hold no per-device data.
    assert [v.version for v in server.store.list_versions(server.config.model)] == versions_before
    # The old token no longer works, and the device forgot its credentials.
    stub = devices[0].client._stub
    md = (("x-xeno-device-id", gone.device_id), ("authorization", f"Bearer {gone.token}"))
    with pytest.raises(grpc.RpcError) as err:
        stub.CheckIn(pb.CheckInRequest(max_wait_ms=100), metadata=md, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not (tmp_path / "device-0" / "credentials.json").exists()
    # A second request finds nothing to erase on the server.
    again = delete_user_data("zoe", server=server.address, device_state_dir=tmp_path / "device-0")
    assert again["server"] == {"server": server.address, "registered": False}


def test_forget_is_refused_while_the_device_is_in_the_open_round(
    server_factory, raw_device
) -> None:
    server = server_factory(
        clients_per_round=1, min_clients=1, selection_window=0.1, round_deadline=30.0
    )
    device = raw_device(server)
    response = device.check_in()
    assert response.HasField("task")
    with pytest.raises(grpc.RpcError) as err:
        device.stub.Forget(pb.ForgetRequest(), metadata=device.md, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "after it closes" in (err.value.details() or "")
    with server.store.session() as s:
        assert s.execute(select(DeviceRow.id).where(DeviceRow.id == device.device_id)).first()


def test_forget_needs_the_devices_own_credentials(server_factory, raw_device) -> None:
    server = server_factory()
    device = raw_device(server)
    wrong = (("x-xeno-device-id", device.device_id), ("authorization", "Bearer nope"))
    with pytest.raises(grpc.RpcError) as err:
        device.stub.Forget(pb.ForgetRequest(), metadata=wrong, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with server.store.session() as s:
        assert s.execute(select(DeviceRow.id).where(DeviceRow.id == device.device_id)).first()


def test_forget_releases_the_enrollment_index_for_the_next_device(server_factory, tmp_path) -> None:
    """Indices pick distinct data partitions: a forgotten device's is reused, also after a
    restart (the index is stored), and a device registering again keeps its own."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from common.pb import federation_pb2_grpc
    from server.registry import DeviceRegistry

    db = f"sqlite:///{tmp_path}/idx.db"
    server = server_factory(db=db, min_clients=9, clients_per_round=9)
    channel = grpc.insecure_channel(server.address)
    stub = federation_pb2_grpc.FederationStub(channel)
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def register(identity: bytes = b"") -> pb.RegisterResponse:
        return stub.Register(pb.RegisterRequest(identity_public_key=identity), timeout=10)

    devices = [register() for _ in range(3)]
    assert [d.enrollment_index for d in devices] == [0, 1, 2]
    md = (
        ("x-xeno-device-id", devices[1].device_id),
        ("authorization", f"Bearer {devices[1].token}"),
    )
    stub.Forget(pb.ForgetRequest(), metadata=md, timeout=10)
    assert register().enrollment_index == 1  # the released index
    assert register(key).enrollment_index == 3
    assert register(key).enrollment_index == 3  # the same device again keeps its index
    # A restart reads the stored indices: the next free one is 4, not a count.
    stub.Forget(
        pb.ForgetRequest(),
        metadata=(
            ("x-xeno-device-id", devices[0].device_id),
            ("authorization", f"Bearer {devices[0].token}"),
        ),
        timeout=10,
    )
    channel.close()
    again = DeviceRegistry(server.store)
    assert again.register("", {}, b"")[2] == 0
    assert again.register("", {}, b"")[2] == 4
