"""Poisoning benchmark: one of ten devices poisons its update, over real gRPC; one JSON line out.

    python benchmarks/poisoning.py --rounds 8

For each strategy (fedavg, median, trimmed-mean, multi-krum) a real server in
plain mode (`--no-secagg`) and ten real device clients (threads of this process,
loopback gRPC, near-IID digits shards: Dirichlet alpha 100) run the federation
clean and with device 0 uploading 100 x its update ("scaled") or -10 x its update
("sign-flipped"); the attacker is the unmodified device code with its upload
multiplied. Prints the final held-out accuracy of every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.runtime import ClientConfig, DeviceClient, load_partition
from common.atrest import write_new_key
from common.pb import federation_pb2 as pb
from common.tensors import Manifest
from server.app import ServerConfig, XenoServer

ATTACKS = {"scaled": 100.0, "sign-flipped": -10.0}


class PoisoningDevice(DeviceClient):
    """The real device, except that its update is multiplied by `factor` before upload."""

    factor = 1.0

    def _upload(
        self,
        task: pb.Task,
        manifest: Manifest,
        delta: np.ndarray,
        num_examples: int,
        timeout: float,
    ) -> None:
        super()._upload(task, manifest, delta * np.float32(self.factor), num_examples, timeout)


def federation(strategy: str, attack: str | None, args: argparse.Namespace, tmp: str) -> float:
    run = f"{strategy}-{attack or 'clean'}"
    server = XenoServer(
        ServerConfig(
            port=0,
            db=f"sqlite:///{tmp}/{run}.db",
            strategy=strategy,
            secagg=False,
            min_clients=args.devices,
            clients_per_round=args.devices,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            selection_window=30.0,
            round_deadline=300.0,
            metrics_port=-1,
            data_seed=args.seed,
            seed=args.seed,
            data_key_file=f"{tmp}/data.key",
        )
    ).start()
    stop = threading.Event()
    devices: list[DeviceClient] = []
    try:
        for i in range(args.devices):
            config = ClientConfig(
                server=server.address,
                state_dir=f"{tmp}/{run}/device-{i}",
                partition=i,
                num_partitions=args.devices,
                alpha=args.alpha,
                data_seed=args.seed,
                seed=args.seed * 1000 + i,
                allow_plaintext=True,
                max_wait_ms=2000,
                max_backoff=1.0,
                device_key_file=f"{tmp}/device.key",
            )
            kind = PoisoningDevice if (attack and i == 0) else DeviceClient
            device = kind(config, load_partition(config), stop)
            if isinstance(device, PoisoningDevice):
                device.factor = ATTACKS[attack or ""]
            devices.append(device)
        threads = [threading.Thread(target=d.run, daemon=True) for d in devices]
        for t in threads:
            t.start()
        if not server.coordinator.wait_finished(timeout=60.0 * args.rounds):
            raise SystemExit(f"{run}: the federation did not finish")
        version = server.store.list_versions(server.config.model)[-1]
        return float(version.metrics["accuracy"])
    finally:
        stop.set()
        for d in devices:
            d.close()
        server.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategies", default="fedavg,median,trimmed-mean,multi-krum", help="comma-separated"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    accuracy: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_new_key(f"{tmp}/data.key")
        write_new_key(f"{tmp}/device.key")
        for strategy in args.strategies.split(","):
            accuracy[strategy] = {
                attack or "clean": round(federation(strategy, attack, args, tmp), 4)
                for attack in (None, *ATTACKS)
            }
    print(
        json.dumps(
            {
                "devices": args.devices,
                "poisoners": 1,
                "rounds": args.rounds,
                "alpha": args.alpha,
                "attacks": {k: f"update x {v:g}" for k, v in ATTACKS.items()},
                "accuracy": accuracy,
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
