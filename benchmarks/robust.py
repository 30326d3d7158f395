"""Robust aggregation cost: seconds per rule over n stacked updates of d parameters; one JSON line.

    python benchmarks/robust.py --clients 10 --params 1000000

Times `combine` of each robust strategy (and the plain mean, for scale) on
normal random float32 updates, best of --repeat runs, in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.strategies import RobustStrategy, make_strategy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    updates = np.random.default_rng(0).normal(size=(args.clients, args.params)).astype(np.float32)
    seconds: dict[str, float] = {}
    best = float("inf")
    for _ in range(args.repeat):
        started = time.perf_counter()
        updates.mean(axis=0, dtype=np.float64)
        best = min(best, time.perf_counter() - started)
    seconds["mean"] = round(best, 4)
    for name in ("median", "trimmed-mean", "krum", "multi-krum"):
        strategy = make_strategy(name)
        assert isinstance(strategy, RobustStrategy)
        best = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            strategy.combine(updates)
            best = min(best, time.perf_counter() - started)
        seconds[name] = round(best, 4)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "params": args.params,
                "held_bytes": int(updates.nbytes),
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
