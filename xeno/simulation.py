"""`xeno-fl simulate`: a real server plus N device-client processes on loopback.

The server runs in this process (so its CPU time is measurable on its own);
each device is a separate long-lived process started from a forkserver
that has already imported torch, so starting ten devices costs one torch
import, not ten. Devices talk to the server over real gRPC on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from client.runtime import ClientConfig, run_device
from common.atrest import write_new_key
from common.config import setting
from common.tasks import TaskName
from server.app import ServerConfig, XenoServer
from server.rounds import RoundSummary

log = logging.getLogger("xeno.simulate")

INTENTS_LEARNING_RATE = 5.0
"""Local SGD rate of the text model: its inputs are means over ~100 feature rows that start
at +-1/dim, so each row's gradient is ~1/100 of a digits MLP weight's; 0.05 barely moves it."""

INTENTS_SECAGG_CLIP_NORM = 500.0
"""Secure aggregation's L2 clip for the text model: one local epoch over a few thousand queries
moves it by ~140 (five by ~320), where the digits default of 10 would shrink every update ~15x.
The fixed-point step grows with the clip (n C / 2^31, 2.3e-4 at 1,000 devices): still far
below the weights' scale."""


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of a local simulated federation."""

    clients: int = setting(10, "number of device-client processes", "XENO_SIM_CLIENTS")
    rounds: int = setting(20, "rounds to complete", "XENO_SIM_ROUNDS")
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
        "devices' local SGD learning rate (0: the task's, 0.05 for digits and "
        f"{INTENTS_LEARNING_RATE:g} for intents)",
        "XENO_LEARNING_RATE",
    )
    params: int = setting(
        0, "size the MLP for about this many parameters (0: 64-64-10)", "XENO_PARAMS"
    )
    strategy: str = setting(
        "fedavg", "fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad", "XENO_STRATEGY"
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
        60.0, "seconds before a round closes with what it has", "XENO_ROUND_DEADLINE"
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


@dataclass
class SimulationResult:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    db: str = ""
    model: str = ""
    server_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
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


def _device_main(config: ClientConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s device %(message)s")
    run_device(config, install_signal_handlers=True)


def run_simulation(config: SimulationConfig) -> SimulationResult:
    if config.clients < 1 or config.rounds < 1:
        raise ValueError("--clients and --rounds must be at least 1")
    started = time.perf_counter()
    if not os.environ.get("XENO_DATA_KEY") and not Path(config.data_key_file).exists():
        write_new_key(config.data_key_file)
    task = TaskName.parse(config.task)
    learning_rate = config.learning_rate or (
        INTENTS_LEARNING_RATE if task is TaskName.INTENTS else 0.05
    )
    server_config = ServerConfig(
        data_key_file=config.data_key_file,
        host="127.0.0.1",
        port=config.port,
        db=config.db,
        task=task.value,
        model=config.model,
        learning_rate=learning_rate,
        params=config.params,
        seed=config.seed,
        data_seed=config.seed,
        strategy=config.strategy,
        local_epochs=config.local_epochs,
        personalization=config.personalization,
        min_clients=min(config.min_clients, config.clients),
        clients_per_round=config.clients,
        round_deadline=config.round_deadline,
        rounds=config.rounds,
        secagg=config.secagg,
        dp=config.dp,
        dp_target_epsilon=config.dp_target_epsilon,
        dp_clip_norm=config.dp_clip_norm,
        privacy_budget=config.privacy_budget,
        dp_sgd=config.dp_sgd_target_epsilon > 0,
        dp_sgd_target_epsilon=config.dp_sgd_target_epsilon,
        metrics_port=-1,
        eval_every=config.evaluation_interval(),
        # Wait for the whole simulated fleet: a round starts as soon as all devices are in,
        # and only after this long with fewer (device processes start slowly on a busy machine).
        selection_window=30.0,
    )
    if task is TaskName.INTENTS:
        server_config = replace(server_config, secagg_clip_norm=INTENTS_SECAGG_CLIP_NORM)
    server = XenoServer(server_config)
    events: queue.Queue[RoundSummary] = queue.Queue()
    server.coordinator.add_listener(events.put)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sklearn.datasets", "client.runtime", "xeno.simulation"])
    result = SimulationResult(db=config.db, model=server_config.model)
    with tempfile.TemporaryDirectory(prefix="xeno-sim-") as state_root:
        device_key = str(Path(state_root) / "device.key")
        write_new_key(device_key)
        server.start()
        cpu_start = _cpu_seconds()
        devices = [
            ctx.Process(
                target=_device_main,
                args=(
                    ClientConfig(
                        server=server.address,
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
                        min_secagg_cohort=max(2, min(5, config.clients)),
                    ),
                ),
                name=f"device-{i}",
                daemon=True,
            )
            for i in range(config.clients)
        ]
        for d in devices:
            d.start()
        try:
            _collect(server, events, config, result, started)
            result.federated_evaluation = federated_evaluation(server.store, result.model)
        finally:
            result.server_cpu_seconds = _cpu_seconds() - cpu_start
            for d in devices:
                d.join(timeout=15)
            for d in devices:
                if d.is_alive():
                    d.terminate()
                    d.join(timeout=5)
            server.stop()
    result.wall_seconds = time.perf_counter() - started
    if config.report:
        Path(config.report).parent.mkdir(parents=True, exist_ok=True)
        Path(config.report).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _collect(
    server: XenoServer,
    events: queue.Queue[RoundSummary],
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
        while completed < config.rounds or evaluated < evaluations_due:
            try:
                summary = events.get(timeout=1.0)
            except queue.Empty:
                if server.coordinator.finished:
                    break
                continue
            if summary.kind == "evaluation":
                evaluated += 1  # stored; federated_evaluation reads the results back
                if summary.status != "evaluated":
                    console.print(
                        f"[yellow]evaluation round {summary.number} failed: "
                        f"{summary.failure_reason}"
                    )
                continue
            if first:
                result.startup_seconds = time.perf_counter() - started - summary.seconds
                first = False
            result.rounds.append(_round_record(summary))
            if summary.status == "completed":
                completed += 1
                acc = summary.metrics.get("accuracy")
                status = (
                    f"participants {summary.participants}/{summary.selected}  accuracy {acc:.3f}  "
                    if acc is not None
                    else ""
                ) + f"{summary.seconds:.2f}s/round"
            else:
                status = f"round {summary.number} failed: {summary.failure_reason}"
                console.print(f"[yellow]{status}")
            progress.update(bar, completed=completed, status=status)


def print_result(result: SimulationResult, config: SimulationConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Federated training of {result.model}: {config.clients} devices")
    # Federated accuracy (the devices' held-out data, summed counts) beside the server's.
    federated = {
        e["version"]: e["federated_accuracy"]
        for e in result.federated_evaluation
        if e["federated_accuracy"] is not None
    }
    columns = ["round", "version", "participants", "dropouts", "accuracy"]
    columns += ["federated accuracy"] if federated else []
    for col in (*columns, "loss", "seconds"):
        table.add_column(col, justify="right")
    for r in result.rounds:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        fed = federated.get(r["version"])
        cells = [
            str(r["round"]),
            str(r["version"] or "failed"),
            str(r["participants"]),
            str(r["dropouts"]),
            acc,
        ]
        cells += [("-" if fed is None else f"{fed:.4f}")] if federated else []
        table.add_row(*cells, loss, f"{r['seconds']:.2f}")
    console = Console()
    console.print(table)
    done = [r for r in result.rounds if r["status"] == "completed"]
    secs = [r["seconds"] for r in done]
    if done:
        console.print(
            f"final accuracy {done[-1]['accuracy']:.4f} after {len(done)} rounds; "
            f"median round {statistics.median(secs):.2f}s; total {result.wall_seconds:.1f}s "
            f"(device start-up {result.startup_seconds:.1f}s)"
        )
    eps = [r["epsilon"] for r in done if r.get("epsilon") is not None]
    if eps:
        from common.privacy import privacy_status

        console.print(
            f"user-level privacy of the model: epsilon {eps[-1]:.3f} at delta 1e-5 "
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


def simulate(config: SimulationConfig) -> int:
    result = run_simulation(config)
    print_result(result, config)
    completed = sum(r["status"] == "completed" for r in result.rounds)
    if completed < config.rounds:
        print(f"only {completed} of {config.rounds} rounds completed")
        return 1
    return 0


__all__ = ["SimulationConfig", "SimulationResult", "replace", "run_simulation", "simulate"]
