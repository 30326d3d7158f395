"""Secure aggregation over real gRPC: exact sums, dropouts in every phase, a curious server."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from client.secagg import SecAggDevice, SecAggPolicy, SecAggProtocolError, check_unmask_request
from client.storage import IdentityStore, LocalStore
from common.atrest import Sealer
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc
from common.quantize import FixedPoint, clip_l2

# These tests exercise the protocol's mechanics with 3-5 devices; the attack tests
# (test_secagg_attacks.py) run devices with their default policy.
SMALL_COHORTS = SecAggPolicy(min_cohort=2)


class GoneError(Exception):
    """The device vanished (simulated crash) before a call."""


class DroppingDevice(SecAggDevice):
    """The real device protocol, which stops for good right before one RPC."""

    def __init__(
        self,
        *args,
        stop_before: str | None = None,
        pause_before: str | None = None,
        gate: threading.Event | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stop_before = stop_before
        self.pause_before = pause_before
        self.gate = gate

    def _call(self, method: str, request: object) -> object:
        if method == self.stop_before:
            raise GoneError(method)
        if method == self.pause_before and self.gate is not None:
            assert self.gate.wait(60), "the gate never opened"
        return super()._call(method, request)

    def _upload(self, masked: np.ndarray) -> None:
        if self.stop_before == "UploadMasked":
            raise GoneError("UploadMasked")
        self.masked = masked
        super()._upload(masked)


@dataclass
class Harness:
    server: object
    tmp: Path
    devices: list[tuple[str, str, IdentityStore]] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)

    def enroll(self, n: int) -> None:
        for i in range(n):
            store = IdentityStore(LocalStore(self.tmp / f"dev{i}", Sealer(bytes(32))))
            identity = store.load_or_create()
            channel = grpc.insecure_channel(self.server.address)
            self.channels.append(channel)
            stub = federation_pb2_grpc.FederationStub(channel)
            resp = stub.Register(
                pb.RegisterRequest(
                    identity_public_key=identity.public_key().public_bytes(
                        Encoding.Raw, PublicFormat.Raw
                    )
                )
            )
            self.devices.append((resp.device_id, resp.token, store))

    def stub(self, i: int) -> federation_pb2_grpc.FederationStub:
        return federation_pb2_grpc.FederationStub(self.channels[i])

    def md(self, i: int) -> tuple[tuple[str, str], ...]:
        device_id, token, _ = self.devices[i]
        return (("x-xeno-device-id", device_id), ("authorization", f"Bearer {token}"))

    def tasks(self) -> list[pb.Task]:
        out: list[pb.Task | None] = [None] * len(self.devices)

        def poll(i: int) -> None:
            resp = self.stub(i).CheckIn(pb.CheckInRequest(max_wait_ms=10_000), metadata=self.md(i))
            out[i] = resp.task

        threads = [threading.Thread(target=poll, args=(i,)) for i in range(len(self.devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(t is not None and t.secagg.enabled for t in out)
        return out  # type: ignore[return-value]

    def run_round(
        self,
        updates: list[np.ndarray],
        weights: list[int],
        stop_before: dict[int, str] | None = None,
        pause_before: dict[int, str] | None = None,
        gate: threading.Event | None = None,
    ) -> tuple[list[DroppingDevice], dict[int, BaseException]]:
        tasks = self.tasks()
        stop_before = stop_before or {}
        pause_before = pause_before or {}
        devices = [
            DroppingDevice(
                self.stub(i),
                self.md(i),
                self.devices[i][0],
                self.devices[i][2].load_or_create(),
                self.devices[i][2],
                tasks[i],
                timeout=lambda: 60.0,
                rng=np.random.default_rng(i),
                stop_before=stop_before.get(i),
                pause_before=pause_before.get(i),
                gate=gate,
                policy=SMALL_COHORTS,
            )
            for i in range(len(self.devices))
        ]
        errors: dict[int, BaseException] = {}

        def go(i: int) -> None:
            try:
                devices[i].run(updates[i], weights[i])
            except BaseException as exc:
                errors[i] = exc

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return devices, errors

    def close(self) -> None:
        for c in self.channels:
            c.close()


@pytest.fixture
def harness(server_factory, tmp_path):
    made: list[Harness] = []

    def make(n: int, recorder=None, **overrides) -> Harness:
        overrides.setdefault("clients_per_round", n)
        overrides.setdefault("min_clients", 2)
        # Phases close as soon as every device answered; the timeout only ends a phase a
        # device dropped out of. 2 s was too short for honest masking and uploading on a
        # loaded 2-core machine (the upload phase closed empty in 1 of 6 runs).
        overrides.setdefault("secagg_phase_timeout", 5.0)
        overrides.setdefault("eval_data", "none")
        # every test's n devices check in together: the round starts the moment all n are
        # in (the window only matters with fewer, so a slow thread is never left out)
        overrides.setdefault("selection_window", 10.0)
        server = server_factory(recorder=recorder, secagg=True, **overrides)
        h = Harness(server, tmp_path)
        h.enroll(n)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def wait_version(server, version: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.store.get_model(server.config.model).current_version >= version:
            return
        rounds = server.store.list_rounds(server.config.model)
        if rounds and rounds[-1].status == "failed":
            return
        time.sleep(0.05)


def expected_mean(fp: FixedPoint, updates, weights, included) -> np.ndarray:
    total = sum(
        clip_l2(updates[i], fp.clip_norm)[0].astype(np.float64) * min(weights[i], fp.max_weight)
        for i in included
    )
    return total / sum(min(weights[i], fp.max_weight) for i in included)


def model_delta(server) -> np.ndarray:
    name = server.config.model
    v = server.store.get_model(name).current_version
    return server.store.load_version(name, v).astype(np.float64) - server.store.load_version(
        name, v - 1
    )


def make_updates(server, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    d = server.coordinator.model.manifest.total_elements
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, d).astype(np.float32) for _ in range(n)], [
        int(w) for w in rng.integers(20, 300, n)
    ]


def test_server_learns_only_the_sum_which_is_exact(harness) -> None:
    recorded: list[tuple[str, np.ndarray]] = []
    h = harness(4, recorder=lambda label, v: recorded.append((label, v)))
    updates, weights = make_updates(h.server, 4)
    devices, errors = h.run_round(updates, weights)
    assert not errors, errors
    wait_version(h.server, 2)
    fp = devices[0].fixed_point
    # the new global model moved by exactly the weighted mean, up to the quantization bound
    delta = model_delta(h.server)
    mean = expected_mean(fp, updates, weights, range(4))
    bound = fp.error_bound(4) / (sum(weights) / fp.max_weight) + 1e-6
    assert np.max(np.abs(delta - mean)) <= bound
    # every vector the aggregation path received or stored is masked or a sum
    encoded = [
        fp.encode(updates[i], weights[i], np.random.default_rng(i)).astype(np.float64)
        for i in range(4)
    ]
    assert recorded, "the recorder saw nothing"
    for label, vector in recorded:
        v = vector.astype(np.float64)
        for i, e in enumerate(encoded):
            assert not np.array_equal(vector, e.astype(np.uint32)), (label, i)
            if label.startswith("upload") or label == "sum":
                corr = np.corrcoef(v[:-1], e[:-1])[0, 1]
                assert abs(corr) < 0.1, (label, i, corr)


@pytest.mark.parametrize(
    ("phase", "included"),
    [
        ("ShareKeys", [0, 1, 2, 3]),  # advertised keys, then vanished
        ("UploadMasked", [0, 1, 2, 3]),  # shared keys, then vanished
        ("GetUnmaskRequest", [0, 1, 2, 3, 4]),  # uploaded, then vanished: still counted
        ("Unmask", [0, 1, 2, 3, 4]),  # vanished while unmasking: still counted
    ],
)
def test_round_survives_a_dropout_in_each_phase(harness, phase: str, included: list[int]) -> None:
    h = harness(5)
    updates, weights = make_updates(h.server, 5, seed=1)
    devices, errors = h.run_round(updates, weights, stop_before={4: phase})
    # Device 4 vanishes right before `phase`; with "Unmask" the others may have completed
    # the round before it even asked, and then it was told so instead of being asked.
    if phase == "Unmask" and 4 not in errors:
        assert devices[4].report.completed_version == 2
    else:
        assert set(errors) == {4} and isinstance(errors[4], GoneError), errors
    wait_version(h.server, 2)
    [rnd] = h.server.store.list_rounds(h.server.config.model)
    assert rnd.status == "completed", rnd.failure_reason
    fp = devices[0].fixed_point
    mean = expected_mean(fp, updates, weights, included)
    bound = fp.error_bound(5) / (sum(weights[i] for i in included) / fp.max_weight) + 1e-6
    assert np.max(np.abs(model_delta(h.server) - mean)) <= bound


@pytest.mark.parametrize("phase", ["GetUnmaskRequest", "ConfirmSurvivors", "Unmask"])
def test_a_device_that_uploaded_learns_its_round_completed_without_its_shares(
    harness, phase: str
) -> None:
    """The race of a slow device: the others unmask the sum and the round closes first."""
    h = harness(5, min_clients=5)  # complete graph, threshold 3: four devices' shares suffice
    updates, weights = make_updates(h.server, 5, seed=2)
    gate = threading.Event()

    def open_when_completed() -> None:
        wait_version(h.server, 2)
        gate.set()

    opener = threading.Thread(target=open_when_completed)
    opener.start()
    devices, errors = h.run_round(updates, weights, pause_before={4: phase}, gate=gate)
    opener.join()
    assert not errors, errors
    assert gate.is_set()
    # the late device got the distinct answer, with the version its update went into
    assert devices[4].report.completed_version == 2
    [rnd] = h.server.store.list_rounds(h.server.config.model)
    assert rnd.status == "completed" and rnd.participants == 5
    fp = devices[0].fixed_point
    mean = expected_mean(fp, updates, weights, range(5))
    bound = fp.error_bound(5) / (sum(weights) / fp.max_weight) + 1e-6
    assert np.max(np.abs(model_delta(h.server) - mean)) <= bound
    # asking again gives the same answer; a device whose update is not in the sum gets none
    again = h.stub(4).GetUnmaskRequest(
        pb.GetUnmaskRequestRequest(round_id=devices[4].round_id), metadata=h.md(4)
    )
    assert again.round_completed and again.completed_version == 2 and not again.survivors


def test_a_device_without_an_upload_is_not_told_the_round_completed(harness) -> None:
    h = harness(5)
    updates, weights = make_updates(h.server, 5, seed=3)
    devices, errors = h.run_round(updates, weights, stop_before={4: "UploadMasked"})
    assert set(errors) == {4}
    wait_version(h.server, 2)
    assert h.server.store.get_model(h.server.config.model).current_version == 2
    for call, request in [
        ("GetUnmaskRequest", pb.GetUnmaskRequestRequest(round_id=devices[4].round_id)),
        ("Unmask", pb.UnmaskSharesRequest(round_id=devices[4].round_id)),
    ]:
        _expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            getattr(h.stub(4), call),
            request,
            metadata=h.md(4),
            match="is closed",
        )


def test_a_device_of_a_failed_round_is_told_it_is_closed(harness) -> None:
    h = harness(5)  # threshold 3: three devices gone before uploading fail the round
    updates, weights = make_updates(h.server, 5, seed=4)
    devices, errors = h.run_round(
        updates, weights, stop_before={2: "UploadMasked", 3: "UploadMasked", 4: "UploadMasked"}
    )
    assert set(errors) == {0, 1, 2, 3, 4}
    wait_version(h.server, 2)
    [rnd] = h.server.store.list_rounds(h.server.config.model)
    assert rnd.status == "failed"
    for i in (0, 1):  # they uploaded, but there is no completed round to report
        assert devices[i].report.completed_version == 0
        _expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            h.stub(i).GetUnmaskRequest,
            pb.GetUnmaskRequestRequest(round_id=devices[i].round_id),
            metadata=h.md(i),
        )


def test_round_fails_cleanly_below_threshold(harness) -> None:
    h = harness(5)  # degree 4, threshold 3
    updates, weights = make_updates(h.server, 5)
    _, errors = h.run_round(
        updates, weights, stop_before={2: "UploadMasked", 3: "UploadMasked", 4: "UploadMasked"}
    )
    assert {2, 3, 4} <= set(errors)
    wait_version(h.server, 2)
    [rnd] = h.server.store.list_rounds(h.server.config.model)
    assert rnd.status == "failed" and "needed" in rnd.failure_reason
    assert h.server.store.get_model(h.server.config.model).current_version == 1


def test_honest_device_refuses_to_reveal_both_shares(harness, monkeypatch) -> None:
    h = harness(3)
    coordinator = h.server.coordinator
    honest = coordinator.unmask_request

    def curious(device_id: str, round_id: str):
        survivors, _dropped, total, everyone = honest(device_id, round_id)
        others = [d for d in survivors if d != device_id]
        # asks for the mask keys of devices that did upload
        return survivors, others, total, everyone

    monkeypatch.setattr(coordinator, "unmask_request", curious)
    updates, weights = make_updates(h.server, 3)
    _, errors = h.run_round(updates, weights)
    assert len(errors) == 3
    assert all(isinstance(e, SecAggProtocolError) and "both" in str(e) for e in errors.values())
    # nobody revealed anything, so the round cannot complete
    assert not coordinator._round or not coordinator._round.secagg.revealed


def test_unmask_request_checks() -> None:
    check_unmask_request("a", ["a", "b"], ["c"], {"b", "c"})
    with pytest.raises(SecAggProtocolError, match="both"):
        check_unmask_request("a", ["a", "b"], ["b"], {"b", "c"})
    with pytest.raises(SecAggProtocolError, match="did not share"):
        check_unmask_request("a", ["a", "z"], [], {"b"})
    with pytest.raises(SecAggProtocolError, match="survivor"):
        check_unmask_request("a", ["b"], [], {"b"})


def _expect(code, fn, *args, match="", **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    assert err.value.code() == code, err.value.details()
    assert match in err.value.details(), err.value.details()


def test_bad_secagg_input_is_refused_and_the_round_completes(harness) -> None:
    from common.secagg import generate_keypair, keys_message, sign_keys

    h = harness(4)
    tasks = h.tasks()
    task = tasks[0]
    stub, md, me = h.stub(0), h.md(0), h.devices[0][0]
    enc, mask = generate_keypair(), generate_keypair()
    identity = h.devices[0][2].load_or_create()
    good_sig = sign_keys(identity, keys_message(task.round_id, me, enc.public, mask.public))

    def advertise(round_id=task.round_id, sig=good_sig, enc_pk=enc.public):
        return stub.AdvertiseKeys(
            pb.AdvertiseKeysRequest(
                round_id=round_id,
                keys=pb.RoundKeys(
                    device_id=me,
                    encryption_public_key=enc_pk,
                    mask_public_key=mask.public,
                    signature=sig,
                ),
            ),
            metadata=md,
            timeout=10,
        )

    # forged signature, keys signed for another round (a replay), unknown round
    _expect(grpc.StatusCode.INVALID_ARGUMENT, advertise, sig=bytes(64), match="signature")
    old = sign_keys(identity, keys_message("an-older-round", me, enc.public, mask.public))
    _expect(grpc.StatusCode.INVALID_ARGUMENT, advertise, sig=old, match="signature")
    _expect(grpc.StatusCode.NOT_FOUND, advertise, round_id="f" * 32)
    # a plain upload in a secure round
    _expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.UploadUpdate,
        iter([pb.UpdateChunk(header=pb.UpdateHeader(round_id=task.round_id))]),
        metadata=md,
        match="UploadMasked",
    )

    class Tamperer(DroppingDevice):
        """Sends one neighbour a share that fails its GCM tag, and tests bad phase input."""

        def _call(self, method, request):
            if method == "ShareKeys":
                wrong = pb.ShareKeysRequest()
                wrong.CopyFrom(request)
                wrong.shares.add(sender=self.me, receiver="dev-nobody", ciphertext=b"x" * 160)
                _expect(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    super()._call,
                    method,
                    wrong,
                    match="unknown peers",
                )
                blob = bytearray(request.shares[0].ciphertext)
                blob[-1] ^= 1
                request.shares[0].ciphertext = bytes(blob)
            return super()._call(method, request)

        def _upload(self, masked):
            def short():
                yield pb.MaskedChunk(
                    header=pb.MaskedHeader(
                        round_id=self.round_id,
                        total_elements=masked.size - 1,
                        total_bytes=4 * (masked.size - 1),
                    )
                )

            _expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                self.stub.UploadMasked,
                short(),
                metadata=self.metadata,
                match="elements",
            )
            super()._upload(masked)

    updates, weights = make_updates(h.server, 4)
    devices = [
        (Tamperer if i == 0 else DroppingDevice)(
            h.stub(i),
            h.md(i),
            h.devices[i][0],
            h.devices[i][2].load_or_create(),
            h.devices[i][2],
            tasks[i],
            timeout=lambda: 60.0,
            rng=np.random.default_rng(i),
            policy=SMALL_COHORTS,
        )
        for i in range(4)
    ]
    errors: dict[int, BaseException] = {}

    def go(i):
        try:
            devices[i].run(updates[i], weights[i])
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(d.report.unverifiable for d in devices) == 1  # the tampered share was caught
    wait_version(h.server, 2)
    [rnd] = h.server.store.list_rounds(h.server.config.model)
    assert rnd.status == "completed", rnd.failure_reason
    fp = devices[0].fixed_point
    mean = expected_mean(fp, updates, weights, range(4))
    bound = fp.error_bound(4) / (sum(weights) / fp.max_weight) + 1e-6
    assert np.max(np.abs(model_delta(h.server) - mean)) <= bound


def test_secagg_federation_with_real_device_loops(
    server_factory, device_threads, monkeypatch
) -> None:
    """Each version = the previous + the weighted mean of what the devices sent, to n / s."""
    sent: dict[str, list[tuple[np.ndarray, int, FixedPoint]]] = {}
    lock = threading.Lock()
    run = SecAggDevice.run

    def recording(self, update, num_examples):
        report = run(self, update, num_examples)
        with lock:  # recorded on the device, once its protocol run succeeded
            entry = (np.array(update, dtype=np.float32), num_examples, self.fixed_point)
            sent.setdefault(self.round_id, []).append(entry)
        return report

    monkeypatch.setattr(SecAggDevice, "run", recording)
    cap = 500  # the three digits shards hold 411, 395 and 632 examples: one above the cap
    server = server_factory(rounds=2, secagg=True, min_clients=3, secagg_max_weight=cap)
    devices = device_threads(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    for d in devices:  # the last device's Unmask may still be returning: let them all finish
        d.thread.join(timeout=30)
        assert not d.thread.is_alive()
    rounds = server.store.list_rounds(server.config.model)
    assert [r.status for r in rounds] == ["completed", "completed"]
    assert all(r.metrics.get("secagg") == 1.0 and r.participants == 3 for r in rounds)
    name = server.config.model
    for rnd in rounds:
        uploads = sent[rnd.id]
        assert len(uploads) == 3 and max(n for _, n, _ in uploads) > cap
        fp = uploads[0][2]
        weights = [min(n, cap) for _, n, _ in uploads]
        clipped = [np.asarray(clip_l2(u, fp.clip_norm)[0], np.float64) for u, _, _ in uploads]
        mean = sum(w * c for w, c in zip(weights, clipped, strict=True)) / sum(weights)
        new = server.store.load_version(name, rnd.result_version).astype(np.float64)
        old = server.store.load_version(name, rnd.base_version).astype(np.float64)
        bound = fp.error_bound(3) / (sum(weights) / cap) + 1e-6
        assert np.max(np.abs(new - old - mean)) <= bound


def test_device_refuses_a_threshold_below_a_majority(harness, monkeypatch) -> None:
    h = harness(3)
    coordinator = h.server.coordinator
    honest = coordinator.advertise_keys

    def lowered(*args, **kwargs):
        participants, keys, degree, _threshold = honest(*args, **kwargs)
        return participants, keys, degree, 1  # one share would reveal any secret

    monkeypatch.setattr(coordinator, "advertise_keys", lowered)
    updates, weights = make_updates(h.server, 3)
    _, errors = h.run_round(updates, weights)
    assert len(errors) == 3
    assert all(
        isinstance(e, SecAggProtocolError) and "unsafe threshold 1" in str(e)
        for e in errors.values()
    )


def test_an_unforeseen_error_while_unmasking_fails_that_round_and_the_next_completes(
    server_factory, device_threads, monkeypatch
) -> None:
    """Before: the error escaped advance(), the phase stayed open and every step retried it."""
    from server.rounds import RoundSummary
    from server.secagg import SecAggRound

    real = SecAggRound._unmask_sum
    calls: list[str] = []

    def unmask_once_broken(self: SecAggRound):  # type: ignore[no-untyped-def]
        calls.append(self.round_id)
        if len(calls) == 1:
            raise MemoryError("no room for the sum")
        return real(self)

    monkeypatch.setattr(SecAggRound, "_unmask_sum", unmask_once_broken)
    server = server_factory(secagg=True, rounds=0, min_clients=3, clients_per_round=3)
    summaries: list[RoundSummary] = []
    server.coordinator.add_listener(summaries.append)
    device_threads(server, 3)
    deadline = time.monotonic() + 120
    while not any(s.status == "completed" for s in summaries):
        assert time.monotonic() < deadline, summaries
        time.sleep(0.1)
    first = summaries[0]
    assert first.status == "failed"
    assert "closing phase unmask failed: MemoryError: no room for the sum" in first.failure_reason
    assert calls.count(first.round_id) == 1  # failed once, not retried on every step
    stored = {r.id: r.status for r in server.store.list_rounds(server.config.model)}
    assert stored[first.round_id] == "failed"
