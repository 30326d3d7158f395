"""Round benchmark: a real server and N device processes on loopback, one JSON line out.

    python benchmarks/round.py --clients 10 --rounds 20
    python benchmarks/round.py --clients 10 --rounds 10 --params 1000000

`--params P` picks an MLP of about P parameters (0: the 64-64-10 digits MLP).
Device start-up (process spawn, torch import, data loading) is excluded from
round times and reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xeno.simulation import SimulationConfig, run_simulation


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--params", type=int, default=0, help="model size (0: digits MLP 64-64-10)")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--secagg", action="store_true", help="secure aggregation on (default: plain rounds)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_simulation(
            SimulationConfig(
                clients=args.clients,
                rounds=args.rounds,
                db=f"sqlite:///{tmp}/bench.db",
                params=args.params,
                local_epochs=args.local_epochs,
                seed=args.seed,
                progress=False,
                round_deadline=600.0,
                secagg=args.secagg,
                data_key_file=f"{tmp}/bench.key",
            )
        )
    done = [r for r in result.rounds if r["status"] == "completed"]
    if not done:
        raise SystemExit("no round completed")
    seconds = [r["seconds"] for r in done]
    per_device = [(r["bytes_in"] + r["bytes_out"]) / r["participants"] for r in done]
    print(
        json.dumps(
            {
                "clients": args.clients,
                "secagg": args.secagg,
                "rounds": len(done),
                "params": args.params or 5258,
                "round_seconds_median": round(statistics.median(seconds), 4),
                "round_seconds_p90": round(sorted(seconds)[int(0.9 * (len(seconds) - 1))], 4),
                "first_round_seconds": round(seconds[0], 4),
                "server_cpu_seconds_per_round": round(result.server_cpu_seconds / len(done), 4),
                "bytes_per_device": int(statistics.median(per_device)),
                "final_accuracy": round(done[-1]["accuracy"], 4),
                "device_startup_seconds": round(result.startup_seconds, 2),
                "wall_seconds": round(result.wall_seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
