"""A malicious server against real, unmodified devices, over real gRPC.

Each test turns the real server into an attacker by replacing one coordinator
step (what the server tells a device) and keeps everything the server
receives. After the round, `Attacker.recover` does what a malicious server
would: rebuild every secret it holds enough shares of, strip every mask it
can from each masked upload, and compare what is left with each device's
true encoded update. An attack works when some recovered vector correlates
with an individual update; none may.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from test_secagg import Harness, harness, make_updates  # noqa: F401

from client.secagg import SecAggDevice, SecAggPolicy, SecAggProtocolError
from common.secagg import agree, combine, prg_uint32
from common.secagg.crypto import mask_info, share_point
from server.secagg import SecAggRound, ShareKind


class Attacker:
    """Keeps what the server saw and tries to unmask individual updates with it."""

    def __init__(self) -> None:
        self.uploads: dict[str, np.ndarray] = {}
        self.rounds: list[SecAggRound] = []

    def recorder(self, label: str, vector: np.ndarray) -> None:
        if label.startswith("upload:"):
            self.uploads[label.split(":", 1)[1]] = vector.view(np.uint32).copy()

    def watch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Keep a reference to every secure round's state (shares revealed, keys, graph)."""
        original = SecAggRound.__post_init__

        def keep(rnd: SecAggRound) -> None:
            original(rnd)
            self.rounds.append(rnd)

        monkeypatch.setattr(SecAggRound, "__post_init__", keep)

    def secrets(self, rnd: SecAggRound) -> dict[tuple[str, ShareKind], bytes]:
        """Every secret with at least t revealed shares (whatever the honest server would do)."""
        collected: dict[tuple[str, ShareKind], dict[int, int]] = {}
        for holder, shares in rnd.revealed.items():
            x = share_point(rnd.participants, holder)
            for owner, kind, y in shares:
                collected.setdefault((owner, kind), {})[x] = y
        out = {}
        for key, points in collected.items():
            if len(points) >= rnd.settings.threshold:
                try:
                    out[key] = combine(points, rnd.settings.threshold)
                except ValueError:
                    continue
        return out

    def recover(self) -> dict[str, np.ndarray]:
        """Each upload with every mask the server can rebuild removed."""
        out = {}
        for rnd in self.rounds:
            secrets = self.secrets(rnd)
            info = mask_info(rnd.round_id)
            for u, masked in self.uploads.items():
                if u not in rnd.keys:
                    continue
                v = masked.copy()
                n = v.size
                seed = secrets.get((u, ShareKind.SELF_MASK_SEED))
                if seed is not None:
                    v -= prg_uint32(seed, n)
                for w in rnd.graph.get(u, []):
                    pair = None
                    for owner, peer in ((u, w), (w, u)):
                        raw = secrets.get((owner, ShareKind.MASK_KEY))
                        if raw is not None:
                            key = X25519PrivateKey.from_private_bytes(raw)
                            pair = agree(key, rnd.keys[peer].mask_public_key, info)
                    if pair is not None:
                        if u < w:
                            v -= prg_uint32(pair, n)
                        else:
                            v += prg_uint32(pair, n)
                out[u] = v
        return out

    def best_correlation(self, devices: list[SecAggDevice], updates, weights) -> float:
        """Largest |correlation| of any recovered vector with any device's encoded update."""
        best = 0.0
        recovered = self.recover()
        for i, device in enumerate(devices):
            encoded = device.fixed_point.encode(
                updates[i], weights[i], np.random.default_rng(0)
            ).view(np.int32)[:-1]
            for vector in recovered.values():
                corr = np.corrcoef(vector.view(np.int32)[:-1].astype(np.float64), encoded)[0, 1]
                best = max(best, abs(float(corr)))
        return best


def run_round(
    h: Harness,
    updates,
    weights,
    policy: SecAggPolicy | None = None,
    victim_policy: dict[int, SecAggPolicy | None] | None = None,
    classes: dict[int, type[SecAggDevice]] | None = None,
):
    """SecAggDevice.run on every device, in threads; returns (devices, errors).

    Devices are the unmodified SecAggDevice with its default policy unless
    `policy` (all) or `victim_policy` (some) say otherwise; `classes` gives
    hostile devices.
    """
    tasks = h.tasks()
    policies = {i: policy for i in range(len(h.devices))} | (victim_policy or {})
    devices = [
        (classes or {}).get(i, SecAggDevice)(
            h.stub(i),
            h.md(i),
            h.devices[i][0],
            h.devices[i][2].load_or_create(),
            h.devices[i][2],
            tasks[i],
            timeout=lambda: 60.0,
            policy=policies[i],
        )
        for i in range(len(h.devices))
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


def test_withheld_shares_do_not_unmask_the_victim(harness, monkeypatch) -> None:  # noqa: F811
    """The server relays no shares to one device: it must not upload under its self-mask alone."""
    attacker = Attacker()
    attacker.watch(monkeypatch)
    h = harness(5, recorder=attacker.recorder)
    victim = h.devices[0][0]
    coordinator = h.server.coordinator
    honest_share_keys, honest_request = coordinator.share_keys, coordinator.unmask_request

    def withhold(device_id, round_id, *args):
        mine = honest_share_keys(device_id, round_id, *args)
        return [] if device_id == victim else mine

    def request(device_id, round_id):
        survivors, dropped, total, everyone = honest_request(device_id, round_id)
        if device_id == victim:
            return [victim], [], total, everyone  # all it can check: it shared with nobody
        return survivors, dropped, total, everyone

    monkeypatch.setattr(coordinator, "share_keys", withhold)
    monkeypatch.setattr(coordinator, "unmask_request", request)
    updates, weights = make_updates(h.server, 5)
    devices, errors = run_round(h, updates, weights)
    corr = attacker.best_correlation(devices, updates, weights)
    assert corr < 0.1, f"the server recovered an individual update (correlation {corr})"
    assert isinstance(errors.get(0), SecAggProtocolError), errors
    assert victim not in attacker.uploads


def _last_round(h: Harness):
    return h.server.store.list_rounds(h.server.config.model)[-1]


def test_inconsistent_survivor_sets_are_caught_by_the_consistency_check(
    harness,  # noqa: F811
    monkeypatch,
) -> None:
    """Different survivor stories per device, each chosen to strip every mask of the victim.

    Five devices, t = 3. The victim v is told {v, h1} survived, h1 {h1, v}, h2 {h2, v},
    h3 and h4 {h3, h4}. Then v, h1 and h2 reveal shares of b_v, and for each partner
    of v three devices were told it dropped and reveal its mask key: without the
    consistency check the server strips every mask of v's upload. The devices here
    accept cohorts of 2, so only the consistency check stands in the way.
    """
    attacker = Attacker()
    attacker.watch(monkeypatch)
    h = harness(5, recorder=attacker.recorder)
    ids = [d[0] for d in h.devices]
    victim = ids[0]
    told = {
        victim: [victim, ids[1]],
        ids[1]: [ids[1], victim],
        ids[2]: [ids[2], victim],
        ids[3]: [ids[3], ids[4]],
        ids[4]: [ids[3], ids[4]],
    }
    coordinator = h.server.coordinator
    honest_request, honest_confirm = coordinator.unmask_request, coordinator.confirm_survivors

    def story(device_id, round_id):
        honest_request(device_id, round_id)  # wait for uploads to close
        s = sorted(told[device_id])
        return s, sorted(set(ids) - set(s)), len(s), s

    def relay_matching(device_id, round_id, signature):
        signatures = honest_confirm(device_id, round_id, signature)
        # Relay only the signatures over this device's own story: no mismatch to see.
        return [x for x in signatures if sorted(told[x[0]]) == sorted(told[device_id])]

    def accept_any_signature(self, device, signature):
        self.confirmations[device] = signature

    def accept_any_share(self, device, revealed, unverifiable):
        from common.secagg.shamir import decode_share

        self.revealed[device] = [(o, k, decode_share(y)) for o, k, y in revealed]

    monkeypatch.setattr(coordinator, "unmask_request", story)
    monkeypatch.setattr(coordinator, "confirm_survivors", relay_matching)
    monkeypatch.setattr(SecAggRound, "confirm", accept_any_signature)
    monkeypatch.setattr(SecAggRound, "unmask", accept_any_share)
    updates, weights = make_updates(h.server, 5)
    lenient = SecAggPolicy(min_cohort=2)
    devices, errors = run_round(h, updates, weights, policy=lenient)
    corr = attacker.best_correlation(devices, updates, weights)
    assert corr < 0.1, f"the server recovered an individual update (correlation {corr})"
    assert len(errors) == 5, errors
    assert all(
        isinstance(e, SecAggProtocolError) and "confirmed the survivor set" in str(e)
        for e in errors.values()
    ), errors
    assert all(not shares for shares in attacker.rounds[-1].revealed.values())


def test_a_forged_survivor_signature_aborts_the_round(harness, monkeypatch) -> None:  # noqa: F811
    """The server relays a signature over another set: every honest device aborts."""
    h = harness(5)
    coordinator = h.server.coordinator
    honest_confirm = coordinator.confirm_survivors

    def forge(device_id, round_id, signature):
        signatures = honest_confirm(device_id, round_id, signature)
        d, _forged, key = signatures[0]
        return [(d, bytes(64), key), *signatures[1:]]

    monkeypatch.setattr(coordinator, "confirm_survivors", forge)
    updates, weights = make_updates(h.server, 5)
    _devices, errors = run_round(h, updates, weights)
    assert len(errors) == 5
    assert all("not over the survivor set" in str(e) for e in errors.values()), errors
    assert not coordinator._round or not any(coordinator._round.secagg.revealed.values())


def test_crafted_share_is_named_and_left_out_and_the_sum_is_exact(
    harness,  # noqa: F811
    caplog,
    monkeypatch,
) -> None:
    """A hostile device reveals share + 1 (before commitments that rebuilt secret + 1)."""
    from test_secagg import expected_mean, model_delta, wait_version

    h = harness(5)
    updates, weights = make_updates(h.server, 5, seed=3)
    liar = h.devices[1][0]
    coordinator = h.server.coordinator
    honest_unmask, lied = coordinator.unmask, threading.Event()

    def liar_first(device_id, *args):
        # Order only: the sum closes at t shares per secret, so let the lie arrive first.
        if device_id != liar:
            lied.wait(20)
        try:
            return honest_unmask(device_id, *args)
        finally:
            if device_id == liar:
                lied.set()

    monkeypatch.setattr(coordinator, "unmask", liar_first)

    class Crafter(SecAggDevice):
        def _call(self, method, request):
            if method == "Unmask":
                share = request.shares[0]
                y = int.from_bytes(share.share, "big") + 1
                share.share = y.to_bytes(len(share.share), "big")
            return super()._call(method, request)

    devices, errors = run_round(h, updates, weights, classes={1: Crafter})
    assert not errors, errors
    wait_version(h.server, 2)
    rnd = _last_round(h)
    assert rnd.status == "completed", rnd.failure_reason
    fp = devices[0].fixed_point
    mean = expected_mean(fp, updates, weights, range(5))
    bound = fp.error_bound(5) / (sum(weights) / fp.max_weight) + 1e-6
    assert np.max(np.abs(model_delta(h.server) - mean)) <= bound
    assert any(
        r.name == "xeno.audit" and liar in r.getMessage() and "commitment" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_sybil_cohort_below_the_minimum_is_refused(harness, monkeypatch) -> None:  # noqa: F811
    """The victim and 3 devices of the server's own: the victim never uploads."""
    attacker = Attacker()
    attacker.watch(monkeypatch)
    h = harness(4, recorder=attacker.recorder)
    victim = h.devices[0][0]
    updates, weights = make_updates(h.server, 4)
    sybil = SecAggPolicy(min_cohort=2)  # the server's own devices accept anything
    devices, errors = run_round(h, updates, weights, policy=sybil, victim_policy={0: None})
    assert isinstance(errors.get(0), SecAggProtocolError), errors
    assert "below this device's minimum of 5" in str(errors[0])
    assert victim not in attacker.uploads
    assert attacker.best_correlation(devices[:1], updates, weights) < 0.1


def test_replayed_round_id_is_refused(harness, monkeypatch, tmp_path) -> None:  # noqa: F811
    """After an honest round, the server hands out the same round id again."""
    from test_secagg import wait_version

    import server.services.federation as federation

    h = harness(5)
    updates, weights = make_updates(h.server, 5)
    _devices, errors = run_round(h, updates, weights)
    assert not errors, errors
    wait_version(h.server, 2)
    first = _last_round(h)
    honest_task = federation.task_to_proto

    def replay(task):
        out = honest_task(task)
        out.round_id = first.id
        return out

    monkeypatch.setattr(federation, "task_to_proto", replay)
    _devices, errors = run_round(h, updates, weights)
    assert len(errors) == 5
    assert all("already run by this device" in str(e) for e in errors.values()), errors
    # remembered in the sealed store: a restarted device still refuses
    from client.storage import IdentityStore, LocalStore
    from common.atrest import Sealer

    again = IdentityStore(LocalStore(tmp_path / "dev0", Sealer(bytes(32))))
    assert not again.remember_round(first.id)
    assert again.remember_round("a-new-round")


def test_an_out_of_range_weight_cannot_wrap_the_weight_sum(harness) -> None:  # noqa: F811
    """One upload's weight element makes the unsigned weight sum wrap to 1: refused."""
    from test_secagg import wait_version

    h = harness(5)
    updates, weights = make_updates(h.server, 5)
    honest_units = sum(min(w, 1000) for w in weights[1:])

    class Inflater(SecAggDevice):
        def mask(self, encoded, *args):
            encoded = encoded.copy()
            encoded[-1] = np.uint32((1 << 32) - honest_units + 1)
            return super().mask(encoded, *args)

    _devices, errors = run_round(h, updates, weights, classes={0: Inflater})
    # a device whose Unmask arrives after the round failed is told it is closed
    assert all(
        isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.FAILED_PRECONDITION
        for e in errors.values()
    ), errors
    wait_version(h.server, 2)
    rnd = _last_round(h)
    assert rnd.status == "failed" and "weight" in rnd.failure_reason, rnd.failure_reason
    assert h.server.store.get_model(h.server.config.model).current_version == 1


def test_noise_generators_are_seeded_from_os_urandom(monkeypatch) -> None:
    """Rounding and DP noise: a generator per use, seeded by the OS CSPRNG (common/rng.py)."""
    import torch

    import common.rng as rng

    a, b = rng.os_seeded_generator(), rng.os_seeded_generator()
    assert not np.array_equal(a.integers(0, 2**63, 8), b.integers(0, 2**63, 8))
    fixed = bytes(range(32))
    monkeypatch.setattr(rng.os, "urandom", lambda n: fixed[:n])
    reference = np.random.Generator(np.random.PCG64(int.from_bytes(fixed, "big")))
    assert np.array_equal(rng.os_seeded_generator().random(16), reference.random(16))
    torch_reference = torch.Generator().manual_seed(int.from_bytes(fixed[:8], "big") >> 1)
    assert torch.equal(
        torch.rand(8, generator=rng.os_seeded_torch_generator()),
        torch.rand(8, generator=torch_reference),
    )
