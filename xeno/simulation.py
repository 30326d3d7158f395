"""`xeno-fl simulate`: a real server plus N devices in worker processes on loopback.

The server runs in this process (so its CPU time is measurable on its own).
Devices run in `--device-processes` worker processes started from a forkserver
that has already imported torch, so starting them costs one torch import, not
one per process. A worker hosts one device or many, each on its own thread
running the real device loop (`client.runtime.DeviceClient.run`: register,
check in, download, train, SecAgg+) with its own config, sealed store
directory, identity key, token and gRPC channel; devices of one process share
only the interpreter and its read-only caches (the CLINC150 split, the
feature hashes). All talk to the server over real gRPC on 127.0.0.1.

Up to `PROCESS_PER_DEVICE_UP_TO` devices each get a process (the demo's ten,
as before); more share `DEFAULT_DEVICE_PROCESSES` processes: a process costs
~150 MB of private memory after the fork, a device thread a few MB, and on a
two-core machine more processes than a handful add no parallelism (README,
"Simulating 1,000 devices", for the measurements).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import queue
import resource
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from threadpoolctl import threadpool_limits

from client.runtime import ClientConfig, DeviceClient, SharedHost, prepare_device
from common.atrest import write_new_key
from common.config import setting
from common.tasks import TaskName
from server.app import ServerConfig, XenoServer
from server.rounds import RoundSummary
from xeno.procmem import TreeMemorySampler

log = logging.getLogger("xeno.simulate")

INTENTS_LOCAL_OPTIMIZER = "adam"
INTENTS_LEARNING_RATE = 0.03
"""Local training of the text model: Adam (fresh moments each round) at 0.03. Its head starts at
zero and its features are means of ~100 embedding rows that start at +-1/dim, so the head's bias
gets gradients ~100x its weights' and the embedding's: no single SGD rate trains it from few local
steps (a user of 120 queries: at 0.1 to 5, five local epochs left its own training accuracy at
4-7%); Adam fits them in five epochs. Of Adam's rates, 0.03 with FedAvg at server rate 2 trained
best in process with 100 users (benchmarks/intents.py FED_DEFAULTS): 0.1 plateaued near 60%, 0.01
was slower. SGD at 5 got going with 1,200 queries a user (README)."""

INTENTS_PERSONAL_LR = 0.003
"""FedRep's head rate under Adam (the server's 0.5 default is an SGD rate). 5 epochs of the head
alone at 0.003 gained 4.1 points on 100 users' held-out queries over a model at 77.6% there, where
0.01 lost 0.5 and 0.03 lost 7.7 (the head overfits a user's ~120 queries; README)."""

INTENTS_SERVER_LR = 2.0
"""FedAvg's server rate for the text model: the mean of non-IID updates moves each intent's head
row by only the share of users who hold that intent (3 oscillated with Adam at 0.1 on devices)."""

INTENTS_SECAGG_CLIP_NORM = 500.0
"""Secure aggregation's L2 clip for the text model: one local epoch over a few thousand queries
moves it by ~140 (five by ~320), where the digits default of 10 would shrink every update ~15x.
The fixed-point step grows with the clip (n C / 2^31, 2.3e-4 at 1,000 devices): still far
below the weights' scale."""


PROCESS_PER_DEVICE_UP_TO = 16
"""Fleets up to this size get one process per device (as real devices are)."""

DEFAULT_DEVICE_PROCESSES = 4
"""Processes hosting a larger fleet's devices as threads (see the module docstring)."""

DEFAULT_COHORT = 100
"""Devices per round of a fleet larger than it, unless --clients-per-round says otherwise;
smaller fleets train all their devices each round. A participant of an intents round costs
~0.3-0.4 CPU-s in all (its training and SecAgg+, the server's share), so a 30 s round on two
cores holds ~150 at most; 100 measured a 21 s median with 1,000 devices on the loaded
machine, 150 and 250 took 56 s and 73 s (README, "Simulating 1,000 devices")."""


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of a local simulated federation."""

    clients: int = setting(10, "number of simulated devices", "XENO_SIM_CLIENTS")
    rounds: int = setting(20, "rounds to complete", "XENO_SIM_ROUNDS")
    clients_per_round: int = setting(
        0,
        f"devices selected per round (0: all of them up to {DEFAULT_COHORT} devices, "
        f"else {DEFAULT_COHORT})",
        "XENO_SIM_CLIENTS_PER_ROUND",
    )
    compute_slots: int = setting(
        2,
        "devices of one process that may download and train, or mask and upload, at once "
        "(the others wait their turn; bounds memory when a process hosts hundreds)",
        "XENO_SIM_COMPUTE_SLOTS",
    )
    device_processes: int = setting(
        0,
        f"processes hosting the devices, each running its share as threads (0: one per "
        f"device up to {PROCESS_PER_DEVICE_UP_TO} devices, else {DEFAULT_DEVICE_PROCESSES})",
        "XENO_SIM_DEVICE_PROCESSES",
    )
    db: str = setting("sqlite:///data/xeno.db", "SQLAlchemy database URL of the server", "XENO_DB")
    report: str | None = setting(
        None, "also write the per-round results as JSON to this path", "XENO_SIM_REPORT"
    )
    task: str = setting(
        "digits",
        "what the federation trains: digits (an MLP on 8x8 digits, one Dirichlet label shard "
        "per device) or intents (the fastText-style model on CLINC150, one simulated user "
        "per device)",
        "XENO_TASK",
    )
    model: str = setting(
        "",
        "name of the federated model (empty: digits-mlp or intents-fasttext, by --task)",
        "XENO_MODEL",
    )
    learning_rate: float = setting(
        0.0,
        "devices' local learning rate (0: the task's, 0.05 for digits and "
        f"{INTENTS_LEARNING_RATE:g} for intents)",
        "XENO_LEARNING_RATE",
    )
    params: int = setting(
        0, "size the MLP for about this many parameters (0: 64-64-10)", "XENO_PARAMS"
    )
    strategy: str = setting(
        "fedavg", "fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad", "XENO_STRATEGY"
    )
    server_lr: float = setting(
        0.0,
        f"server learning rate (0: the strategy's own, and {INTENTS_SERVER_LR:g} for fedavg on "
        "intents)",
        "XENO_SERVER_LR",
    )
    local_optimizer: str = setting(
        "",
        f"devices' local optimizer, sgd or adam (empty: sgd for digits, {INTENTS_LOCAL_OPTIMIZER} "
        "for intents)",
        "XENO_LOCAL_OPTIMIZER",
    )
    alpha: float = setting(0.5, "Dirichlet concentration of the label partition", "XENO_ALPHA")
    seed: int = setting(0, "seed of the data split, partition and initial weights", "XENO_SEED")
    local_epochs: int = setting(5, "local epochs per round", "XENO_LOCAL_EPOCHS")
    personalization: str = setting(
        "none",
        "fedrep: devices also keep a personal head (FedRep) and the report gives the "
        "personalized accuracy on their held-out data; none",
        "XENO_PERSONALIZATION",
    )
    round_deadline: float = setting(
        0.0,
        "seconds before a round closes with what it has (0: 60, or 0.3 s per device of "
        "the round's cohort if more)",
        "XENO_ROUND_DEADLINE",
    )
    min_clients: int = setting(2, "fewest updates that complete a round", "XENO_MIN_CLIENTS")
    port: int = setting(0, "server port (0: a free one)", "XENO_PORT")
    data_key_file: str = setting(
        "data/xeno.key",
        "data key of the server's blobs; created (owner-only) if missing",
        "XENO_DATA_KEY_FILE",
    )
    secagg: bool = setting(
        True,
        "secure aggregation (SecAgg+); --no-secagg for plain rounds",
        "XENO_SECAGG",
    )
    progress: bool = setting(True, "show the live progress display", "XENO_PROGRESS")
    devices_dir: str = setting(
        "",
        "keep each device's sealed store (identity key, token, ledger) in DIR/device-I and "
        "their data key in DIR/device.key (empty: a temporary folder, removed at the end)",
        "XENO_SIM_DEVICES_DIR",
    )
    dp: str = setting(
        "none",
        "user-level DP: distributed (Skellam under secure aggregation), central (needs "
        "--no-secagg) or none",
        "XENO_DP",
    )
    dp_target_epsilon: float = setting(
        0.0, "user-level epsilon to spend over --rounds (sets the noise)", "XENO_DP_TARGET_EPSILON"
    )
    dp_clip_norm: float = setting(
        0.5, "L2 clip of each device's update under DP", "XENO_DP_CLIP_NORM"
    )
    dp_delta: float = setting(1e-5, "delta of the user-level guarantee", "XENO_DP_DELTA")
    dp_min_contributors: int = setting(
        0,
        "distributed DP: fewest updates whose noise adds up to the target, so each device "
        "adds 1/this of it; smaller sums are never unmasked (0: 90%% of the cohort, "
        "rounded up, leaving room for a tenth of it to drop out)",
        "XENO_DP_MIN_CONTRIBUTORS",
    )
    dp_sgd_target_epsilon: float = setting(
        0.0,
        "sample-level epsilon each device may spend over --rounds with Opacus DP-SGD (0: off)",
        "XENO_DP_SGD_TARGET_EPSILON",
    )
    privacy_budget: float = setting(
        0.0, "global user-level epsilon budget of the model (0: none)", "XENO_PRIVACY_BUDGET"
    )
    eval_every: int = setting(
        -1,
        "federated evaluation: after every K-th round an evaluation-only round scores the new "
        "version on the devices' own held-out data (summed under secure aggregation); 0: none; "
        "-1: the task's (intents: every 5 rounds, or at the last if fewer; digits shards hold "
        "no held-out data: none)",
        "XENO_SIM_EVAL_EVERY",
    )

    def evaluation_interval(self) -> int:
        """K of --eval-every, the task's default resolved."""
        if self.eval_every >= 0:
            return self.eval_every
        if TaskName.parse(self.task) is TaskName.INTENTS:
            return min(5, self.rounds)
        return 0

    def __post_init__(self) -> None:
        if self.clients < 1 or self.rounds < 1:
            raise ValueError("--clients and --rounds must be at least 1")
        if not 0 <= self.clients_per_round <= self.clients:
            raise ValueError(
                f"--clients-per-round must be in [0, --clients] (0: automatic), "
                f"not {self.clients_per_round}"
            )
        if not 0 <= self.device_processes <= self.clients:
            raise ValueError(
                f"--device-processes must be in [0, --clients] (0: automatic), "
                f"not {self.device_processes}"
            )
        if self.compute_slots < 1:
            raise ValueError("--compute-slots must be at least 1")
        if self.round_deadline < 0:
            raise ValueError("--round-deadline must be positive (0: automatic)")

    @property
    def cohort(self) -> int:
        """Devices selected per round."""
        if self.clients_per_round:
            return self.clients_per_round
        return min(self.clients, DEFAULT_COHORT)

    @property
    def processes(self) -> int:
        """Worker processes hosting the devices."""
        if self.device_processes:
            return self.device_processes
        if self.clients <= PROCESS_PER_DEVICE_UP_TO:
            return self.clients
        return DEFAULT_DEVICE_PROCESSES

    @property
    def deadline(self) -> float:
        """Seconds a round may take: a large cohort on two cores needs minutes under load."""
        return self.round_deadline or max(60.0, 1.0 * self.cohort)

    @property
    def phase_timeout(self) -> float:
        """Seconds a secure-aggregation phase waits for the cohort's stragglers.

        The simulated devices never drop out on their own; a phase of a large cohort
        takes seconds of the two shared cores, and one that closed after the server's
        default 10 s would drop devices that were merely queued for a core (and with
        them the shares their neighbours need).
        """
        return max(10.0, 0.25 * self.cohort)


@dataclass
class SimulationResult:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    db: str = ""
    model: str = ""
    server: str = ""  # the address the devices used (their credentials' scope)
    clients: int = 0
    clients_per_round: int = 0
    device_processes: int = 0
    server_cpu_seconds: float = 0.0
    # CPU seconds of the device worker processes together (training, masking, gRPC).
    devices_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
    median_round_seconds: float | None = None
    # Model download plus update upload per device and round, median over completed rounds.
    bytes_per_device: float | None = None
    # Peak over the run of the sum of PSS (and of RSS, an upper bound) of the server
    # process and every device process, sampled from /proc every `memory_interval_s`.
    peak_memory_bytes: int = 0
    peak_rss_bytes: int = 0
    memory_interval_s: float = 0.0
    memory_processes: int = 0
    # 1-minute load average of the machine when the run started and when it ended.
    load_average: list[float] = field(default_factory=list)
    # Per version: the server's accuracy beside the devices' own held-out scores of it.
    federated_evaluation: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _round_record(s: RoundSummary) -> dict[str, Any]:
    return {
        "round": s.number,
        "version": s.version,
        "status": s.status,
        "participants": s.participants,
        "selected": s.selected,
        "dropouts": s.dropouts,
        "accuracy": s.metrics.get("accuracy"),
        "loss": s.metrics.get("loss"),
        "epsilon": s.metrics.get("dp_epsilon"),
        "seconds": round(s.seconds, 4),
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "bytes_per_device": (
            round((s.bytes_in + s.bytes_out) / s.participants) if s.participants else None
        ),
        "failure_reason": s.failure_reason,
    }


def federated_evaluation(store: Any, model: str) -> list[dict[str, Any]]:
    """Each evaluated version's federated accuracy beside its server-side accuracy.

    Evaluation-only rounds (--eval-every) have the devices score a version on
    their own held-out data; the server stores only the sums of their counts
    (under secure aggregation it never sees one device's), from which the
    federated accuracy and, with personalization, the accuracy of the devices'
    personalized models.
    """
    versions = {
        rnd.result_version: (rnd.metrics or {}).get("accuracy")
        for rnd in store.list_rounds(model)
        if rnd.result_version is not None
    }
    rows: list[dict[str, Any]] = []
    for rnd in store.evaluations(model):
        m = rnd.metrics or {}
        rows.append(
            {
                "round": rnd.number,
                "version": rnd.base_version,
                "devices": int(m.get("eval_devices", 0)),
                "heldout_examples": int(m.get("eval_examples", 0)),
                "federated_accuracy": m.get("federated_accuracy"),
                "personalized_accuracy": m.get("federated_personalized_accuracy"),
                "server_accuracy": versions.get(rnd.base_version),
                "epsilon": m.get("dp_epsilon"),
            }
        )
    return rows


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_client(client: DeviceClient) -> None:
    try:
        client.run()
    except Exception:  # one device's bug must not stop the others of its process
        log.exception("device %s stopped", client.config.state_dir)
    finally:
        client.close()


MALLOC_ARENAS = 2
"""glibc malloc arenas of a process hosting many devices. glibc gives each thread that
allocates its own arena, up to 8 per core, and freed model-sized buffers stay in the arena
that held them: with a hundred device threads a process kept ~1.5x the memory its live
buffers need (measured: 100 devices' updates, 798 MB PSS with the default, 555 MB with 2
arenas, the same CPU time)."""


def _limit_malloc_arenas(arenas: int) -> None:
    """mallopt(M_ARENA_MAX, arenas) where the C library is glibc; elsewhere nothing."""
    import ctypes
    import ctypes.util

    m_arena_max = -8  # malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_arena_max, arenas)
    except (OSError, AttributeError):  # not glibc: its allocator, its policy
        pass


def _worker_main(configs: list[ClientConfig], compute_slots: int) -> None:
    """One device process: each config's device on its own thread, until the federation ends.

    Every device is the real one (`prepare_device` + `DeviceClient.run`); the
    process gives them one torch thread between them (devices share cores, and
    torch's own thread pool would fight the device threads for them), one stop
    event, set by SIGTERM, and, when it hosts several, `compute_slots` turns at
    the model-sized work (`SharedHost`). Devices are prepared one after the
    other, so the shared data caches are filled once, not by every thread at once.
    """
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s device %(message)s")
    torch.set_num_threads(1)
    # numpy's BLAS too: its default pool (a thread per core) spins after every call, ~44 ms
    # of CPU for one 400k-value norm (a device's clip), against 0.4 ms on the calling thread.
    threadpool_limits(1)
    if len(configs) > 1:
        _limit_malloc_arenas(MALLOC_ARENAS)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = multiprocessing.parent_process()
    if parent is not None:
        # A simulation that is gone (SIGKILL, a crash) cannot stop this process: its
        # devices leave when it does instead of calling a dead server forever.
        def leave_with_parent() -> None:
            parent.join()
            stop.set()

        threading.Thread(target=leave_with_parent, name="parent-watch", daemon=True).start()
    host = (
        SharedHost(threading.Semaphore(compute_slots), keep_model=False)
        if len(configs) > 1
        else SharedHost()
    )
    clients = []
    for c in configs:
        if stop.is_set():  # stopped while preparing: leave quietly, nothing has run yet
            return
        clients.append(prepare_device(c, stop, host))
    threads = [
        threading.Thread(target=_run_client, args=(c,), name=f"device-{c.config.partition}")
        for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def dp_min_contributors(config: SimulationConfig, cohort: int) -> int:
    """How many devices' noise shares make up the target noise under distributed DP.

    Each device adds 1/n_min of the noise, so the server's default of --min-clients
    (2 here) would have every one of a 100-device cohort add half of it: 50 times the
    variance the guarantee needs. A simulation knows its cohort, so it asks for 90% of
    it (a round whose survivors are fewer is never unmasked).
    """
    if config.dp_min_contributors > 0:
        return config.dp_min_contributors
    if config.dp != "distributed":
        return 0
    return max(min(config.min_clients, cohort), math.ceil(0.9 * cohort))


def _server_config(config: SimulationConfig, task: TaskName) -> ServerConfig:
    intents = task is TaskName.INTENTS
    learning_rate = config.learning_rate or (INTENTS_LEARNING_RATE if intents else 0.05)
    local_optimizer = config.local_optimizer or (INTENTS_LOCAL_OPTIMIZER if intents else "sgd")
    server_lr: float | None = config.server_lr or None
    if server_lr is None and intents and config.strategy == "fedavg":
        server_lr = INTENTS_SERVER_LR
    cohort = config.cohort
    phase_timeout = config.phase_timeout
    server_config = ServerConfig(
        data_key_file=config.data_key_file,
        host="127.0.0.1",
        port=config.port,
        db=config.db,
        task=task.value,
        model=config.model,
        learning_rate=learning_rate,
        local_optimizer=local_optimizer,
        server_lr=server_lr,
        personal_learning_rate=INTENTS_PERSONAL_LR if local_optimizer == "adam" else 0.5,
        params=config.params,
        seed=config.seed,
        data_seed=config.seed,
        strategy=config.strategy,
        local_epochs=config.local_epochs,
        personalization=config.personalization,
        min_clients=min(config.min_clients, cohort),
        clients_per_round=cohort,
        round_deadline=config.deadline,
        rounds=config.rounds,
        secagg=config.secagg,
        secagg_phase_timeout=phase_timeout,
        call_timeout=max(120.0, phase_timeout + 60.0),
        dp=config.dp,
        dp_target_epsilon=config.dp_target_epsilon,
        dp_clip_norm=config.dp_clip_norm,
        dp_delta=config.dp_delta,
        dp_min_contributors=dp_min_contributors(config, cohort),
        privacy_budget=config.privacy_budget,
        dp_sgd=config.dp_sgd_target_epsilon > 0,
        dp_sgd_target_epsilon=config.dp_sgd_target_epsilon,
        metrics_port=-1,
        eval_every=config.evaluation_interval(),
        # Rounds start once every device registered (run_simulation holds them until
        # then), as soon as the cohort is in, and only after this long with fewer: a
        # thousand device threads on a loaded machine took over 30 s to check in again.
        selection_window=max(30.0, 0.25 * cohort),
        # Every simulated device connects from 127.0.0.1: the per-address limits, meant
        # for a network address in front of many real users, would throttle the fleet.
        peer_register_rate=1e6,
        peer_register_burst=1e6,
        peer_checkin_rate=1e6,
        peer_checkin_burst=1e6,
    )
    if task is TaskName.INTENTS:
        server_config = replace(server_config, secagg_clip_norm=INTENTS_SECAGG_CLIP_NORM)
    return server_config


def _device_configs(
    config: SimulationConfig, task: TaskName, address: str, state_root: str, device_key: str
) -> list[ClientConfig]:
    return [
        ClientConfig(
            server=address,
            task=task.value,
            state_dir=str(Path(state_root) / f"device-{i}"),
            partition=i,
            num_partitions=config.clients,
            alpha=config.alpha,
            data_seed=config.seed,
            seed=config.seed * 1000 + i,
            device_key_file=device_key,
            # The simulation's operator owns its devices: they run plain
            # rounds exactly when the server is started without secagg.
            allow_plaintext=not config.secagg,
            # Every simulated device is the operator's own: a simulation of
            # fewer than 5 devices may run secure rounds of all of them.
            min_secagg_cohort=max(2, min(5, config.cohort)),
        )
        for i in range(config.clients)
    ]


MEMORY_INTERVAL_S = 0.5


@contextlib.contextmanager
def _devices_dir(path: str) -> Iterator[str]:
    if not path:
        with tempfile.TemporaryDirectory(prefix="xeno-sim-") as tmp:
            yield tmp
        return
    Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
    yield path


def run_simulation(config: SimulationConfig) -> SimulationResult:
    """Run the simulation the config describes; the server's numpy uses one BLAS thread.

    A BLAS pool's threads spin after each call (~44 ms of CPU for one 400k-value norm
    with two of them): on a machine whose cores the devices already fill, the server's
    BLAS calls only take CPU from them.
    """
    with threadpool_limits(1):
        return _run_simulation(config)


def _run_simulation(config: SimulationConfig) -> SimulationResult:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    if not os.environ.get("XENO_DATA_KEY") and not Path(config.data_key_file).exists():
        write_new_key(config.data_key_file)
    task = TaskName.parse(config.task)
    server_config = _server_config(config, task)
    server = XenoServer(server_config)
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    cpu = _CpuMeter()

    def on_round(summary: RoundSummary) -> None:
        # Runs on the coordinator's thread as the round ends: its secure-aggregation
        # figures are still this round's, and the CPU split falls at the round's end.
        record = _round_record(summary)
        record["kind"] = summary.kind
        server_cpu, devices_cpu = cpu.split()
        record["server_cpu_seconds"] = round(server_cpu, 3)
        record["devices_cpu_seconds"] = round(devices_cpu, 3)
        stats = server.coordinator.last_secagg_stats
        if stats:
            phases = stats.get("phase_seconds")
            record["secagg"] = {
                "degree": stats.get("degree"),
                "threshold": stats.get("threshold"),
                "phase_seconds": (
                    {k: round(v, 3) for k, v in phases.items()} if isinstance(phases, dict) else {}
                ),
                "unmask_cpu_seconds": stats.get("unmask_cpu_seconds"),
            }
        events.put(record)

    server.coordinator.add_listener(on_round)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sklearn.datasets", "client.runtime", "xeno.simulation"])
    processes = config.processes
    result = SimulationResult(
        db=config.db,
        model=server_config.model,
        clients=config.clients,
        clients_per_round=config.cohort,
        device_processes=processes,
        memory_interval_s=MEMORY_INTERVAL_S,
    )
    sampler = TreeMemorySampler(interval=MEMORY_INTERVAL_S)
    with _devices_dir(config.devices_dir) as state_root, sampler:
        device_key = str(Path(state_root) / "device.key")
        if not Path(device_key).exists():
            write_new_key(device_key)
        # No round starts until the whole fleet registered: a first round that ran beside
        # a thousand registrations would time the start-up, not the round.
        server.coordinator.pause()
        server.start()
        result.server = server.address
        cpu_start = _cpu_seconds()
        workers: list[multiprocessing.process.BaseProcess] = []
        finished = False
        try:
            _STOP.check()  # a stop asked for during start-up, acted on where cleanup follows
            configs = _device_configs(config, task, server.address, state_root, device_key)
            # Round-robin, so that every process holds a like share of each round's cohort.
            for index in range(processes):
                worker = ctx.Process(
                    target=_worker_main,
                    args=(configs[index::processes], config.compute_slots),
                    name=f"devices-{index}",
                    daemon=True,
                )
                worker.start()
                workers.append(worker)
                _STOP.check()
            cpu.start([w.pid for w in workers if w.pid is not None])
            watcher = threading.Thread(target=cpu.watch, args=(sampler.stopped,), daemon=True)
            watcher.start()
            _collect(server, events, config, result, started)
            result.federated_evaluation = federated_evaluation(server.store, result.model)
            finished = True
        finally:
            result.server_cpu_seconds = _cpu_seconds() - cpu_start
            # After the last round the server tells each device the federation ended, so
            # the workers leave by themselves; a stopped simulation (SIGTERM, Ctrl-C, an
            # error) has told them nothing, and waiting for that would only delay the stop.
            for w in workers if finished else ():
                w.join(timeout=15 + 0.01 * config.clients)
            for w in workers:
                if w.is_alive():
                    w.terminate()  # SIGTERM: each device finishes its step, then leaves
                    w.join(timeout=10)
                if w.is_alive():  # a step that waits for a server that is gone
                    w.kill()
                    w.join(timeout=5)
            result.devices_cpu_seconds = sum(cpu.workers.values())
            server.stop()
    result.peak_memory_bytes = sampler.peak_pss_bytes
    result.peak_rss_bytes = sampler.peak_rss_bytes
    result.memory_processes = sampler.peak_processes
    result.wall_seconds = time.perf_counter() - started
    result.load_average = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    done = [r for r in result.rounds if r["status"] == "completed"]
    if done:
        result.median_round_seconds = statistics.median(r["seconds"] for r in done)
        per_device = [r["bytes_per_device"] for r in done if r["bytes_per_device"] is not None]
        result.bytes_per_device = statistics.median(per_device) if per_device else None
    if config.report:
        Path(config.report).parent.mkdir(parents=True, exist_ok=True)
        Path(config.report).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _process_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a live process (all its threads), from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU seconds of the server process and of the device workers, read from /proc.

    The workers are the forkserver's children, not ours, so their rusage never
    reaches this process: each one's last reading while alive is kept (read every
    `MEMORY_INTERVAL_S` and at every round's end, so a worker's last half second
    may be missed). `split()` gives the CPU of each since the previous split: with
    a split at every round's end, the round's server and device CPU.
    """

    def __init__(self) -> None:
        self.workers: dict[int | None, float] = {}
        self._lock = threading.Lock()
        self._last = (0.0, 0.0)

    def start(self, pids: list[int | None]) -> None:
        with self._lock:
            self.workers = dict.fromkeys(pids, 0.0)
            self._last = (_cpu_seconds(), 0.0)

    def read(self) -> tuple[float, float]:
        with self._lock:
            for pid in self.workers:
                seconds = _process_cpu_seconds(pid)
                if seconds is not None:
                    self.workers[pid] = seconds
            return _cpu_seconds(), sum(self.workers.values())

    def split(self) -> tuple[float, float]:
        server, devices = self.read()
        with self._lock:
            last, self._last = self._last, (server, devices)
        return server - last[0], devices - last[1]

    def watch(self, stopped: threading.Event) -> None:
        while not stopped.wait(MEMORY_INTERVAL_S):
            self.read()


REGISTRATION_WAIT_S = 30.0
"""Longest wait for the fleet's registrations beyond 0.5 s per device (then rounds start
with the devices that did register)."""


def _await_registrations(
    server: XenoServer, config: SimulationConfig, show: Callable[[str], None]
) -> None:
    """Let rounds start (resume the coordinator) once every device has registered."""
    give_up = time.monotonic() + REGISTRATION_WAIT_S + 0.5 * config.clients
    registered = 0
    while time.monotonic() < give_up:
        registered = len(server.store.device_credentials())
        show(f"starting devices: {registered}/{config.clients} registered")
        if registered >= config.clients:
            break
        _STOP.check()
        time.sleep(1.0)
    else:
        log.warning(
            "only %d of %d devices registered in time; starting rounds with them",
            registered,
            config.clients,
        )
    server.coordinator.resume()


def _collect(
    server: XenoServer,
    events: queue.Queue[dict[str, Any]],
    config: SimulationConfig,
    result: SimulationResult,
    started: float,
) -> None:
    """Gather round events until the configured rounds completed, with a live display."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    completed = 0
    every = config.evaluation_interval()
    evaluations_due = config.rounds // every if every else 0
    evaluated = 0
    first = True
    with Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not config.progress,
        transient=False,
    ) as progress:
        bar = progress.add_task("rounds", total=config.rounds, status="starting devices...")
        _await_registrations(server, config, lambda status: progress.update(bar, status=status))
        while completed < config.rounds or evaluated < evaluations_due:
            _STOP.check()
            try:
                record = events.get(timeout=1.0)
            except queue.Empty:
                if server.coordinator.finished:
                    break
                if first:  # one line for the whole fleet, however large
                    waiting = server.coordinator.available_devices
                    progress.update(
                        bar,
                        status=f"starting devices: {waiting}/{config.clients} checked in, "
                        f"{config.cohort} per round",
                    )
                continue
            if record["kind"] == "evaluation":
                evaluated += 1  # stored; federated_evaluation reads the results back
                if record["status"] != "evaluated":
                    console.print(
                        f"[yellow]evaluation round {record['round']} failed: "
                        f"{record['failure_reason']}"
                    )
                continue
            if first:
                result.startup_seconds = time.perf_counter() - started - record["seconds"]
                first = False
            result.rounds.append(record)
            if record["status"] == "completed":
                completed += 1
                acc = record["accuracy"]
                status = (
                    f"participants {record['participants']}/{record['selected']}  "
                    + ("" if acc is None else f"accuracy {acc:.3f}  ")
                    + f"{record['seconds']:.2f}s/round"
                )
            else:
                status = f"round {record['round']} failed: {record['failure_reason']}"
                console.print(f"[yellow]{status}")
            progress.update(bar, completed=completed, status=status)


def print_result(result: SimulationResult, config: SimulationConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Federated training of {result.model}: {config.clients} devices in "
        f"{result.device_processes} process(es), {result.clients_per_round} per round"
    )
    # Federated accuracy (the devices' held-out data, summed counts) beside the server's.
    federated = {
        e["version"]: e["federated_accuracy"]
        for e in result.federated_evaluation
        if e["federated_accuracy"] is not None
    }
    columns = ["round", "version", "participants", "dropouts", "accuracy"]
    columns += ["federated accuracy"] if federated else []
    for col in (*columns, "loss", "seconds", "MB/device"):
        table.add_column(col, justify="right")
    for r in result.rounds:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        per_device = r.get("bytes_per_device")
        fed = federated.get(r["version"])
        cells = [
            str(r["round"]),
            str(r["version"] or "failed"),
            str(r["participants"]),
            str(r["dropouts"]),
            acc,
        ]
        cells += [("-" if fed is None else f"{fed:.4f}")] if federated else []
        per_device_mb = "-" if per_device is None else f"{per_device / 1e6:.2f}"
        table.add_row(*cells, loss, f"{r['seconds']:.2f}", per_device_mb)
    console = Console()
    console.print(table)
    done = [r for r in result.rounds if r["status"] == "completed"]
    if done and result.median_round_seconds is not None:
        acc = done[-1]["accuracy"]
        console.print(
            ("" if acc is None else f"final accuracy {acc:.4f} after {len(done)} rounds; ")
            + f"median round {result.median_round_seconds:.2f}s; total "
            f"{result.wall_seconds:.1f}s (device start-up {result.startup_seconds:.1f}s)",
            soft_wrap=True,
        )
    console.print(
        f"peak memory {result.peak_memory_bytes / 2**30:.2f} GiB (sum of PSS of the server "
        f"and {max(0, result.memory_processes - 1)} other processes, sampled every "
        f"{result.memory_interval_s:g}s as the RSS grows; sum of RSS "
        f"{result.peak_rss_bytes / 2**30:.2f} GiB); "
        f"CPU: server {result.server_cpu_seconds:.1f}s, devices "
        f"{result.devices_cpu_seconds:.1f}s; load average {result.load_average[0]:.2f} at the "
        f"start, {result.load_average[-1]:.2f} at the end",
        soft_wrap=True,
    )
    eps = [r["epsilon"] for r in done if r.get("epsilon") is not None]
    if eps:
        from common.privacy import privacy_status

        console.print(
            f"user-level privacy of the model: epsilon {eps[-1]:.3f} at delta {config.dp_delta:g} "
            f"({privacy_status(eps[-1])}); ledger: xeno-fl admin --db {result.db} privacy-report",
            soft_wrap=True,
        )
    scored = [e for e in result.federated_evaluation if e["federated_accuracy"] is not None]
    if scored:
        last = scored[-1]
        server_acc = last["server_accuracy"]
        personal = last["personalized_accuracy"]
        console.print(
            f"version {last['version']}: federated accuracy {last['federated_accuracy']:.4f} "
            f"on {last['devices']} devices' held-out data ({last['heldout_examples']} examples)"
            + ("" if server_acc is None else f", server-side {server_acc:.4f}")
            + ("" if personal is None else f", personalized {personal:.4f}"),
            soft_wrap=True,
        )
    console.print(f"database: {result.db}", soft_wrap=True)
    console.print(f"inspect it with: xeno-fl admin --db {result.db} rounds", soft_wrap=True)
    if config.report:
        console.print(f"report: {config.report}", soft_wrap=True)


class _StopSignal:
    """SIGTERM (docker-compose stop, kill) and Ctrl-C, acted on only at safe points.

    The handler only notes the signal; `check()`, called where the simulation waits
    (between worker starts, in the registration and round loops), turns it into a
    KeyboardInterrupt there, so run_simulation's cleanup always runs whole: it stops
    the device processes and the server. Raised asynchronously, at an arbitrary
    point, it could land inside a worker's start (a process forked, its pid never
    recorded, left running with the server's threads holding the simulation open).
    """

    def __init__(self) -> None:
        self.requested: int | None = None

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = signum

    def check(self) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"signal {self.requested}")

    def reset(self) -> None:
        self.requested = None


_STOP = _StopSignal()


def simulate(config: SimulationConfig) -> int:
    _STOP.reset()
    previous = {sig: signal.signal(sig, _STOP.handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = run_simulation(config)
    except KeyboardInterrupt:
        print("simulation stopped; its device processes have left")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _STOP.reset()
    print_result(result, config)
    completed = sum(r["status"] == "completed" for r in result.rounds)
    if completed < config.rounds:
        print(f"only {completed} of {config.rounds} rounds completed")
        return 1
    return 0


__all__ = ["SimulationConfig", "SimulationResult", "replace", "run_simulation", "simulate"]
