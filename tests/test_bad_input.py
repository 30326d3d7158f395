"""Every malformed, stale, duplicate, oversized or non-finite request over real gRPC.

Each is refused with a precise status code, and afterwards the database is
byte-for-byte the same and the round's aggregate contains exactly the good
updates.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from sqlalchemy import text

from common.pb import federation_pb2 as pb
from common.pb import tensor_pb2
from common.tensors import iter_chunks, to_wire


def dump_database(server) -> dict[str, list[tuple]]:
    tables = ["devices", "blobs", "models", "model_versions", "rounds", "round_participants"]
    with server.store.engine.connect() as conn:
        return {
            t: sorted(map(tuple, conn.execute(text(f"SELECT * FROM {t}")).all()), key=repr)
            for t in tables
        }


def expect(code: grpc.StatusCode, fn, *args, match: str = "", **kwargs) -> None:
    with pytest.raises(grpc.RpcError) as err:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    assert err.value.code() == code, err.value.details()
    assert match in err.value.details(), err.value.details()


def header(task: pb.Task, manifest: tensor_pb2.Manifest, **overrides) -> pb.UpdateChunk:
    fields = dict(
        round_id=task.round_id,
        base_version=task.model_version,
        manifest=manifest,
        total_bytes=task.model_bytes,
        num_examples=10,
    )
    fields.update(overrides)
    return pb.UpdateChunk(header=pb.UpdateHeader(**fields))


def upload(device, msgs):
    return device.stub.UploadUpdate(iter(msgs), metadata=device.md, timeout=30)


def data_msgs(vector: np.ndarray, chunk: int = 1 << 12):
    return [pb.UpdateChunk(data=c) for c in iter_chunks(to_wire(vector), chunk)]


def check_in_all(devices):
    results: dict[str, pb.CheckInResponse] = {}
    threads = [
        threading.Thread(target=lambda d=d: results.__setitem__(d.device_id, d.check_in(10_000)))
        for d in devices
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_bad_requests_are_refused_and_change_nothing(server_factory, raw_device) -> None:
    server = server_factory(
        clients_per_round=2, min_clients=2, selection_window=0.2, eval_data="none"
    )
    a, b, outsider = raw_device(server), raw_device(server), raw_device(server)
    tasks = check_in_all([a, b])
    ta, tb = tasks[a.device_id].task, tasks[b.device_id].task
    assert ta.round_id == tb.round_id
    stream = list(
        a.stub.DownloadModel(pb.DownloadModelRequest(round_id=ta.round_id), metadata=a.md)
    )
    manifest = stream[0].header.manifest
    d = manifest.total_elements
    before = dump_database(server)
    good_a = np.full(d, 0.5, dtype=np.float32)

    # unknown device, wrong token, missing credentials
    bogus = (("x-xeno-device-id", "dev-unknown"), ("authorization", f"Bearer {a.token}"))
    expect(grpc.StatusCode.UNAUTHENTICATED, a.stub.CheckIn, pb.CheckInRequest(), metadata=bogus)
    wrong = (("x-xeno-device-id", a.device_id), ("authorization", "Bearer nope"))
    expect(
        grpc.StatusCode.UNAUTHENTICATED,
        a.stub.UploadUpdate,
        iter([header(ta, manifest), *data_msgs(good_a)]),
        metadata=wrong,
        match="wrong token",
    )
    expect(grpc.StatusCode.UNAUTHENTICATED, a.stub.CheckIn, pb.CheckInRequest())

    # manifest that does not match the model; declared length that does not match it
    bad_manifest = tensor_pb2.Manifest()
    bad_manifest.CopyFrom(manifest)
    bad_manifest.tensors[0].name = "evil.weight"
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, bad_manifest), *data_msgs(good_a)],
        match="manifest",
    )
    inconsistent = tensor_pb2.Manifest()
    inconsistent.CopyFrom(manifest)
    inconsistent.total_elements += 1
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, inconsistent), *data_msgs(good_a)],
        match="total_elements",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, manifest, total_bytes=ta.model_bytes - 4), *data_msgs(good_a[:-1])],
        match="declared size",
    )

    # NaN and Inf values
    for poison in (np.nan, np.inf, -np.inf):
        vec = good_a.copy()
        vec[d // 2] = poison
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            upload,
            a,
            [header(ta, manifest), *data_msgs(vec)],
            match="NaN or Inf",
        )

    # a stream that exceeds its declared size, and a truncated one
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, manifest), *data_msgs(np.concatenate([good_a, good_a[:8]]))],
        match="exceeds its declared size",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, manifest), *data_msgs(good_a[: d // 2])],
        match="truncated",
    )
    # a stream with no header, and a header in the middle
    expect(grpc.StatusCode.INVALID_ARGUMENT, upload, a, data_msgs(good_a), match="header")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, manifest), header(ta, manifest)],
        match="data chunks",
    )

    # unknown round id; wrong base version
    expect(
        grpc.StatusCode.NOT_FOUND,
        upload,
        a,
        [header(ta, manifest, round_id="f" * 32), *data_msgs(good_a)],
        match="unknown round",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload,
        a,
        [header(ta, manifest, base_version=ta.model_version + 7), *data_msgs(good_a)],
        match="Task.model_version",
    )

    # a device that is not in the round may not download its model or upload to it
    expect(
        grpc.StatusCode.PERMISSION_DENIED,
        outsider.stub.DownloadModel,
        pb.DownloadModelRequest(round_id=ta.round_id),
        metadata=outsider.md,
    )
    expect(
        grpc.StatusCode.PERMISSION_DENIED,
        upload,
        outsider,
        [header(ta, manifest), *data_msgs(good_a)],
    )

    assert dump_database(server) == before, "a refused request changed the database"

    # the good update is accepted; the same upload again is a duplicate
    assert upload(a, [header(ta, manifest), *data_msgs(good_a)]).received_bytes == 4 * d
    expect(
        grpc.StatusCode.ALREADY_EXISTS,
        upload,
        a,
        [header(ta, manifest), *data_msgs(good_a)],
        match="already accepted",
    )
    good_b = np.full(d, -0.25, dtype=np.float32)
    upload(b, [header(tb, manifest), *data_msgs(good_b)])
    server.coordinator.wait_finished(timeout=0)  # round closes on the target count
    import time

    deadline = time.monotonic() + 10
    while server.store.get_model("digits-mlp").current_version < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    base = server.store.load_version("digits-mlp", 1)
    new = server.store.load_version("digits-mlp", 2)
    np.testing.assert_allclose(new - base, np.full(d, 0.125), atol=1e-6)

    # the closed round's id is now stale
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        upload,
        a,
        [header(ta, manifest), *data_msgs(good_a)],
        match="closed",
    )
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        a.stub.ReportMetrics,
        pb.ReportMetricsRequest(round_id=ta.round_id, metrics={"x": 1.0}),
        metadata=a.md,
    )


def test_non_finite_metrics_are_refused(server_factory, raw_device) -> None:
    server = server_factory(clients_per_round=2, selection_window=0.2, eval_data="none")
    a, b = raw_device(server), raw_device(server)
    task = check_in_all([a, b])[a.device_id].task
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        a.stub.ReportMetrics,
        pb.ReportMetricsRequest(round_id=task.round_id, metrics={"loss": float("nan")}),
        metadata=a.md,
        match="non-finite",
    )


def test_enrollment_key_is_enforced(server_factory) -> None:
    server = server_factory(enrollment_key="letmein")
    with grpc.insecure_channel(server.address) as channel:
        from common.pb import federation_pb2_grpc

        stub = federation_pb2_grpc.FederationStub(channel)
        expect(
            grpc.StatusCode.PERMISSION_DENIED, stub.Register, pb.RegisterRequest(enrollment_key="x")
        )
        assert stub.Register(pb.RegisterRequest(enrollment_key="letmein")).device_id.startswith(
            "dev-"
        )
