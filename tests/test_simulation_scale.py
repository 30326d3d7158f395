"""`xeno-fl simulate` with devices sharing processes: own identities, exact secure sums.

Six devices in two worker processes (three device threads each, taking turns
at training and masking) run two secure-aggregation rounds against the real
server. Each device must have registered on its own (its own sealed store,
identity key and token, the ones the server holds), and each new version must
be the previous one moved by the weighted mean of the six devices' clipped
updates, which this test recomputes from their data: the devices' local
training is deterministic given its seed, and the only difference allowed is
the fixed-point rounding of secure aggregation.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from client.runtime import ClientConfig, load_partition
from client.storage import IdentityStore, LocalStore
from client.training import LocalTrainingConfig, train_local
from common.atrest import Sealer, load_key
from common.models import build_model
from common.quantize import FixedPoint, clip_l2
from server.app import ServerConfig
from server.store import Store
from xeno.procmem import TreeMemorySampler, process_tree, tree_memory
from xeno.simulation import SimulationConfig, run_simulation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clients": 10, "clients_per_round": 11}, "--clients-per-round"),
        ({"clients": 10, "clients_per_round": -1}, "--clients-per-round"),
        ({"clients": 10, "device_processes": 11}, "--device-processes"),
        ({"clients": 10, "compute_slots": 0}, "--compute-slots"),
        ({"clients": 0}, "--clients"),
    ],
)
def test_a_simulation_refuses_a_layout_it_cannot_run(
    settings: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**settings)  # type: ignore[arg-type]


def test_defaults_share_processes_only_past_sixteen_devices() -> None:
    assert (SimulationConfig(clients=10).processes, SimulationConfig(clients=10).cohort) == (10, 10)
    big = SimulationConfig(clients=1000)
    assert (big.processes, big.cohort) == (4, 100)
    assert SimulationConfig(clients=1000, clients_per_round=250).phase_timeout == 62.5


def test_tree_memory_counts_the_children() -> None:
    """The sampler sums the whole tree: a child's 50 MB are in this process's figures."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; b = b'x' * (50 << 20); print(flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()  # its 50 MB are written
        assert child.pid in process_tree(os.getpid())
        with TreeMemorySampler(interval=0.05) as sampler:
            pass
        assert sampler.peak_processes >= 2
        assert sampler.peak_pss_bytes >= tree_memory(child.pid).pss_bytes >= 50 << 20
        assert sampler.peak_rss_bytes >= sampler.peak_pss_bytes
    finally:
        child.kill()
        child.wait()


def test_sampler_reads_pss_when_the_tree_grows_or_the_interval_passes() -> None:
    """Full reads (smaps_rollup) only when RSS grew past RSS_STEP or full_interval passed."""
    sampler = TreeMemorySampler(interval=0.05, full_interval=3600)
    sampler.sample()
    assert sampler.samples == 1
    assert not sampler.tick()  # nothing grew: only the RSS counters were read
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; b = b'x' * (200 << 20); print(flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()  # its 200 MB are written
        assert sampler.tick()  # the tree grew: PSS read at once
        assert sampler.peak_pss_bytes >= tree_memory(child.pid).pss_bytes >= 200 << 20
        assert not sampler.tick()
        assert (sampler.samples, sampler.ticks) == (2, 3)
    finally:
        child.kill()
        child.wait()
    always = TreeMemorySampler(interval=0.05, full_interval=1e-9)
    assert always.tick() and always.tick() and always.samples == 2
    with pytest.raises(ValueError, match="positive"):
        TreeMemorySampler(full_interval=0)


@pytest.mark.slow
def test_devices_sharing_processes_keep_their_own_identity_and_sum_exactly(
    tmp_path: Path,
) -> None:
    n, rounds, epochs = 6, 2, 1
    config = SimulationConfig(
        clients=n,
        rounds=rounds,
        device_processes=2,
        local_epochs=epochs,
        db=f"sqlite:///{tmp_path}/sim.db",
        data_key_file=str(tmp_path / "xeno.key"),
        devices_dir=str(tmp_path / "devices"),
        report=str(tmp_path / "report.json"),
        progress=False,
    )
    result = run_simulation(config)
    assert result.device_processes == 2 and result.clients_per_round == n
    assert [r["status"] for r in result.rounds] == ["completed"] * rounds
    assert all(r["participants"] == n and r["secagg"]["degree"] >= 1 for r in result.rounds)
    # The figures the README quotes: the whole tree's peak memory, bytes per device.
    report = json.loads(Path(config.report or "").read_text())
    assert report["peak_memory_bytes"] > 100e6 and report["memory_processes"] >= 3
    assert report["peak_rss_bytes"] >= report["peak_memory_bytes"]
    assert report["bytes_per_device"] > 0 and report["median_round_seconds"] > 0

    # Each device: its own folder, identity key and token, the ones the server holds.
    store = Store(config.db, Sealer(load_key("", "XENO_DATA_KEY")))
    held = store.device_credentials()
    assert len(held) == n
    sealer = Sealer(load_key("", "XENO_DEVICE_KEY"))
    seen_ids, seen_tokens = set(), set()
    for i in range(n):
        local = LocalStore(tmp_path / "devices" / f"device-{i}", sealer)
        creds = local.load_credentials(result.server)
        assert creds is not None, f"device {i} has no credentials of its own"
        identity = IdentityStore(local).load_or_create().public_key()
        token_digest, identity_key = held[creds.device_id]
        assert token_digest == hashlib.sha256(creds.token.encode()).hexdigest()
        assert identity_key == identity.public_bytes(Encoding.Raw, PublicFormat.Raw)
        seen_ids.add(creds.device_id)
        seen_tokens.add(creds.token)
    assert len(seen_ids) == len(seen_tokens) == n

    # Each round's new version: the base moved by the weighted mean of the clipped updates.
    defaults = ServerConfig()
    model = build_model(store.get_model(result.model).spec)  # type: ignore[union-attr]
    training = LocalTrainingConfig(
        local_epochs=epochs,
        batch_size=defaults.batch_size,
        learning_rate=0.05,
        momentum=defaults.momentum,
    )
    fp = FixedPoint.for_round(defaults.secagg_clip_norm, n, defaults.secagg_max_weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the devices train
    try:
        for r in result.rounds:
            base = store.load_version(result.model, r["version"] - 1).astype(np.float64)
            new = store.load_version(result.model, r["version"]).astype(np.float64)
            total, weights = np.zeros_like(base), 0
            for i in range(n):
                shard = load_partition(
                    ClientConfig(task=config.task, num_partitions=n, alpha=config.alpha), i
                )
                seed = (config.seed * 1000 + i) * 1_000_003 + r["round"]
                update = train_local(model, base.astype(np.float32), shard, training, seed)
                weight = min(update.num_examples, fp.max_weight)
                total += clip_l2(update.delta, fp.clip_norm)[0].astype(np.float64) * weight
                weights += weight
            bound = fp.error_bound(n) / (weights / fp.max_weight)
            error = float(np.max(np.abs((new - base) - total / weights)))
            # A missing, doubled or foreign update would be off by ~1/6 of one (>1e-3).
            assert error <= bound + 1e-5, (r["round"], error, bound)
    finally:
        torch.set_num_threads(threads)


def test_distributed_dp_noise_is_shared_by_most_of_the_cohort() -> None:
    """Each device adds 1/n_min of the noise: n_min is 90% of the cohort, not --min-clients.

    With the server's default (n_min = --min-clients = 2) every device of a
    100-device cohort would add half the target noise, 45 times the variance the
    accountant's epsilon needs for a sum of 90.
    """
    from common.tasks import TaskName
    from xeno.simulation import _server_config

    def policy(**settings: object):  # type: ignore[no-untyped-def]
        config = SimulationConfig(dp="distributed", dp_target_epsilon=8.0, rounds=5, **settings)
        return _server_config(config, TaskName.INTENTS).user_dp_policy()

    big = policy(clients=1000, clients_per_round=100)
    assert big is not None and big.min_contributors == 90
    assert policy(clients=10).min_contributors == 9
    assert policy(clients=3).min_contributors == 3
    assert policy(clients=100, dp_min_contributors=40).min_contributors == 40
    # The guarantee is the sum's: the noise multiplier for the target does not depend on n_min.
    assert big.noise_multiplier == pytest.approx(
        policy(clients=1000, clients_per_round=100, dp_min_contributors=2).noise_multiplier
    )
    plain = SimulationConfig(clients=100)
    assert _server_config(plain, TaskName.INTENTS).user_dp_policy() is None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.slow
def test_sigterm_stops_the_simulation_and_its_device_processes(tmp_path: Path) -> None:
    """`docker-compose stop` or `kill` must not leave the device worker processes running."""
    import signal
    import time

    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xeno.cli",
            "simulate",
            "--clients",
            "4",
            "--device-processes",
            "2",
            "--rounds",
            "1000",
            "--no-progress",
            "--db",
            f"sqlite:///{tmp_path / 'sim.db'}",
            "--data-key-file",
            str(tmp_path / "key"),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    tree: list[int] = []
    while len(tree) < 4:  # this process, the forkserver, and the two device workers
        assert sim.poll() is None, sim.communicate()[0]
        assert time.monotonic() < deadline, "the device workers never started"
        time.sleep(0.2)
        tree = process_tree(sim.pid)
    sim.send_signal(signal.SIGTERM)
    out, _ = sim.communicate(timeout=60)
    assert sim.returncode == 130, out
    assert "simulation stopped" in out
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in tree):
        assert time.monotonic() < deadline, [p for p in tree if _alive(p)]
        time.sleep(0.2)


def test_a_stop_signal_is_acted_on_only_at_safe_points() -> None:
    """A SIGTERM raised inside a worker's start left that worker unrecorded and running,
    and the server's threads holding the stopped simulation open (CI saw it hang)."""
    import signal

    from xeno.simulation import _StopSignal

    stop = _StopSignal()
    stop.check()  # nothing asked: no raise
    stop.handler(signal.SIGTERM, None)  # the handler itself never raises
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        stop.check()
    stop.reset()
    stop.check()
