"""Federated evaluation over real gRPC: evaluation-only rounds, their sums, DP and refusals.

Devices are real `DeviceClient` loops holding a digits shard split into training
data and their own held-out part; the reference counts are computed here,
independently, with the stored version's weights and plain torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from client.datasource import DeviceData
from client.runtime import ClientConfig, DeviceClient, load_partition
from common.data import Dataset
from common.fedeval import EVAL_COUNTS, eval_clip_norm, evaluation_fixed_point
from common.models import build_model
from common.pb import admin_pb2 as apb
from common.pb import admin_pb2_grpc
from common.pb import federation_pb2 as pb
from common.privacy import Mechanism, Spend, epsilon_of
from common.tensors import load_flat_into_module

HELD_OUT = 40  # the last examples of each shard are the device's own held-out data
MAX_EXAMPLES = 30  # the per-device bound of the evaluation (below HELD_OUT: it must cut)


def _split(config: ClientConfig) -> DeviceData:
    shard = load_partition(config)
    assert isinstance(shard, Dataset)
    n = len(shard) - HELD_OUT
    return DeviceData(Dataset(shard.x[:n], shard.y[:n]), Dataset(shard.x[n:], shard.y[n:]))


class Fleet:
    """n device loops with held-out data; stops them on close."""

    def __init__(self, server: Any, n: int, tmp: Path, **overrides: Any) -> None:
        self.threads: list[tuple[DeviceClient, threading.Thread, threading.Event]] = []
        self.data: list[DeviceData] = []
        overrides.setdefault("allow_plaintext", not server.config.secagg)
        overrides.setdefault("min_secagg_cohort", 2)
        for i in range(n):
            config = ClientConfig(
                server=server.address,
                state_dir=str(tmp / f"dev-{i}"),
                partition=i,
                num_partitions=n,
                max_wait_ms=2000,
                max_backoff=1.0,
                **overrides,
            )
            data = _split(config)
            stop = threading.Event()
            client = DeviceClient(config, data, stop)
            thread = threading.Thread(target=client.run, daemon=True)
            self.threads.append((client, thread, stop))
            self.data.append(data)
        for _, thread, _ in self.threads:
            thread.start()

    def close(self) -> None:
        for _, _, stop in self.threads:
            stop.set()
        for client, thread, _ in self.threads:
            thread.join(timeout=30)
            client.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(server: Any, n: int, **overrides: Any) -> Fleet:
        f = Fleet(server, n, tmp_path, **overrides)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def reference_counts(server: Any, version: int, heldout: Dataset) -> np.ndarray:
    """The counts one device should report for a version: computed here, from the store."""
    name = server.config.model
    model = build_model(server.store.get_model(name).spec)
    load_flat_into_module(model, server.store.load_version(name, version))
    model.eval()
    x, y = heldout.x[:MAX_EXAMPLES], heldout.y[:MAX_EXAMPLES]
    with torch.no_grad():
        correct = int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return np.array([len(y), correct, correct])  # no personal head: personalized = global


def evaluations(server: Any) -> list[Any]:
    return [r for r in server.store.list_rounds(server.config.model) if r.metrics.get("evaluation")]


def fast(**overrides: Any) -> dict[str, Any]:
    base = dict(
        clients_per_round=3,
        min_clients=3,
        selection_window=10.0,
        secagg_phase_timeout=5.0,
        eval_data="none",
        eval_max_examples=MAX_EXAMPLES,
    )
    return {**base, **overrides}


def test_secure_evaluation_round_sums_exactly_and_the_server_sees_only_the_sum(
    server_factory, fleet
) -> None:
    recorded: list[tuple[str, np.ndarray]] = []
    server = server_factory(
        recorder=lambda label, v: recorded.append((label, v)),
        **fast(secagg=True, rounds=1, eval_every=1),
    )
    devices = fleet(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    [rnd] = evaluations(server)
    assert rnd.status == "evaluated" and rnd.base_version == 2 and rnd.result_version is None
    expected = sum(reference_counts(server, 2, d.heldout) for d in devices.data)
    got = [rnd.metrics[f"eval_{c}"] for c in EVAL_COUNTS]
    assert got == expected.tolist()  # exact, not approximately
    assert rnd.metrics["federated_accuracy"] == expected[1] / expected[0]
    assert rnd.metrics["eval_devices"] == 3 and rnd.metrics["secagg"] == 1.0
    # What the aggregation path received of this round: masked vectors and the sum only.
    mine = [(label, v) for label, v in recorded if v.size == len(EVAL_COUNTS) + 1]
    assert any(label == "unmasked-sum" for label, _ in mine)
    singles = [
        np.append(reference_counts(server, 2, d.heldout), 1).astype(np.uint32) for d in devices.data
    ]
    for label, vector in mine:
        for single in singles:
            assert not np.array_equal(vector, single), label
    # The records of the round hold no device's counts either.
    for p in server.store.round_participants(rnd.id):
        assert p.status == "uploaded" and p.num_examples == 0 and not p.metrics
    # The version was not changed by evaluating it; the training round's clear metrics
    # carry no held-out counts under secure aggregation.
    assert server.store.get_model(server.config.model).current_version == 2
    training = [r for r in server.store.list_rounds(server.config.model) if r.number == 1]
    for p in server.store.round_participants(training[0].id):
        assert not any(k.startswith("heldout_") for k in p.metrics)


def test_distributed_dp_evaluation_charges_the_ledger_with_the_accountants_epsilon(
    server_factory, fleet
) -> None:
    server = server_factory(
        **fast(
            secagg=True,
            rounds=1,
            eval_every=1,
            dp="distributed",
            dp_noise_multiplier=1.0,
            dp_clip_norm=1.0,
            dp_min_contributors=2,
        )
    )
    devices = fleet(server, 3, max_user_epsilon=1000.0)
    assert server.coordinator.wait_finished(timeout=90)
    [rnd] = evaluations(server)
    assert rnd.status == "evaluated"
    ledger = server.store.privacy_ledger(server.config.model)
    assert [r.round_number for r in ledger] == [1, 2]
    train, evaluation = ledger
    fp = evaluation_fixed_point(MAX_EXAMPLES, 3, 1.0, 2)
    spend = Spend(Mechanism.SKELLAM, 1.0, l2_sensitivity=fp.sensitivity, dimension=3)
    assert evaluation.round_id == rnd.id and evaluation.clip_norm == eval_clip_norm(MAX_EXAMPLES)
    assert evaluation.sensitivity == pytest.approx(fp.sensitivity)
    from server.privacy import spend_of

    expected = epsilon_of([spend_of(train), spend], evaluation.delta)
    assert evaluation.epsilon == pytest.approx(expected, rel=1e-9)
    assert rnd.metrics["dp_epsilon"] == pytest.approx(expected, rel=1e-9)
    # Each device recorded the evaluation's spend in its own ledger, before sending.
    for client, _, _ in devices.threads:
        entries = [e for e in client.ledger.entries if e.round_id == rnd.id]
        assert len(entries) == 1
    # The noisy sums are near the exact ones: noise std sqrt(3 v) per count.
    exact = sum(reference_counts(server, 2, d.heldout) for d in devices.data)
    std = float(np.sqrt(3 * fp.noise_variance))
    assert abs(rnd.metrics["eval_examples"] - exact[0]) < 8 * std
    assert rnd.metrics["eval_examples"] != exact[0] or rnd.metrics["eval_correct"] != exact[1]


def test_a_device_declines_an_evaluation_over_its_epsilon_limit(server_factory, fleet) -> None:
    server = server_factory(
        **fast(
            secagg=True,
            rounds=1,
            eval_every=1,
            dp="distributed",
            dp_noise_multiplier=1.0,
            dp_min_contributors=2,
            round_deadline=8.0,
        )
    )
    # One training round at z = 1 costs about epsilon 4-5; a limit of 6 leaves no room for two.
    devices = fleet(server, 3, max_user_epsilon=6.0)
    assert server.coordinator.wait_finished(timeout=90)
    [rnd] = [r for r in server.store.list_rounds(server.config.model) if r.number == 2]
    assert rnd.status == "failed"
    notes = [p.note for p in server.store.round_participants(rnd.id)]
    assert notes and all("privacy budget" in n for n in notes), notes
    assert [r.round_number for r in server.store.privacy_ledger(server.config.model)] == [1]
    for client, _, _ in devices.threads:
        assert not [e for e in client.ledger.entries if e.round_id == rnd.id]


def test_plain_evaluation_needs_the_plaintext_opt_in_and_sums_the_counts(
    server_factory, fleet
) -> None:
    server = server_factory(**fast(secagg=False, rounds=1, eval_every=1))
    devices = fleet(server, 3)
    assert server.coordinator.wait_finished(timeout=90)
    [rnd] = evaluations(server)
    expected = sum(reference_counts(server, 2, d.heldout) for d in devices.data)
    assert [rnd.metrics[f"eval_{c}"] for c in EVAL_COUNTS] == expected.tolist()


def _admin(server: Any) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.address)
    return channel, admin_pb2_grpc.AdminStub(channel)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def test_evaluate_model_refuses_bad_input_and_changes_nothing(server_factory, raw_device) -> None:
    server = server_factory(**fast(secagg=False))
    channel, admin = _admin(server)
    name = server.config.model
    try:
        before = (server.store.list_rounds(name), server.coordinator.pending_evaluations)
        bad = [
            (apb.EvaluateModelRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
            (apb.EvaluateModelRequest(name=name, version=99), grpc.StatusCode.NOT_FOUND),
            (apb.EvaluateModelRequest(name=name, version=-1), grpc.StatusCode.INVALID_ARGUMENT),
            (apb.EvaluateModelRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for request, code in bad:
            assert _code(lambda r=request: admin.EvaluateModel(r, timeout=10)) == code
        admin.CreateModel(apb.CreateModelRequest(name="other"), timeout=10)
        admin.PauseModel(apb.PauseModelRequest(name=name), timeout=10)
        paused = apb.EvaluateModelRequest(name=name, version=1)
        assert _code(lambda: admin.EvaluateModel(paused, timeout=10)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        admin.DeleteModel(apb.DeleteModelRequest(name="other"), timeout=10)
        gone = apb.EvaluateModelRequest(name="other")
        assert _code(lambda: admin.EvaluateModel(gone, timeout=10)) == grpc.StatusCode.NOT_FOUND
        after = (server.store.list_rounds(name), server.coordinator.pending_evaluations)
        assert [r.id for r in after[0]] == [r.id for r in before[0]] and after[1] == before[1]
        admin.ResumeModel(apb.ResumeModelRequest(name=name), timeout=10)
        ok = admin.EvaluateModel(apb.EvaluateModelRequest(name=name), timeout=10)
        assert (ok.version, ok.queued) == (1, 1)
        assert server.coordinator.pending_evaluations == [1]
        # Counts sent to a training round, or out of bounds, are refused.
        device = raw_device(server)
        refused = pb.ReportEvaluationRequest(round_id="x", counts=[1, 1, 1])
        assert _code(lambda: device.stub.ReportEvaluation(refused, metadata=device.md)) == (
            grpc.StatusCode.NOT_FOUND
        )
    finally:
        channel.close()


def test_cli_schedules_an_evaluation_that_devices_run_and_reports_it(server_factory, fleet) -> None:
    import subprocess

    from tests.test_cli import XENO, _env

    server = server_factory(**fast(secagg=False))
    name = server.config.model

    def admin(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*XENO, "admin", "--server", server.address, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )

    out = admin("models", "evaluate", "--model", name, "--version", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"model {name}: evaluation of version 1 scheduled (1 queued)")
    devices = fleet(server, 3)
    end = time.monotonic() + 60
    while time.monotonic() < end and not evaluations(server):
        time.sleep(0.1)
    [rnd] = evaluations(server)
    assert rnd.number == 1 and rnd.base_version == 1  # before any training round
    expected = sum(reference_counts(server, 1, d.heldout) for d in devices.data)
    assert [rnd.metrics[f"eval_{c}"] for c in EVAL_COUNTS] == expected.tolist()
    out = admin("evaluations", "--model", name)
    assert out.returncode == 0, out.stderr
    assert f"{expected[1] / expected[0]:.4f}" in out.stdout


def test_devices_without_the_plaintext_opt_in_decline_a_plain_evaluation(
    server_factory, fleet
) -> None:
    server = server_factory(**fast(secagg=False, round_deadline=8.0))
    server.coordinator.schedule_evaluation(1)
    fleet(server, 3, allow_plaintext=False)
    end = time.monotonic() + 60
    rounds: list[Any] = []
    while time.monotonic() < end and not rounds:
        rounds = [r for r in server.store.list_rounds(server.config.model) if r.ended_at]
        time.sleep(0.1)
    [rnd] = rounds[:1]
    assert rnd.status == "failed" and "evaluation" not in rnd.metrics
    notes = [p.note for p in server.store.round_participants(rnd.id)]
    assert notes and all("--allow-plaintext" in n for n in notes), notes


def test_counts_and_encoding_bounds_are_checked() -> None:
    from common.fedeval import check_counts

    assert check_counts([30, 20, 25], 30) == [30, 20, 25]
    for bad in ([31, 1, 1], [5, 6, 0], [5, 1], [-1, 0, 0]):
        with pytest.raises(ValueError):
            check_counts(bad, 30)
    # The exact encoding: scale 1, weight 1, the clip bounds one device's counts vector.
    fp = evaluation_fixed_point(30, 5)
    assert (fp.scale, fp.max_weight, fp.clip_norm) == (1.0, 1, eval_clip_norm(30))
    rng = np.random.default_rng(0)
    assert fp.encode(np.array([30.0, 20.0, 25.0]), 1, rng).tolist() == [30, 20, 25, 1]
    with pytest.raises(ValueError, match="overflow"):
        evaluation_fixed_point(1_000_000, 5000)
