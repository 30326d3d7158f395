"""Bounded resources: hostile devices aiming at availability, over real gRPC.

Stalled uploads, idle streams, floods of calls and large secure-aggregation
cohorts must not stop honest devices from finishing rounds. Each limit refuses
with a clear status and message and leaves the server's state as it was.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from test_bad_input import check_in_all, header

from client.retry import RETRY_AFTER_KEY, retry_after_s
from client.runtime import DeviceClient
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.tensors import iter_chunks, to_wire
from server.limits import CallLimit, TokenBuckets
from server.rounds.coordinator import Status


def eventually(predicate, timeout: float = 10.0) -> None:
    """Poll a condition the server reaches right after answering (its handler's cleanup)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------- limiter units
def test_token_bucket_allows_its_burst_then_refuses_with_the_wait() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, what="check-ins from this device", clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [None, None, None]
    refusal = buckets.take("a")
    assert refusal is not None
    assert refusal.message == (
        "too many check-ins from this device: at most 2 per second (bursts of 3); retry in 500 ms"
    )
    assert refusal.retry_after_ms == 500
    # the refused call took nothing: exactly the announced wait lets one call through
    refusal = buckets.take("a")
    assert refusal is not None and refusal.retry_after_ms == 500
    assert buckets.take("b") is None  # other keys are independent
    clock.now += 0.5
    assert buckets.take("a") is None
    assert buckets.take("a") is not None


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=10.0, burst=5, what="calls", clock=clock)
    for _ in range(5):
        assert buckets.take("k") is None
    clock.now += 1000.0  # a long pause refills to the burst, never beyond
    assert sum(buckets.take("k") is None for _ in range(20)) == 5


def test_token_buckets_forget_the_oldest_keys_beyond_their_bound() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, what="calls", max_keys=3, clock=Clock())
    for key in ["a", "b", "c", "d"]:
        assert buckets.take(key) is None
    assert len(buckets) == 3
    assert buckets.take("a") is None  # forgotten: starts over with a full bucket
    assert buckets.take("d") is not None


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0.0, 1, "the rate must be a positive number"),
        (float("nan"), 1, "the rate must be a positive number"),
        (1.0, 0.5, "the burst must be at least 1"),
    ],
)
def test_token_bucket_settings_are_checked(rate: float, burst: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBuckets(rate, burst, "check-ins")


def test_call_limit_refuses_the_call_over_it_and_counts_exits() -> None:
    limit = CallLimit(2)
    assert limit.enter() is None and limit.enter() is None
    refusal = limit.enter()
    assert refusal is not None and "2 calls already in progress" in refusal.message
    assert limit.active == 2  # the refused call is not counted
    limit.exit()
    assert limit.enter() is None
    limit.exit()
    limit.exit()
    with pytest.raises(RuntimeError, match="without a matching enter"):
        limit.exit()


class _Refused(grpc.RpcError):
    def __init__(
        self,
        trailers: tuple[tuple[str, str], ...],
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        self._trailers = trailers
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "too many check-ins"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


@pytest.mark.parametrize(
    ("trailers", "seconds"),
    [
        (((RETRY_AFTER_KEY, "1500"),), 1.5),
        (((RETRY_AFTER_KEY, "soon"),), 0.0),
        (((RETRY_AFTER_KEY, "-5"),), 0.0),
        (((RETRY_AFTER_KEY, "1e12"),), 600.0),
        ((), 0.0),
    ],
)
def test_retry_hint_is_read_and_bounded(trailers, seconds: float) -> None:
    assert retry_after_s(_Refused(trailers)) == seconds


# ---------------------------------------------------------------------- over gRPC
def _metadata_of(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_check_ins_are_rate_limited_per_device_with_a_retry_hint(
    server_factory, raw_device
) -> None:
    server = server_factory(checkin_rate=0.5, checkin_burst=2)
    flooder, other = raw_device(server), raw_device(server)
    for _ in range(2):
        assert flooder.check_in(0).WhichOneof("outcome") == "wait"
    server.coordinator._available.pop(flooder.device_id, None)
    with pytest.raises(grpc.RpcError) as err:
        flooder.check_in(0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many check-ins from this device: at most 0.5 per second" in err.value.details()
    hint = int(_metadata_of(err.value)[RETRY_AFTER_KEY])
    assert 0 < hint <= 2000  # the time until the bucket holds a whole token again
    # refused before the domain layer: the flooder was not marked available
    assert flooder.device_id not in server.coordinator._available
    assert other.check_in(0).WhichOneof("outcome") == "wait"  # others are not limited
    time.sleep(hint / 1000 + 0.05)
    assert flooder.check_in(0).WhichOneof("outcome") == "wait"


def test_registrations_are_rate_limited_per_address_and_store_nothing(server_factory) -> None:
    server = server_factory(peer_register_rate=0.1, peer_register_burst=3)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_stub(channel)
        for _ in range(3):
            stub.Register(pb.RegisterRequest(), timeout=10)
        before = len(server.registry)
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(pb.RegisterRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many registrations from this address" in err.value.details()
    assert int(_metadata_of(err.value)[RETRY_AFTER_KEY]) > 0
    assert len(server.registry) == before
    assert len(server.store.device_credentials()) == before


def pb_stub(channel: grpc.Channel):
    from common.pb import federation_pb2_grpc

    return federation_pb2_grpc.FederationStub(channel)


def test_concurrent_calls_are_bounded_and_health_still_answers(server_factory, raw_device) -> None:
    server = server_factory(max_concurrent_rpcs=2, min_clients=3, clients_per_round=3)
    a, b, c = raw_device(server), raw_device(server), raw_device(server)
    polls = [
        d.stub.CheckIn.future(pb.CheckInRequest(max_wait_ms=3000), metadata=d.md, timeout=30)
        for d in (a, b)
    ]
    deadline = time.monotonic() + 10
    while server.guard.calls.active < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as err:
        c.check_in(0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server busy: 2 calls already in progress" in err.value.details()
    assert _metadata_of(err.value)[RETRY_AFTER_KEY] == "1000"
    assert c.device_id not in server.coordinator._available  # nothing happened for it
    health = health_pb2_grpc.HealthStub(a.channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    for poll in polls:
        assert poll.result().WhichOneof("outcome") == "wait"
    eventually(lambda: server.guard.calls.active == 0)
    assert c.check_in(0).WhichOneof("outcome") == "wait"


class Stall:
    """A request stream that sends `messages` and then nothing until released."""

    def __init__(self, messages: list[pb.UpdateChunk]) -> None:
        self.messages = messages
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.UpdateChunk]:
        yield from self.messages
        self.release.wait(120)


def _task_and_manifest(server, devices):
    tasks = check_in_all(devices)
    task = tasks[devices[0].device_id].task
    first = next(
        devices[0].stub.DownloadModel(
            pb.DownloadModelRequest(round_id=task.round_id), metadata=devices[0].md
        )
    )
    return tasks, first.header.manifest


def test_a_stalled_upload_holds_no_buffer_and_an_idle_one_gives_it_back(
    server_factory, raw_device
) -> None:
    server = server_factory(
        staging_buffers=1,
        clients_per_round=3,
        min_clients=3,
        selection_window=0.2,
        eval_data="none",
        stream_first_message_timeout=1.0,
        stream_idle_timeout=1.0,
    )
    header_only, one_chunk, honest = raw_device(server), raw_device(server), raw_device(server)
    tasks, manifest = _task_and_manifest(server, [header_only, one_chunk, honest])
    d = manifest.total_elements

    def msgs(device, values=0.25):
        task = tasks[device.device_id].task
        data = to_wire(np.full(d, values, dtype=np.float32))
        return [header(task, manifest)] + [
            pb.UpdateChunk(data=c) for c in iter_chunks(data, 1 << 12)
        ]

    stalled = Stall(msgs(header_only)[:1])
    stalled_call = header_only.stub.UploadUpdate.future(
        iter(stalled), metadata=header_only.md, timeout=60
    )
    coordinator = server.coordinator
    deadline = time.monotonic() + 10
    while coordinator._round.cohort[header_only.device_id].status is not Status.UPLOADING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(coordinator._staging) == 1  # a header holds no staging buffer

    # One data chunk takes the only buffer; when the stream then idles it comes back.
    held = Stall(msgs(one_chunk)[:2])
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        one_chunk.stub.UploadUpdate(iter(held), metadata=one_chunk.md, timeout=60)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no next message within 1 s" in err.value.details()
    assert "--stream-idle-timeout" in err.value.details()
    assert time.monotonic() - started < 10
    held.release.set()
    assert len(coordinator._staging) == 1
    assert coordinator._round.cohort[one_chunk.device_id].status is Status.SELECTED

    # The honest upload goes through although the header-only stream is still open.
    honest.stub.UploadUpdate(iter(msgs(honest)), metadata=honest.md, timeout=30)
    assert coordinator._round.cohort[honest.device_id].status is Status.UPLOADED
    # ...and the one whose stream idled may upload again.
    one_chunk.stub.UploadUpdate(iter(msgs(one_chunk)), metadata=one_chunk.md, timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stalled_call.result()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stalled.release.set()


def test_a_stream_that_never_sends_is_closed_after_the_first_message_timeout(
    server_factory, raw_device
) -> None:
    server = server_factory(stream_first_message_timeout=0.5)
    device = raw_device(server)
    silent = Stall([])
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        device.stub.UploadUpdate(iter(silent), metadata=device.md, timeout=30)
    silent.release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.details() == (
        "no first message within 0.5 s: the server closed the idle stream "
        "(--stream-first-message-timeout)"
    )
    assert time.monotonic() - started < 5
    eventually(lambda: server.guard.calls.active == 0)


def test_a_secagg_round_needs_no_thread_per_waiting_device(server_factory, device_threads):
    """Six devices wait in every phase together; two worker threads are enough."""
    server = server_factory(
        secagg=True,
        max_workers=2,
        clients_per_round=6,
        min_clients=6,
        rounds=1,
        eval_data="none",
        secagg_phase_timeout=20.0,
    )
    device_threads(server, 6)
    assert server.coordinator.wait_finished(timeout=120)
    [rnd] = server.store.list_rounds(server.config.model)
    assert rnd.status == "completed" and rnd.participants == 6
    assert rnd.metrics.get("secagg") == 1.0


class IdleStreams:
    """`count` reflection streams that never send, reopened whenever the server closes one."""

    def __init__(self, address: str, count: int) -> None:
        self.address, self.count = address, count
        self.closed: dict[str, int] = {}
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, stub) -> None:
        while not self._stop.is_set():
            call = stub.ServerReflectionInfo()  # no request is ever written
            self.opened += 1
            code = await call.code()
            self.closed[code.name] = self.closed.get(code.name, 0) + 1
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        # 32 streams per connection: HTTP/2 caps the streams one connection may open.
        channels = [grpc.aio.insecure_channel(self.address) for _ in range(0, self.count, 32)]
        stubs = [reflection_pb2_grpc.ServerReflectionStub(c) for c in channels]
        tasks = [asyncio.create_task(self._one(stubs[i // 32])) for i in range(self.count)]
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()

    def __enter__(self) -> IdleStreams:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class StallingDevice:
    """Selected in every round: opens its upload with a header (maybe a chunk), then stalls."""

    def __init__(self, device, with_chunk: bool) -> None:
        self.device, self.with_chunk = device, with_chunk
        self.stalls = 0
        self._stop = threading.Event()
        self._streams: list[Stall] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        manifest = None
        while not self._stop.is_set():
            try:
                resp = self.device.check_in(2000)
                if resp.WhichOneof("outcome") != "task":
                    if resp.WhichOneof("outcome") == "finished":
                        return
                    continue
                task = resp.task
                if manifest is None:
                    manifest = next(
                        self.device.stub.DownloadModel(
                            pb.DownloadModelRequest(round_id=task.round_id),
                            metadata=self.device.md,
                        )
                    ).header.manifest
                messages = [header(task, manifest)]
                if self.with_chunk:
                    messages.append(pb.UpdateChunk(data=bytes(1 << 12)))
                stall = Stall(messages)
                self._streams.append(stall)
                self.device.stub.UploadUpdate.future(
                    iter(stall), metadata=self.device.md, timeout=120
                )
                self.stalls += 1
            except grpc.RpcError:
                time.sleep(0.1)

    def __enter__(self) -> StallingDevice:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for s in self._streams:
            s.release.set()
        self._thread.join(timeout=30)


def test_idle_streams_and_stalled_uploads_do_not_stop_honest_rounds(
    server_factory, raw_device, device_threads
) -> None:
    """The attack of issue 10: 256 idle streams (no credentials needed) and four devices
    that start uploads and stall, against 5 honest devices that must finish 3 rounds.

    Before: 256 idle reflection streams took every worker thread (Register and Health
    went unanswered), and four header-only uploads held all four staging buffers.
    """
    server = server_factory(
        reflection=True,
        staging_buffers=4,
        stream_first_message_timeout=3.0,
        stream_idle_timeout=1.0,
        clients_per_round=5,
        overselect=0.8,  # cohorts of 9: the stalling devices are always selected
        min_clients=5,
        rounds=3,
        round_deadline=60.0,
        selection_window=3.0,
        eval_data="none",
    )
    attackers = [raw_device(server) for _ in range(4)]
    with IdleStreams(server.address, 256) as idle:
        # all 256 are open on the server at once (each call counts while it runs)
        eventually(lambda: server.guard.calls.active >= 256, timeout=30)
        with (
            StallingDevice(attackers[0], with_chunk=True) as s0,
            StallingDevice(attackers[1], with_chunk=False) as s1,
            StallingDevice(attackers[2], with_chunk=False) as s2,
            StallingDevice(attackers[3], with_chunk=False) as s3,
        ):
            honest = device_threads(server, 5)
            # Register and Health answer promptly all along.
            with grpc.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(3):
                    started = time.monotonic()
                    pb_stub(channel).Register(pb.RegisterRequest(), timeout=5)
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    assert status == health_pb2.HealthCheckResponse.SERVING
                    assert time.monotonic() - started < 5.0  # 2 cores shared with the attack
                    time.sleep(0.5)
            assert server.coordinator.wait_finished(timeout=150), "honest rounds did not finish"
            stalls = [s.stalls for s in (s0, s1, s2, s3)]
        # the server closes idle streams itself (first-message timeout), again and again
        eventually(lambda: idle.closed.get("DEADLINE_EXCEEDED", 0) >= 256, timeout=30)
        closed_idle = dict(idle.closed)
    rounds = server.store.list_rounds(server.config.model)
    assert [r.status for r in rounds] == ["completed"] * 3
    assert all(r.participants == 5 for r in rounds)
    honest_ids = {d.client._creds.device_id for d in honest}
    assert len(honest_ids) == 5
    assert all(n >= 1 for n in stalls), stalls  # the attackers were in the cohorts
    assert set(closed_idle) == {"DEADLINE_EXCEEDED"}, closed_idle
    deadline = time.monotonic() + 10
    while len(server.coordinator._staging) < 4:  # every buffer came back
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert DeviceClient  # the honest devices are the unmodified client


# ---------------------------------------------------------------------- Pending, unit
def test_a_pending_call_runs_again_when_its_change_is_announced_and_expires_clearly() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from server.errors import Change, ErrorKind, FederationError, Pending
    from server.services.aio import Changes, Runner

    async def scenario() -> None:
        pool = ThreadPoolExecutor(2)
        changes = Changes(asyncio.get_running_loop())
        runner = Runner(pool, changes)
        attempts: list[float] = []
        phase_open = True

        def phase_call() -> str:
            attempts.append(time.monotonic())
            if phase_open:
                raise Pending(Change.PHASE, 30.0)
            return "neighbours"

        call = asyncio.create_task(runner.call(phase_call))
        await asyncio.sleep(0.2)
        assert len(attempts) == 1  # waiting costs no thread and no retries
        changes.announce(Change.STAGING)  # another change does not wake it
        await asyncio.sleep(0.1)
        assert len(attempts) == 1
        phase_open = False
        announced = time.monotonic()
        changes.announce(Change.PHASE)  # from any thread; here the loop's own
        assert await asyncio.wait_for(call, 5) == "neighbours"
        assert attempts[-1] - announced < 1.0  # woken by the change, not the 5 s re-check

        def never_ready() -> str:
            raise Pending(Change.STAGING, 0.3, "server busy staging uploads; retry")

        started = time.monotonic()
        with pytest.raises(FederationError) as err:
            await runner.call(never_ready)
        assert err.value.kind is ErrorKind.UNAVAILABLE
        assert err.value.message == "server busy staging uploads; retry"
        assert 0.3 <= time.monotonic() - started < 2.0
        pool.shutdown()

    asyncio.run(scenario())


def test_on_loop_calls_run_on_the_loop_and_in_the_pool_only_when_their_lock_is_taken() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from server.errors import WouldWait, call_without_waiting, hold
    from server.services.aio import Changes, Runner

    lock = threading.Condition(threading.RLock())
    state: list[str] = []

    def phase_call(name: str) -> str:
        with hold(lock):  # the first lock: only tried on the loop
            state.append(name)
            with hold(lock):  # held: taken again without a WouldWait
                pass
        return threading.current_thread().name

    # Outside the transport, hold is a plain `with lock`.
    assert phase_call("plain") == threading.current_thread().name
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            taken.set()
            release.wait(10)

    other = threading.Thread(target=holder)
    other.start()
    assert taken.wait(5)
    with pytest.raises(WouldWait):
        call_without_waiting(phase_call, "refused")
    assert state == ["plain"]  # nothing changed

    async def scenario() -> None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="pool")
        runner = Runner(pool, Changes(asyncio.get_running_loop()))
        loop_thread = threading.current_thread().name
        # The lock is taken: the call goes to the pool and waits there, not on the loop.
        in_pool = asyncio.create_task(runner.call(phase_call, "waited", on_loop=True))
        await asyncio.sleep(0.2)
        assert not in_pool.done() and state == ["plain"]  # the loop is not blocked
        release.set()
        assert (await asyncio.wait_for(in_pool, 5)).startswith("pool")
        other.join(5)
        # The lock is free: the call runs on the loop itself.
        assert await runner.call(phase_call, "inline", on_loop=True) == loop_thread
        # Unmarked calls keep running in the pool.
        assert (await runner.call(phase_call, "pooled")).startswith("pool")
        pool.shutdown()

    asyncio.run(scenario())
    assert state == ["plain", "waited", "inline", "pooled"]


def test_hold_all_on_the_loop_only_tries_each_lock_and_keeps_none_when_one_is_taken() -> None:
    from server.errors import WouldWait, call_without_waiting, hold_all

    session, coordinator = threading.RLock(), threading.Condition(threading.RLock())
    state: list[str] = []

    def upload_step(name: str) -> None:
        with hold_all(session, coordinator):  # an upload's session lock, then the round's
            state.append(name)
            with coordinator:  # held: taken again without waiting
                pass

    upload_step("plain")  # outside the transport: both locks, waiting as usual
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:  # a long holder of the second lock (the unmasking, say)
        with coordinator:
            taken.set()
            release.wait(10)

    other = threading.Thread(target=holder)
    other.start()
    assert taken.wait(5)
    with pytest.raises(WouldWait):
        call_without_waiting(upload_step, "refused")
    assert state == ["plain"]  # nothing changed
    # The first lock was given back: another thread takes it at once.
    grabbed: list[bool] = []

    def grab() -> None:
        grabbed.append(session.acquire(timeout=1))
        if grabbed[-1]:
            session.release()

    grabber = threading.Thread(target=grab)
    grabber.start()
    grabber.join(5)
    assert grabbed == [True]
    release.set()
    other.join(5)
    call_without_waiting(upload_step, "inline")  # both free: taken, and the step runs
    assert state == ["plain", "inline"]


def test_secure_aggregation_phase_calls_are_the_ones_run_on_the_loop() -> None:
    from server.services.aio import _ON_LOOP
    from server.services.federation import FederationServicer

    marked = {
        name
        for name in dir(FederationServicer)
        if getattr(getattr(FederationServicer, name), _ON_LOOP, False)
    }
    # Unmask stays in the pool: the last one unmasks the sum (~0.2 s under the lock).
    assert marked == {"AdvertiseKeys", "ShareKeys", "GetUnmaskRequest", "ConfirmSurvivors"}


def test_the_device_waits_at_least_the_servers_retry_hint(tmp_path) -> None:
    from client.runtime import ClientConfig

    client = DeviceClient(
        ClientConfig(server="127.0.0.1:1", state_dir=str(tmp_path / "dev"), max_backoff=0.5),
        None,
    )
    waits: list[float] = []
    client.stop.wait = lambda delay=None: waits.append(delay) or False  # type: ignore[method-assign]
    try:
        for _ in range(20):
            client._handle_error(_Refused(((RETRY_AFTER_KEY, "1500"),)))
        client._handle_error(_Refused(()))  # no hint: its own backoff
        # A server whose database is away answers UNAVAILABLE with a hint: honoured too.
        for _ in range(5):
            client._handle_error(
                _Refused(((RETRY_AFTER_KEY, "2000"),), grpc.StatusCode.UNAVAILABLE)
            )
        client._handle_error(_Refused((), grpc.StatusCode.UNAVAILABLE))
    finally:
        client.close()
    assert all(1.5 <= w <= 2.25 for w in waits[:20]), waits  # hint x uniform(1, 1.5)
    assert len(set(waits[:20])) > 1  # jittered: devices refused together do not return together
    assert waits[20] <= 0.5
    assert all(2.0 <= w <= 3.0 for w in waits[21:26]), waits[21:26]
    assert waits[26] <= 0.5


def test_a_returned_staging_buffer_wakes_one_waiting_upload_and_is_never_lost() -> None:
    from server.errors import Change
    from server.services.aio import Changes

    async def scenario() -> None:
        changes = Changes(asyncio.get_running_loop())
        marks = [changes.marks()[Change.STAGING] for _ in range(3)]
        woken: list[int] = []

        async def upload(i: int) -> None:
            await changes.wait(Change.STAGING, marks[i], 5.0)
            woken.append(i)

        tasks = [asyncio.create_task(upload(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        changes.announce(Change.STAGING)
        await asyncio.sleep(0.1)
        assert woken == [0]  # one buffer, one upload: the one waiting longest
        tasks[1].cancel()  # a stream that died while waiting takes no wake-up with it
        await asyncio.sleep(0.05)
        changes.announce(Change.STAGING)
        await asyncio.sleep(0.1)
        assert woken == [0, 2]
        # a buffer returned between the domain's answer and the wait is not missed
        late = changes.marks()[Change.STAGING]
        changes.announce(Change.STAGING)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await changes.wait(Change.STAGING, late, 5.0)
        assert time.monotonic() - started < 0.5

    asyncio.run(scenario())


def test_a_client_that_stops_reading_a_download_loses_its_call_not_the_servers_slots(
    server_factory, raw_device
) -> None:
    """Downloads that are never read held their call slots forever; now for idle_s at most."""
    server = server_factory(
        params=1_000_000,  # a 4 MB model: far more than the reader's flow-control window
        eval_data="none",
        max_concurrent_rpcs=3,
        clients_per_round=3,
        min_clients=3,
        selection_window=0.2,
        stream_idle_timeout=1.0,
    )
    devices = [raw_device(server) for _ in range(3)]
    tasks = check_in_all(devices)
    readers = []
    for device in devices[:2]:
        # A small fixed window that only the application's reads would open further.
        channel = grpc.insecure_channel(
            server.address,
            options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 16)],
        )
        stub = pb_grpc.FederationStub(channel)
        request = pb.DownloadModelRequest(round_id=tasks[device.device_id].task.round_id)
        readers.append((channel, stub.DownloadModel(request, metadata=device.md, timeout=60)))
    eventually(lambda: server.guard.calls.active == 2)
    started = time.monotonic()
    eventually(lambda: server.guard.calls.active == 0, timeout=10)
    assert time.monotonic() - started < 5
    # The stalled reader, when it reads at last, learns why its stream ended.
    channel, stream = readers[0]
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "took no response message within 1 s" in err.value.details()
    # The honest device downloads the whole model meanwhile.
    honest = devices[2]
    chunks = list(
        honest.stub.DownloadModel(
            pb.DownloadModelRequest(round_id=tasks[honest.device_id].task.round_id),
            metadata=honest.md,
            timeout=30,
        )
    )
    manifest = chunks[0].header.manifest
    assert sum(len(c.data) for c in chunks[1:]) == 4 * manifest.total_elements
    for channel, _ in readers:
        channel.close()


def test_a_unary_handler_that_never_answers_gives_its_call_slot_back() -> None:
    """A handler stuck on a silent dependency: DEADLINE_EXCEEDED after call_s, slot freed."""
    from server.services.guard import GuardConfig, GuardInterceptor

    async def scenario() -> None:
        guard = GuardInterceptor(GuardConfig(max_concurrent_rpcs=1, call_s=0.5))
        stuck = asyncio.Event()

        async def hangs(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if request == b"hang":
                await stuck.wait()  # what a call on a database that went silent does
            return b"ok:" + request

        handler = grpc.method_handlers_generic_handler(
            "test.Stuck", {"Call": grpc.unary_unary_rpc_method_handler(hangs)}
        )
        server = grpc.aio.server(interceptors=[guard])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Stuck/Call")
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"hang", timeout=30)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert err.value.details() == (
                "no answer within 0.5 s: the server gave up on the call (--call-timeout); retry"
            )
            assert 0.5 <= time.monotonic() - started < 5
            assert guard.calls.active == 0
            # The only slot is free again: the next call is answered, not refused.
            assert await call(b"next", timeout=5) == b"ok:next"
        await server.stop(0)

    asyncio.run(scenario())


def test_the_call_timeout_must_exceed_the_longest_legitimate_wait() -> None:
    from server.app import ServerConfig

    with pytest.raises(ValueError, match="--call-timeout 30 must exceed"):
        ServerConfig(secagg_phase_timeout=60.0, call_timeout=30.0).guard_config()
    assert ServerConfig(secagg_phase_timeout=60.0, call_timeout=66.0).guard_config().call_s == 66


def _database_down(kind: str) -> Exception:
    import psycopg
    from sqlalchemy import exc

    if kind == "psycopg":  # escaped unwrapped from a connection that died
        return psycopg.OperationalError("server closed the connection unexpectedly")
    if kind == "sqlalchemy":
        return exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    return exc.DBAPIError("SELECT 1", {}, Exception("reset"), connection_invalidated=True)


@pytest.mark.parametrize("kind", ["psycopg", "sqlalchemy", "invalidated"])
def test_a_database_outage_is_unavailable_with_a_retry_hint_in_every_kind_of_call(
    kind: str,
) -> None:
    """One place maps the store's outage errors for every servicer; other errors stay errors."""
    from server.services.guard import STORE_RETRY_AFTER_MS, GuardConfig, GuardInterceptor

    async def scenario() -> None:
        guard = GuardInterceptor(GuardConfig())

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if request == b"bug":
                raise KeyError("a bug, not an outage")
            raise _database_down(kind)

        async def download(request: bytes, context: grpc.aio.ServicerContext):
            yield b"header"
            raise _database_down(kind)

        async def upload(requests, context: grpc.aio.ServicerContext) -> bytes:
            async for _ in requests:
                pass
            raise _database_down(kind)

        handler = grpc.method_handlers_generic_handler(
            "test.Db",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Download": grpc.unary_stream_rpc_method_handler(download),
                "Upload": grpc.stream_unary_rpc_method_handler(upload),
            },
        )
        server = grpc.aio.server(interceptors=[guard])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def outcome(call) -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                return err.value

            async def chunks():
                yield b"a"
                yield b"b"

            async def drain(stream) -> None:
                async for _ in stream:
                    pass

            calls = [
                channel.unary_unary("/test.Db/Unary")(b"x", timeout=10),
                drain(channel.unary_stream("/test.Db/Download")(b"x", timeout=10)),
                channel.stream_unary("/test.Db/Upload")(chunks(), timeout=10),
            ]
            for call in calls:
                err = await outcome(call)
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert err.details() == (
                    f"the server's database is unavailable; retry in {STORE_RETRY_AFTER_MS} ms"
                )
                assert (RETRY_AFTER_KEY, str(STORE_RETRY_AFTER_MS)) in tuple(
                    err.trailing_metadata()
                )
            bug = await outcome(channel.unary_unary("/test.Db/Unary")(b"bug", timeout=10))
            assert bug.code() == grpc.StatusCode.UNKNOWN  # not disguised as an outage
            assert guard.calls.active == 0
        await server.stop(0)

    asyncio.run(scenario())
