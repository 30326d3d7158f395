"""Privacy against utility: held-out accuracy of the digits federation at epsilon 1, 3, 8.

    python benchmarks/privacy_utility.py --devices 100 --rounds 20 --seeds 2 \\
        --plot docs/privacy_utility.png

Every run is a real federation: the server in this process, --devices
DeviceClients (threads inside --workers processes), each with its own gRPC
channel, its own sealed store and its own shard of the digits training data
(Dirichlet --alpha). Runs:

  user level, distributed  Skellam noise added by the devices under secure aggregation
  user level, central      the same clip, cohort and rounds without secure aggregation;
                           a trusted server adds Gaussian noise to the sum
  user level, none         secure aggregation, no noise (the reference)
  sample level             Opacus DP-SGD on every device (noise derived by each device
                           from the target epsilon over --rounds rounds), under secure
                           aggregation; mechanism "distributed", method "dp-sgd"

User-level noise is set by the server from the target epsilon (delta 1e-5)
over --rounds full releases (no amplification by sampling is claimed), so
both user-level mechanisms spend the same epsilon; the figure printed per run
is the one the server's ledger computed. Distributed noise is sized for
--min-contributors uploads (default: all devices, so both mechanisms add the
same noise; with fewer, every extra upload adds noise the ledger does not
count, the price of tolerating dropouts). Each DP configuration runs --seeds
times (fresh noise); "accuracy" is their mean.

dp_sgd_overhead: time per local epoch of the digits MLP (the whole training
split, batch 32, 5 epochs per measurement, setup excluded) with Opacus DP-SGD
as devices run it (`client.training.train_local_dp`: Poisson sampling, Opacus's
ghost-clipping optimizer and accountant, the clipped sum from PackedMLP's
one-pass ghost norms) over without (the loop of `train_local`), medians of 9,
measured alone before the federations start. `hooks_ratio` is the same for
Opacus's own `hooks` per-sample gradients, the method it replaces.

Prints one JSON line: {"runs": [...], "dp_sgd_overhead": R, ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dp_sgd_overhead(batch_size: int = 32, repeats: int = 9) -> dict[str, float]:
    import torch

    from client.training import DpSgdSettings, LocalTrainingConfig, train_local_dp
    from common.data import digits_split
    from common.models import MLP
    from common.tensors import flatten_state_dict

    torch.set_num_threads(1)
    train, _ = digits_split(0)
    model = MLP(64, [64], 10)
    start = flatten_state_dict(model.state_dict())
    epochs = 5
    config = LocalTrainingConfig(local_epochs=epochs, batch_size=batch_size)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y).long()

    def plain_epoch() -> float:
        # The loop of client.training.train_local, without its closing evaluation.
        from common.tensors import load_flat_into_module

        load_flat_into_module(model, start)
        opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
        began = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(len(y))
            for s in range(0, len(y), batch_size):
                idx = order[s : s + batch_size]
                opt.zero_grad(set_to_none=False)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        return (time.perf_counter() - began) / epochs

    def dp_epoch(module: torch.nn.Module) -> float:
        result = train_local_dp(module, start, train, config, DpSgdSettings(1.0, 1.0))
        return result.metrics["epoch_seconds"]

    as_hooks = copy.deepcopy(model.net)  # not an MLP: trains through Opacus's hooks
    plain_epoch(), dp_epoch(model), dp_epoch(as_hooks)  # warm-up
    plain = statistics.median(plain_epoch() for _ in range(repeats))
    dp = statistics.median(dp_epoch(model) for _ in range(repeats))
    hooks = statistics.median(dp_epoch(as_hooks) for _ in range(repeats))
    return {
        "plain_epoch_s": plain,
        "dp_sgd_epoch_s": dp,
        "hooks_epoch_s": hooks,
        "ratio": dp / plain,
        "hooks_ratio": hooks / plain,
    }


def device_worker(
    address: str, indices: list[int], base: dict[str, Any], state: str, owner: int
) -> None:
    import torch

    from client.runtime import ClientConfig, DeviceClient, load_partition

    torch.set_num_threads(1)
    stop = threading.Event()

    def stop_if_orphaned() -> None:
        # Killed benchmark: stop instead of retrying its dead server for ever. (Our parent is
        # the forkserver, which outlives it, so watch the benchmark's own process.)
        while not stop.wait(1.0):
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                stop.set()

    threading.Thread(target=stop_if_orphaned, daemon=True).start()
    clients = []
    for i in indices:
        config = ClientConfig(server=address, state_dir=f"{state}/device-{i}", partition=i, **base)
        clients.append(DeviceClient(config, load_partition(config), stop=stop))
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def federation(args: argparse.Namespace, ctx: Any, **server: Any) -> dict[str, Any]:
    """One federation to the end; the final held-out accuracy and the ledger's epsilon."""
    from server.app import ServerConfig, XenoServer

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            port=0,
            db=f"sqlite:///{tmp}/bench.db",
            clients_per_round=args.devices,
            min_clients=max(2, int(args.devices * 0.8)),
            rounds=args.rounds,
            strategy="fedavgm",
            local_epochs=5,
            batch_size=16,
            learning_rate=0.05,
            selection_window=120.0,
            round_deadline=300.0,
            secagg_phase_timeout=60.0,
            max_workers=max(64, 3 * args.devices),
            metrics_port=-1,
            data_seed=args.seed,
        )
        srv = XenoServer(replace(config, **server)).start()
        base = {
            "num_partitions": args.devices,
            "alpha": args.alpha,
            "data_seed": args.seed,
            "max_wait_ms": 5000,
            "max_backoff": 2.0,
            "allow_plaintext": not srv.config.secagg,  # the central-DP baseline runs plain
            # The sweep's large epsilons need less noise than the devices' default minimum.
            "min_noise_multiplier": 0.0,
        }
        shards = [list(range(args.devices))[w :: args.workers] for w in range(args.workers)]
        procs = [
            ctx.Process(target=device_worker, args=(srv.address, s, base, tmp, os.getpid()))
            for s in shards
        ]
        started = time.perf_counter()
        for p in procs:
            p.start()
        try:
            if not srv.coordinator.wait_finished(timeout=args.timeout):
                raise RuntimeError("the federation did not finish in time")
            seconds = time.perf_counter() - started
            versions = srv.store.list_versions(srv.config.model)
            accuracy = float(versions[-1].metrics["accuracy"])
            ledger = srv.store.privacy_ledger(srv.config.model)
            rounds = sum(r.status == "completed" for r in srv.store.list_rounds(srv.config.model))
            sample_eps = [
                float(p.metrics["dp_sgd_epsilon"])
                for r in srv.store.list_rounds(srv.config.model)
                for p in srv.store.round_participants(r.id)
                if "dp_sgd_epsilon" in (p.metrics or {})
            ]
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
            srv.stop(grace=0.5)
    return {
        "accuracy": accuracy,
        "rounds": rounds,
        "seconds": round(seconds, 1),
        "ledger_epsilon": ledger[-1].epsilon if ledger else None,
        "noise_multiplier": ledger[-1].noise_multiplier if ledger else None,
        "max_device_sample_epsilon": max(sample_eps) if sample_eps else None,
    }


def plot(runs: list[dict[str, Any]], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        ("user", "distributed"): ("user level, distributed (Skellam + SecAgg)", "o-"),
        ("user", "central"): ("user level, central (trusted server, Gaussian)", "s--"),
        ("sample", "distributed"): ("sample level, DP-SGD on devices", "^-."),
    }
    for (level, mechanism), (label, style) in styles.items():
        pts = sorted(
            (r["epsilon"], r["accuracy"], r.get("accuracy_se", 0.0))
            for r in runs
            if r["level"] == level and r["mechanism"] == mechanism
        )
        if pts:
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                fmt=style,
                capsize=3,
                label=label,
            )
    none = [r["accuracy"] for r in runs if r["mechanism"] == "none"]
    if none:
        ax.axhline(none[0], color="gray", linestyle=":", label="no DP (SecAgg only)")
    ax.set_xscale("log")
    ax.set_xticks(args.epsilons, [f"{e:g}" for e in args.epsilons])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"digits, {args.devices} devices, {args.rounds} rounds; "
        f"mean ± s.e. of {args.seeds} (user) / {args.sample_seeds or args.seeds} (sample) runs"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2, help="runs per user-level DP setting")
    parser.add_argument(
        "--sample-seeds", type=int, default=0, help="runs per sample-level setting (0: --seeds)"
    )
    parser.add_argument(
        "--epsilons", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 3.0, 8.0]
    )
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip", type=float, default=0.5, help="user-level clip C")
    parser.add_argument(
        "--min-contributors",
        type=int,
        default=0,
        help="distributed DP: uploads whose noise adds up to the target (default: --devices, "
        "the same noise as central DP; fewer tolerate dropouts at the price of more noise)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--plot", default="", help="write the accuracy/epsilon plot here")
    parser.add_argument("--skip-sample", action="store_true", help="user-level runs only")
    parser.add_argument(
        "--overhead-only", action="store_true", help="measure dp_sgd_overhead alone (no runs)"
    )
    args = parser.parse_args()
    if args.devices < 2:
        parser.error("--devices must be at least 2")
    os.environ.setdefault("XENO_DATA_KEY", os.urandom(32).hex())
    os.environ.setdefault("XENO_DEVICE_KEY", os.urandom(32).hex())
    import logging

    logging.basicConfig(level=logging.ERROR)

    overhead = dp_sgd_overhead()
    epoch_seconds = {k: round(v, 5) for k, v in overhead.items() if "ratio" not in k}
    if args.overhead_only:
        print(
            json.dumps(
                {
                    "runs": [],
                    "dp_sgd_overhead": round(overhead["ratio"], 3),
                    "hooks_overhead": round(overhead["hooks_ratio"], 3),
                    "dp_sgd_epoch_seconds": epoch_seconds,
                }
            )
        )
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "grpc", "client.runtime"])
    runs: list[dict[str, Any]] = []

    def record(
        level: str, mechanism: str, eps: float | None, results: list[dict[str, Any]], **extra: Any
    ) -> None:
        accs = [r["accuracy"] for r in results]
        runs.append(
            {
                "level": level,
                "mechanism": mechanism,
                "epsilon": eps,
                "accuracy": round(statistics.fmean(accs), 4),
                # standard error of the mean: single runs at epsilon 1 spread by +-7 points
                "accuracy_se": round(statistics.stdev(accs) / len(accs) ** 0.5, 4)
                if len(accs) > 1
                else 0.0,
                "accuracy_runs": [round(a, 4) for a in accs],
                **extra,
                "details": results,
            }
        )
        print(
            f"{level:6} {mechanism:11} eps={eps} acc={statistics.fmean(accs):.4f} {accs}",
            file=sys.stderr,
            flush=True,
        )

    clip = {"dp_clip_norm": args.clip, "dp_min_contributors": args.min_contributors or args.devices}
    none = [federation(args, ctx)]
    record("user", "none", None, none)
    for eps in args.epsilons:
        record(
            "user",
            "distributed",
            eps,
            [
                federation(args, ctx, dp="distributed", dp_target_epsilon=eps, **clip)
                for _ in range(args.seeds)
            ],
        )
        record(
            "user",
            "central",
            eps,
            [
                federation(args, ctx, dp="central", secagg=False, dp_target_epsilon=eps, **clip)
                for _ in range(args.seeds)
            ],
        )
    if not args.skip_sample:
        runs.append({**runs[0], "level": "sample", "note": "the same no-DP run as level user"})
        for eps in args.epsilons:
            record(
                "sample",
                "distributed",
                eps,
                [
                    federation(
                        args,
                        ctx,
                        dp_sgd=True,
                        dp_sgd_target_epsilon=eps,
                        dp_sgd_max_grad_norm=1.0,
                        local_epochs=1,
                        batch_size=4,
                        learning_rate=0.1,
                    )
                    for _ in range(args.sample_seeds or args.seeds)
                ],
                method="dp-sgd",
            )

    def user_run(mechanism: str, eps: float) -> dict[str, Any]:
        return next(
            r
            for r in runs
            if r["level"] == "user" and r["mechanism"] == mechanism and r["epsilon"] == eps
        )

    gaps: dict[str, dict[str, float]] = {}
    for eps in args.epsilons:
        central, distributed = user_run("central", eps), user_run("distributed", eps)
        gaps[str(eps)] = {
            "points": round(100 * (central["accuracy"] - distributed["accuracy"]), 2),
            "se_points": round(
                100 * (central["accuracy_se"] ** 2 + distributed["accuracy_se"] ** 2) ** 0.5, 2
            ),
        }
    if args.plot:
        plot(runs, args.plot, args)
    print(
        json.dumps(
            {
                "runs": runs,
                "dp_sgd_overhead": round(overhead["ratio"], 3),
                "hooks_overhead": round(overhead["hooks_ratio"], 3),
                "dp_sgd_epoch_seconds": epoch_seconds,
                "central_minus_distributed": gaps,
                "devices": args.devices,
                "rounds": args.rounds,
                "seeds": args.seeds,
                "sample_seeds": args.sample_seeds or args.seeds,
                "delta": 1e-5,
            }
        )
    )


if __name__ == "__main__":
    main()
