"""One device must never act as another: the credential headers are read once, by the interceptor.

The attack this replays: a device with its own valid token sends the victim's
id and its own id and token in the same call. The interceptor used to check the
last `x-xeno-device-id` (the attacker's, with the attacker's token) while the
servicers acted for the first (the victim's): the attacker checked in as the
victim, downloaded the victim's task and stored an update weighted 1,000,000
under the victim's id. Now any call that carries a credential header twice is
refused with UNAUTHENTICATED and changes nothing.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from common.pb import federation_pb2 as pb
from tests.test_bad_input import check_in_all, data_msgs, dump_database, expect, header


def _attacks(victim, attacker) -> list[tuple[tuple[str, str], ...]]:
    me = (("authorization", f"Bearer {attacker.token}"),)
    return [
        (("x-xeno-device-id", victim.device_id), ("x-xeno-device-id", attacker.device_id), *me),
        (("x-xeno-device-id", attacker.device_id), ("x-xeno-device-id", victim.device_id), *me),
        (
            ("x-xeno-device-id", victim.device_id),
            ("authorization", "Bearer not-the-victims"),
            ("x-xeno-device-id", attacker.device_id),
            *me,
        ),
        (("x-xeno-device-id", attacker.device_id), *me, *me),
    ]


def test_duplicated_credentials_cannot_act_as_another_device(server_factory, raw_device) -> None:
    server = server_factory(
        clients_per_round=2, min_clients=2, selection_window=0.2, eval_data="none"
    )
    victim, attacker = raw_device(server), raw_device(server)
    tasks = check_in_all([victim, attacker])
    task = tasks[victim.device_id].task
    assert task.round_id == tasks[attacker.device_id].task.round_id
    model = list(
        victim.stub.DownloadModel(
            pb.DownloadModelRequest(round_id=task.round_id), metadata=victim.md
        )
    )
    manifest = model[0].header.manifest
    d = manifest.total_elements
    before = dump_database(server)
    poisoned = np.full(d, 1000.0, dtype=np.float32)

    for md in _attacks(victim, attacker):
        expect(
            grpc.StatusCode.UNAUTHENTICATED,
            attacker.stub.CheckIn,
            pb.CheckInRequest(max_wait_ms=100),
            metadata=md,
            match="more than once",
        )
        expect(
            grpc.StatusCode.UNAUTHENTICATED,
            attacker.stub.DownloadModel,
            pb.DownloadModelRequest(round_id=task.round_id),
            metadata=md,
            match="more than once",
        )
        expect(
            grpc.StatusCode.UNAUTHENTICATED,
            attacker.stub.UploadUpdate,
            iter([header(task, manifest, num_examples=1_000_000), *data_msgs(poisoned)]),
            metadata=md,
            match="more than once",
        )
        expect(
            grpc.StatusCode.UNAUTHENTICATED,
            attacker.stub.DeclineTask,
            pb.DeclineTaskRequest(round_id=task.round_id, reason="as the victim"),
            metadata=md,
        )

    assert dump_database(server) == before, "a refused call changed the database"
    # The victim's place in the round is untouched: it uploads its own update, as does the
    # attacker under its own name, and the new model is the mean of exactly those two.
    good_v = np.full(d, 0.5, dtype=np.float32)
    good_a = np.full(d, -0.25, dtype=np.float32)
    victim.stub.UploadUpdate(
        iter([header(task, manifest, num_examples=10), *data_msgs(good_v)]),
        metadata=victim.md,
        timeout=30,
    )
    attacker.stub.UploadUpdate(
        iter([header(task, manifest, num_examples=10), *data_msgs(good_a)]),
        metadata=attacker.md,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while server.store.get_model("digits-mlp").current_version < 2:
        assert time.monotonic() < deadline, "the round did not complete"
        time.sleep(0.05)
    base = server.store.load_version("digits-mlp", 1)
    new = server.store.load_version("digits-mlp", 2)
    np.testing.assert_allclose(new - base, np.full(d, 0.125), atol=1e-6)
    rows = {p.device_id: p for p in server.store.round_participants(task.round_id)}
    assert rows[victim.device_id].num_examples == 10
    assert rows[victim.device_id].status in ("uploaded", "reported")


def test_the_single_set_of_own_credentials_still_works(server_factory, raw_device) -> None:
    server = server_factory(eval_data="none")
    device = raw_device(server)
    assert device.check_in(100).WhichOneof("outcome") == "wait"


def test_duplicated_admin_token_is_refused(server_factory) -> None:
    from common.pb import admin_pb2, admin_pb2_grpc

    server = server_factory(admin_token="s3cret", eval_data="none")
    with grpc.insecure_channel(server.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        good = (("authorization", "Bearer s3cret"),)
        stub.ListModels(admin_pb2.ListModelsRequest(), metadata=good, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(
                admin_pb2.ListModelsRequest(),
                metadata=(("authorization", "Bearer wrong"), *good),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_identity_reaches_sync_streaming_and_async_handlers() -> None:
    """The wrapper does not depend on the server's threading model (thread pool or grpc.aio)."""
    import asyncio

    from server.services.common import device_id_of, with_identity

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise RuntimeError(details)

    def plain(request: object, context: object) -> str:
        return device_id_of(context)

    def stream(request: object, context: object):
        yield device_id_of(context)

    async def coroutine(request: object, context: object) -> str:
        return device_id_of(context)

    async def agen(request: object, context: object):
        yield device_id_of(context)

    def call(handler):
        wrapped = with_identity(handler, "dev-a")
        return wrapped.unary_unary or wrapped.unary_stream

    assert call(grpc.unary_unary_rpc_method_handler(plain))(None, Context()) == "dev-a"
    assert list(call(grpc.unary_stream_rpc_method_handler(stream))(None, Context())) == ["dev-a"]
    assert asyncio.run(call(grpc.unary_unary_rpc_method_handler(coroutine))(None, Context())) == (
        "dev-a"
    )

    async def collect() -> list[str]:
        return [x async for x in call(grpc.unary_stream_rpc_method_handler(agen))(None, Context())]

    assert asyncio.run(collect()) == ["dev-a"]
    # A handler reached without the interceptor has no identity.
    with pytest.raises(RuntimeError, match="no authenticated device identity"):
        device_id_of(Context())
