"""Steady-state database size with and without retention; one JSON line out.

    python benchmarks/retention.py --params 50000 --rounds 400 --keep-versions 50 --keep-every 100

Writes what the server writes per completed round (the round's start, then its new
version, record and participants in one commit) into a fresh SQLite database, with
the server's retention after each round (`RoundCoordinator.apply_retention`: the
newest N versions, every K-th, protected ones; a few versions per transaction), and
again with retention off. Sizes are the database file after a WAL checkpoint:
SQLite reuses the pages of deleted blobs, so the file stops growing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.models import build_model, mlp_for_params
from common.tensors import Manifest, flatten_state_dict
from server.store import Store


def _size(store: Store, path: Path) -> int:
    with store.engine.connect() as conn:
        conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    return path.stat().st_size


def run(params: int, rounds: int, keep: int, every: int, batch: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fl.db"
        store = Store(f"sqlite:///{path}")
        store.create_schema()
        spec = mlp_for_params(params)
        state = build_model(spec).state_dict()
        weights = flatten_state_dict(state)
        store.create_model("m", spec, Manifest.from_state_dict(state), "fedavg", weights)
        rng = np.random.default_rng(0)
        sizes: list[int] = []
        started = time.perf_counter()
        for number in range(1, rounds + 1):
            round_id = uuid.uuid4().hex
            store.start_round("m", round_id, number, number, 3)  # based on version `number`
            weights = weights + rng.normal(0, 0.01, weights.size).astype(np.float32)
            store.complete_round("m", round_id, weights, {"accuracy": 0.5}, 0.1, [])
            if keep:
                while store.prune_versions("m", keep, every, batch, keep_restored=True):
                    pass
            if number % max(1, rounds // 20) == 0:
                sizes.append(_size(store, path))
        seconds = time.perf_counter() - started
        versions = len(store.list_versions("m"))
        final = _size(store, path)
        store.close()
    return {
        "keep_versions": keep,
        "keep_every": every,
        "versions_kept": versions,
        "db_mb": round(final / 2**20, 2),
        "db_mb_by_round": [round(s / 2**20, 2) for s in sizes],
        "ms_per_round": round(1000 * seconds / rounds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=50_000, help="about this many parameters")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--keep-versions", type=int, default=50)
    parser.add_argument("--keep-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    manifest = Manifest.from_state_dict(build_model(mlp_for_params(args.params)).state_dict())
    blob_kb = manifest.total_bytes / 1024
    print(
        json.dumps(
            {
                "params": manifest.total_elements,
                "blob_kb": round(blob_kb, 1),
                "rounds": args.rounds,
                "with_retention": run(
                    args.params, args.rounds, args.keep_versions, args.keep_every, args.batch
                ),
                "without_retention": run(args.params, args.rounds, 0, 0, args.batch),
            }
        )
    )


if __name__ == "__main__":
    main()
