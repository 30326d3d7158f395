"""Differential privacy end to end: DP-SGD on devices, Skellam and central noise, ledgers, budgets.

Real servers and devices over gRPC on loopback, real Opacus, real SQLite
(and PostgreSQL where the storage is under test).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from client.ledger import LedgerUnreadableError, PrivacyLedger
from client.secagg import SecAggProtocolError, check_noise
from client.storage import LocalStore
from common.atrest import Sealer
from common.models import ModelSpec
from common.pb import federation_pb2 as pb
from common.privacy import Mechanism, Spend, epsilon_of, gaussian_epsilon, skellam_epsilon
from common.quantize import FixedPoint, centered, skellam_noise
from common.tensors import Manifest, TensorInfo, to_wire
from server.privacy import UserDpMechanism, UserDpPolicy, noise_for_target
from server.rounds import RoundConfig, RoundCoordinator
from server.store import Store
from server.strategies import FedAvg

XENO = [sys.executable, "-m", "xeno.cli"]


def _report_text(server) -> str:
    """`xeno-fl admin privacy-report` as an operator reads it (wide terminal)."""
    return subprocess.run(
        [*XENO, "admin", "--server", server.address, "privacy-report"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout


def _wait_rounds(server, n: int, timeout: float = 90.0) -> None:
    assert server.coordinator.wait_finished(timeout=timeout), "federation did not finish"
    completed = [
        r for r in server.store.list_rounds(server.config.model) if r.status == "completed"
    ]
    assert len(completed) >= n


def test_central_dp_clips_every_update_and_adds_noise_of_z_c_over_n_to_the_mean(tmp_path) -> None:
    """Measured on the round's result: the mean of the clipped updates plus N(0, (z C / n)^2)."""
    d, clip, z = 20_000, 2.0, 1.0
    manifest = Manifest((TensorInfo("w", (d,)),))
    store = Store(f"sqlite:///{tmp_path}/central.db")
    store.create_schema()
    store.create_model("m", ModelSpec("mlp", {}), manifest, "fedavg", np.zeros(d, np.float32))
    devices = ["a", "b", "c", "e"]
    for dev in devices:
        store.add_device(dev, "0" * 64, {})
    now = [1000.0]
    policy = UserDpPolicy(UserDpMechanism.CENTRAL, z, clip, min_contributors=1)
    coord = RoundCoordinator(
        store,
        "m",
        FedAvg(),
        RoundConfig(
            min_clients=4,
            clients_per_round=4,
            round_deadline_s=60,
            selection_window_s=1,
            user_dp=policy,
        ),
        clock=lambda: now[0],
        rng=random.Random(0),
    )
    for dev in devices:
        coord.check_in(dev, 0)
    coord.step()
    rng = np.random.default_rng(5)
    directions = [g / np.linalg.norm(g) for g in rng.normal(size=(4, d))]
    norms = [10 * clip, 3 * clip, 0.5 * clip, 0.9 * clip]  # two above the clip, two inside
    claims = [1, 50, 400, 7]  # example counts: central DP weighs every device the same
    for dev, u, r, k in zip(devices, directions, norms, claims, strict=True):
        task = coord.task_for(dev)
        assert task is not None
        session = coord.begin_upload(dev, task.round_id, 1, manifest, 4 * d, k)
        session.add_chunk(to_wire((r * u).astype(np.float32)))
        session.commit()
    summary = coord.step()
    assert summary is not None and summary.status == "completed"
    delta = store.load_version("m", 2).astype(np.float64)
    # reference: each update scaled down to the clip if longer, weight 1 each, mean over n
    clipped = [min(r, clip) * u for u, r in zip(directions, norms, strict=True)]
    residual = delta - np.mean(clipped, axis=0)
    sigma = z * clip / len(devices)
    # updates above the clip end at the clip: no component of the residual along any update
    # direction beyond the noise (unclipped, the first would leave (10 - 1) C / n = 9 sigma)
    for u in directions:
        assert abs(float(residual @ u)) < 5 * sigma
    # the noise: mean 0, standard deviation z C / n within 5 of its standard errors
    assert abs(float(residual.mean())) < 5 * sigma / math.sqrt(d)
    assert float(residual.std()) == pytest.approx(sigma, rel=5 / math.sqrt(2 * d))
    assert store.privacy_ledger("m")[0].clip_norm == clip


# ------------------------------------------------------------------ pure parts


def test_summed_skellam_noise_has_the_target_variance() -> None:
    """n_min devices' shares add up to the promised variance (z Delta)^2 per coordinate."""
    fp = FixedPoint.for_round(1.0, 20, 1, noise_multiplier=2.0, min_contributors=10, dimension=4000)
    rng = np.random.default_rng(7)
    total = sum(skellam_noise(fp.noise_variance, 4000, rng) for _ in range(10))
    target = (2.0 * fp.sensitivity) ** 2
    assert abs(float(np.var(total)) / target - 1) < 0.08  # 4000 samples: ~2% standard error
    assert abs(float(np.mean(total))) < 4 * math.sqrt(target / 4000)


def test_noisy_encoding_never_wraps_and_decodes_to_sum_plus_noise() -> None:
    n, d = 30, 2000
    fp = FixedPoint.for_round(1.0, n, 1, noise_multiplier=5.0, min_contributors=10, dimension=d)
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 1, d).astype(np.float32) for _ in range(n)]
    total = np.zeros(d + 1, dtype=np.uint32)
    for u in updates:
        total += fp.encode(u, 1, rng)
    decoded, weight = fp.decode(total)
    assert weight == n
    clipped = sum(u / max(1.0, float(np.linalg.norm(u))) for u in updates)
    noise = decoded - clipped
    sigma_sum = math.sqrt(n * fp.noise_variance) / fp.scale
    assert abs(float(np.std(noise)) / sigma_sum - 1) < 0.1
    # the integer sum stays far inside the centred range: no wrap-around
    assert float(np.max(np.abs(centered(total[:-1])))) < 2**31 / 2


def test_ledger_persists_and_composes_like_opacus(tmp_path) -> None:
    store = LocalStore(tmp_path, Sealer(b"\x01" * 32))
    ledger = PrivacyLedger(store)
    spend = Spend(Mechanism.GAUSSIAN, 1.1, 0.01, 1000)
    for i in range(3):
        entry = ledger.record(f"r{i}", "m", "sample", "dp-sgd", spend, 1e-5)
    again = PrivacyLedger(LocalStore(tmp_path, Sealer(b"\x01" * 32)))
    assert [e.round_id for e in again.entries] == ["r0", "r1", "r2"]
    assert again.epsilon(1e-5) == pytest.approx(gaussian_epsilon(1.1, 0.01, 3000, 1e-5), rel=1e-6)
    assert entry.epsilon == pytest.approx(again.epsilon(1e-5))
    with pytest.raises(LedgerUnreadableError, match="unreadable"):
        PrivacyLedger(LocalStore(tmp_path, Sealer(b"\x02" * 32)))


def test_target_epsilon_sets_the_noise_of_both_mechanisms() -> None:
    rounds, delta = 20, 1e-5
    z_central = noise_for_target(UserDpMechanism.CENTRAL, 3.0, rounds, delta, 1.0, 100, 50, 5258)
    assert gaussian_epsilon(z_central, 1.0, rounds, delta) == pytest.approx(3.0, rel=1e-3)
    z = noise_for_target(UserDpMechanism.DISTRIBUTED, 3.0, rounds, delta, 1.0, 100, 50, 5258)
    policy = UserDpPolicy(UserDpMechanism.DISTRIBUTED, z, 1.0, 50)
    fp = policy.fixed_point(100, 5258)
    assert skellam_epsilon(z, rounds, delta, fp.sensitivity, 5258) <= 3.0
    assert z == pytest.approx(z_central, rel=0.01)  # Skellam at this scale is all but Gaussian
    assert epsilon_of([policy.spend(fp)] * rounds, delta) <= 3.0


def _task_with_noise(variance_factor: float) -> pb.Task:
    fp = FixedPoint.for_round(1.0, 10, 1, noise_multiplier=3.0, min_contributors=5, dimension=100)
    return pb.Task(
        secagg=pb.SecAggConfig(
            enabled=True,
            clip_norm=1.0,
            scale=fp.scale,
            max_weight=1,
            num_selected=10,
            noise_variance=fp.noise_variance * variance_factor,
            min_contributors=5,
            dimension=100,
        ),
        privacy=pb.PrivacyConfig(
            user_dp=pb.UserDpConfig(
                mechanism=pb.USER_DP_SKELLAM,
                noise_multiplier=3.0,
                clip_norm=1.0,
                min_contributors=5,
            )
        ),
    )


def test_device_refuses_a_task_whose_noise_falls_short_of_its_promise() -> None:
    check_noise(_task_with_noise(1.0))
    with pytest.raises(SecAggProtocolError, match="below"):
        check_noise(_task_with_noise(0.5))


def test_noise_check_uses_the_encoding_clip_with_a_relative_slack_of_1e_9() -> None:
    """As docs/protocol.md 10.4 states it: Delta = C s + sqrt(d) with C = Task.secagg.clip_norm."""
    z, n_min, d = 3.0, 5, 100
    encoding_clip, promised_clip = 0.5, 1.0  # the server may encode with a smaller clip
    fp = FixedPoint.for_round(encoding_clip, 10, 1, z, n_min, d)
    needed = (z * (encoding_clip * fp.scale + math.sqrt(d))) ** 2 / n_min  # by hand

    def task(variance: float, secagg_clip: float = encoding_clip) -> pb.Task:
        t = _task_with_noise(1.0)
        t.secagg.clip_norm = secagg_clip
        t.secagg.scale = fp.scale
        t.secagg.noise_variance = variance
        t.privacy.user_dp.clip_norm = promised_clip
        return t

    check_noise(task(needed))
    check_noise(task(needed * (1 - 1e-10)))  # float rounding between server and device
    with pytest.raises(SecAggProtocolError, match="below"):
        check_noise(task(needed * (1 - 1e-6)))
    # noise sized for the encoding clip is short when the encoding uses the promised clip
    with pytest.raises(SecAggProtocolError, match="below"):
        check_noise(task(needed, secagg_clip=promised_clip))
    with pytest.raises(SecAggProtocolError, match="above its promise"):
        check_noise(task(needed * 4, secagg_clip=2 * promised_clip))


# ------------------------------------------------------------------ over gRPC


def test_distributed_dp_rounds_fill_the_ledger_and_the_report(
    server_factory, device_threads, tmp_path
) -> None:
    server = server_factory(
        secagg=True,
        dp="distributed",
        dp_noise_multiplier=1.0,
        dp_clip_norm=1.0,
        min_clients=3,
        clients_per_round=3,
        dp_min_contributors=3,
        rounds=2,
    )
    device_threads(server, 3)
    _wait_rounds(server, 2)
    ledger = server.store.privacy_ledger(server.config.model)
    assert [r.mechanism for r in ledger] == ["skellam-distributed"] * 2
    assert ledger[1].epsilon > ledger[0].epsilon > 0
    sensitivity, d = ledger[0].sensitivity, ledger[0].dimension
    assert ledger[1].epsilon == pytest.approx(skellam_epsilon(1.0, 2, 1e-5, sensitivity, d))
    out = subprocess.run(
        [*XENO, "admin", "--server", server.address, "--json", "privacy-report"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["epsilon"] == pytest.approx(ledger[1].epsilon)
    gauge = server.metrics.registry.get_sample_value(
        "xeno_privacy_epsilon_spent", {"model": server.config.model}
    )
    assert gauge == pytest.approx(ledger[1].epsilon)  # Prometheus follows the ledger
    assert report["status"] == ("moderate" if report["epsilon"] <= 8 else "weak")
    assert len(report["devices"]) == 3 and all(d["rounds"] == 2 for d in report["devices"])
    text = _report_text(server)
    assert "skellam-distributed" in text and "strong <= 1" in text


def test_global_budget_stops_rounds_with_a_clear_message(server_factory, device_threads) -> None:
    budget = gaussian_epsilon(2.0, 1.0, 3, 1e-5) * 1.001  # room for three rounds, not four
    assert gaussian_epsilon(2.0, 1.0, 4, 1e-5) > budget
    server = server_factory(
        dp="central",
        dp_noise_multiplier=2.0,
        dp_clip_norm=1.0,
        privacy_budget=budget,
        min_clients=2,
        clients_per_round=2,
    )
    device_threads(server, 2)
    assert server.coordinator.wait_finished(timeout=90)
    ledger = server.store.privacy_ledger(server.config.model)
    assert len(ledger) == 3 and ledger[-1].epsilon <= budget
    assert "privacy budget of model" in server.coordinator.budget_exhausted
    assert "raise --privacy-budget" in server.coordinator.budget_exhausted
    assert all(r.status == "completed" for r in server.store.list_rounds(server.config.model))


def test_dp_sgd_devices_keep_a_ledger_that_matches_opacus(server_factory, device_threads) -> None:
    from client.training import dp_sample_rate

    z = 1.0
    server = server_factory(dp_sgd=True, dp_sgd_noise_multiplier=z, rounds=3)
    devices = device_threads(server, 2)
    _wait_rounds(server, 3)
    for dt in devices:
        entries = dt.client.ledger.entries
        assert entries and all(e.level == "sample" and e.noise_multiplier == z for e in entries)
        assert entries[-1].epsilon > entries[0].epsilon
        q, per_epoch = dp_sample_rate(len(dt.client.data), server.config.batch_size)
        steps = per_epoch * server.config.local_epochs * len(entries)
        assert entries[-1].epsilon == pytest.approx(gaussian_epsilon(z, q, steps, 1e-5), rel=1e-6)
    # Devices report their own cumulative sample-level epsilon, never a metric of their data.
    report = [
        p
        for r in server.store.list_rounds(server.config.model)
        for p in server.store.round_participants(r.id)
    ]
    assert all("dp_sgd_epsilon" in p.metrics for p in report if p.status == "reported")
    assert not any("train_accuracy" in p.metrics for p in report)
    # The operator's report shows each device's sample-level spend without user-level DP.
    text = _report_text(server)
    assert "no user-level differentially private round yet" in text
    for dt in devices:
        assert f"{dt.client.ledger.entries[-1].epsilon:.3f}" in text


def test_device_over_budget_declines_with_the_reason(server_factory, device_threads) -> None:
    server = server_factory(dp_sgd=True, dp_sgd_noise_multiplier=0.8, rounds=2, min_clients=2)
    # Budget far below what one round spends: every task is declined, the others carry on.
    greedy = device_threads(server, 2)
    frugal = device_threads(server, 1, num_partitions=3, epsilon_budget=0.05)
    _wait_rounds(server, 2)
    assert frugal[0].client.ledger.entries == []
    notes = [
        p.note
        for r in server.store.list_rounds(server.config.model)
        for p in server.store.round_participants(r.id)
        if p.status == "declined"
    ]
    assert notes and all(
        n.startswith("privacy budget exceeded: spent 0.000 of 0.05") for n in notes
    )
    assert all(dt.client.ledger.entries for dt in greedy)


# ------------------------------------------------------------------ adaptive clipping


def test_clipped_count_rides_in_the_noisy_vector_at_the_promised_noise() -> None:
    z, m, d = 4.0, 20, 500
    fp = FixedPoint.for_round(1.0, m, 1, z, m, d, count_noise=5.0)
    # One Skellam release: the summed noise is exactly z x the L2 bound that includes the count.
    assert math.sqrt(fp.noise_variance * m) == pytest.approx(z * fp.sensitivity, rel=1e-9)
    # ... and the count's own noise, in devices, is what was asked for.
    assert math.sqrt(fp.noise_variance * m) / fp.indicator_scale == pytest.approx(5.0, rel=1e-6)
    rng = np.random.default_rng(3)
    errors = []
    for _ in range(40):
        total = np.zeros(d + 1, dtype=np.uint32)
        norms = rng.uniform(0.2, 2.0, m)
        for norm in norms:
            u = rng.normal(0, 1, d)
            total += fp.encode((u / np.linalg.norm(u) * norm).astype(np.float32), 1, rng)
        errors.append(fp.decode_indicator(total, m) - float(np.sum(norms <= 1.0)))
    assert abs(float(np.mean(errors))) < 3 * 5.0 / math.sqrt(40)
    assert float(np.std(errors)) == pytest.approx(5.0, rel=0.3)


def test_adaptive_policy_moves_the_clip_towards_the_quantile() -> None:
    policy = UserDpPolicy(
        UserDpMechanism.CENTRAL, 2.0, 1.0, 2, target_quantile=0.5, clip_lr=0.2, count_noise=2.0
    )
    assert policy.next_clip(1.0, 10, 10) == pytest.approx(math.exp(-0.1))  # all inside: shrink
    assert policy.next_clip(1.0, 0, 10) == pytest.approx(math.exp(0.1))  # none inside: grow
    # The count's share of the budget: z^-2 = z_update^-2 + (2 sigma_b)^-2.
    assert policy.update_noise_multiplier**-2 + 4.0**-2 == pytest.approx(2.0**-2)
    with pytest.raises(ValueError, match="count noise"):
        UserDpPolicy(UserDpMechanism.CENTRAL, 2.0, 1.0, 2, target_quantile=0.5, count_noise=0.9)


@pytest.mark.parametrize("mechanism", ["central", "distributed"])
def test_adaptive_clip_shrinks_towards_small_updates_over_grpc(
    mechanism: str, server_factory, device_threads
) -> None:
    server = server_factory(
        secagg=mechanism == "distributed",
        dp=mechanism,
        dp_noise_multiplier=0.01,  # little noise: the noise scales with the clip it tests
        dp_clip_norm=20.0,  # far above every update: the clip must come down
        dp_adaptive_quantile=0.5,
        dp_clip_lr=0.5,
        # The noisy count of updates below the clip must not flip the clip's direction:
        # with 3 devices all below it, that needs noise under -1.5, i.e. 15 sigma here
        # (at 0.5 it was 3 sigma, and one run in a few hundred grew the clip).
        dp_clip_count_noise=0.1,
        min_clients=3,
        clients_per_round=3,
        dp_min_contributors=3,
        rounds=3,
    )
    # z = 0.01 is below the devices' default minimum (0.5): these devices accept it.
    device_threads(server, 3, min_noise_multiplier=0.0)
    _wait_rounds(server, 3)
    clips = [r.clip_norm for r in server.store.privacy_ledger(server.config.model)]
    assert clips[0] == 20.0 and clips[2] < clips[1] < clips[0]
    versions = server.store.list_versions(server.config.model)
    assert versions[-1].metrics["dp_clip_next"] < clips[2]


# ------------------------------------------------------------------ never a less noisy sum


def _distributed(server_factory, **overrides):
    return server_factory(
        secagg=True,
        dp="distributed",
        dp_noise_multiplier=1.0,
        min_clients=2,
        clients_per_round=3,
        dp_min_contributors=3,
        round_deadline=8.0,
        secagg_phase_timeout=3.0,
        **overrides,
    )


def test_server_never_unmasks_fewer_uploads_than_the_noise_needs(
    server_factory, device_threads
) -> None:
    server = _distributed(server_factory)
    device_threads(server, 2)
    # This device declines every task: its budget admits no training without DP-SGD.
    device_threads(server, 1, num_partitions=3, epsilon_budget=1.0)
    deadline = time.monotonic() + 60
    while not server.store.list_rounds(server.config.model):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while server.store.list_rounds(server.config.model)[0].status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first = server.store.list_rounds(server.config.model)[0]
    assert first.status == "failed" and "DP noise needs 3" in first.failure_reason
    assert server.store.privacy_ledger(server.config.model) == []


def test_devices_refuse_to_unmask_a_sum_the_server_says_is_too_small(
    server_factory, device_threads, monkeypatch
) -> None:
    server = _distributed(server_factory)
    coordinator = server.coordinator
    honest = coordinator.unmask_request

    def understated(device_id: str, round_id: str):
        survivors, dropped, _total, everyone = honest(device_id, round_id)
        return survivors, dropped, 2, everyone  # fewer uploads than the noise was sized for

    monkeypatch.setattr(coordinator, "unmask_request", understated)
    device_threads(server, 3)
    deadline = time.monotonic() + 60
    while not any(r.status == "failed" for r in server.store.list_rounds(server.config.model)):
        assert time.monotonic() < deadline, "the round should fail: no device helps unmask"
        time.sleep(0.2)
    assert server.store.get_model(server.config.model).current_version == 1
    assert server.store.privacy_ledger(server.config.model) == []
