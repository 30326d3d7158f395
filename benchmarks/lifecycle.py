"""Model lifecycle benchmark: one JSON line with, per database (SQLite, and PostgreSQL when given):

- `assign_variant_per_s`: ABTestingManager.assign_variant calls per second (sticky hash,
  the test's status cached for a second);
- `analyze_test_s`: ABTestingManager.analyze_test over `--results` recorded results
  (half per arm; default 1,000,000);
- `get_trend_s`: PerformanceTracker.get_trend over `--points` recorded values (default 100,000);
- `rollback_to_serving_s`: on a running server with devices training, from the Rollback
  admin call to the first round that serves the rolled-back version (a round in flight
  is first failed as superseded).

    python benchmarks/lifecycle.py
    python benchmarks/lifecycle.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

Loading the results and points (bulk inserts) and the one-time import of scipy.stats
are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("XENO_DATA_KEY", "33" * 32)
os.environ.setdefault("XENO_DEVICE_KEY", "44" * 32)

import grpc
import numpy as np
import torch

from client.runtime import ClientConfig, DeviceClient, load_partition
from common.models import ModelSpec, build_model
from common.pb import admin_pb2, admin_pb2_grpc
from server.app import ServerConfig, XenoServer
from xeno.model_versioning import (
    ABTestingManager,
    ModelVersionControl,
    PerformanceTracker,
)

SPEC = ModelSpec("mlp", {"input_dim": 64, "hidden": [64], "num_classes": 10})


def measure_api(url: str, results: int, points: int, assigns: int) -> dict[str, Any]:
    from server.lifecycle.stats import Direction, trend, welch

    # scipy.stats is imported on first use (about a second): not part of the figures.
    trend(np.arange(5.0), Direction.HIGHER)
    welch(3, 0.0, 1.0, 3, 1.0, 1.0)
    vcs = ModelVersionControl(db=url)
    vcs.create_version("bench", build_model(SPEC, seed=1), "bench")
    vcs.create_version("bench", build_model(SPEC, seed=2), "bench")
    ab = ABTestingManager(store=vcs._store)
    ab.create_test("bench-test", "bench:1", "bench:2", 0.5, ["satisfaction"])
    users = [f"user-{i}" for i in range(assigns)]
    ab.assign_variant("bench-test", users[0])
    started = time.perf_counter()
    for u in users:
        ab.assign_variant("bench-test", u)
    assign_per_s = assigns / (time.perf_counter() - started)
    rng = np.random.default_rng(0)
    half = results // 2
    for arm, mean in (("variant_a", 4.0), ("variant_b", 4.01)):
        for start in range(0, half, 100_000):
            size = min(100_000, half - start)
            ab._tests.record_many("bench-test", arm, "satisfaction", rng.normal(mean, 1, size))
    started = time.perf_counter()
    analysis = ab.analyze_test("bench-test")
    analyze_s = time.perf_counter() - started
    tracker = PerformanceTracker(store=vcs._store)
    series = 0.9 - 1e-7 * np.arange(points) + rng.normal(0, 0.01, points)
    for start in range(0, points, 50_000):
        tracker._log.record_many("bench", "accuracy", series[start : start + 50_000])
    started = time.perf_counter()
    trend = tracker.get_trend("bench", "accuracy")
    trend_s = time.perf_counter() - started
    vcs.close()
    sat = analysis["metrics"]["satisfaction"]
    return {
        "assign_variant_per_s": round(assign_per_s),
        "analyze_test_s": round(analyze_s, 3),
        "analyze_results": sat["count_a"] + sat["count_b"],
        "analyze_p_value": sat["p_value"],
        "get_trend_s": round(trend_s, 3),
        "get_trend_points": points,
        "trend": trend,
    }


def measure_rollback(url: str, tmp: str) -> float:
    torch.set_num_threads(1)
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        db=url,
        min_clients=2,
        clients_per_round=2,
        selection_window=0.5,
        local_epochs=1,
        secagg=False,
        metrics_port=-1,
        max_workers=32,
    )
    server = XenoServer(config).start()
    stop = threading.Event()
    devices = []
    for i in range(2):
        cc = ClientConfig(
            server=server.address,
            state_dir=f"{tmp}/dev-{uuid.uuid4().hex[:6]}",
            partition=i,
            num_partitions=2,
            max_wait_ms=2000,
            max_backoff=1.0,
            allow_plaintext=True,
        )
        client = DeviceClient(cc, load_partition(cc), stop)
        threading.Thread(target=client.run, daemon=True).start()
        devices.append(client)
    serving = threading.Event()
    target: dict[str, int] = {}

    def on_start(round_id: str) -> None:
        rnd = server.coordinator._round  # the round that just started
        if rnd is not None and rnd.base_version == target.get("head"):
            serving.set()

    server.coordinator.add_start_listener(on_start)
    name = config.model
    try:
        deadline = time.monotonic() + 120
        while server.store.get_model(name).current_version < 3:  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("no rounds completed")
            time.sleep(0.05)
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            started = time.perf_counter()
            resp = admin.Rollback(
                admin_pb2.RollbackRequest(model_name=name, target_version=1), timeout=30
            )
            target["head"] = resp.version
            if not serving.wait(timeout=120):
                raise RuntimeError("the rolled-back version was never served")
            return time.perf_counter() - started
    finally:
        stop.set()
        for d in devices:
            d.close()
        server.stop(grace=0.5)


def fresh_postgres(base: str) -> tuple[str, Any]:
    from sqlalchemy import create_engine, text

    schema = "bench_" + uuid.uuid4().hex[:10]
    engine = create_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"

    def drop() -> None:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()

    return f"{base}{sep}options=-csearch_path%3D{schema}", drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--assigns", type=int, default=100_000)
    parser.add_argument("--postgres", default=os.environ.get("XENO_BENCH_POSTGRES_URL", ""))
    parser.add_argument("--no-rollback", action="store_true", help="skip the running server")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("sqlite", lambda name: (f"sqlite:///{tmp}/{name}.db", lambda: None))]
        if args.postgres:
            targets.append(("postgresql", lambda _name: fresh_postgres(args.postgres)))
        for db, make in targets:
            url, drop = make("api")
            try:
                figures = measure_api(url, args.results, args.points, args.assigns)
            finally:
                drop()
            if not args.no_rollback:
                url, drop = make("server")
                try:
                    figures["rollback_to_serving_s"] = round(measure_rollback(url, tmp), 3)
                finally:
                    drop()
            out[db] = figures
    print(json.dumps(out))


if __name__ == "__main__":
    main()
