"""A secure-aggregation round of a large cohort over real gRPC; one JSON line.

    python benchmarks/cohort.py --clients 1000 --params 1000 --workers 4

The server runs in this process with its default worker pool (`--max-workers`
32); devices are threads in --workers processes, each running the real
device-side SecAgg+ code (`client.secagg.SecAggDevice`: key agreement,
Shamir shares, AES-GCM, masking, the unmask checks) with a random update of
--params values, over one channel per --devices-per-channel devices. Every
device registers, long-polls CheckIn until the cohort is selected, and then
all run the four phases at once. Reported:

  round_wall_s          from the go signal to the round's new version
  server_phase_s        wall time of each secure-aggregation phase
  server_threads_peak   most threads alive in the server process during the round
  server_threads_pool   the server's worker pool (--max-workers)
  server_calls_peak     most calls in progress at once on the server
  correct               the new model moved by the plaintext weighted mean, within the bound

With the former thread-per-call server, each device waiting in a phase held a
worker thread, so a cohort larger than the pool (256) could not complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WEIGHT_RANGE = (50, 500)


def update_for(index: int, d: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(1000 + index)
    return rng.normal(0, 0.01, d).astype(np.float32), int(rng.integers(*WEIGHT_RANGE))


def worker(
    address: str,
    indices: list[int],
    d: int,
    per_channel: int,
    state_dir: str,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    import grpc
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from client.secagg import SecAggDevice
    from client.storage import IdentityStore, LocalStore
    from common.atrest import Sealer
    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc

    channels = [
        grpc.insecure_channel(address, options=[("grpc.enable_retries", 0)])
        for _ in range(0, len(indices), per_channel)
    ]
    stubs = [federation_pb2_grpc.FederationStub(c) for c in channels]
    devices = []
    for j, i in enumerate(indices):
        stub = stubs[j // per_channel]
        store = IdentityStore(LocalStore(f"{state_dir}/dev{i}", Sealer(os.urandom(32))))
        identity = store.load_or_create()
        resp = stub.Register(
            pb.RegisterRequest(
                identity_public_key=identity.public_key().public_bytes(
                    Encoding.Raw, PublicFormat.Raw
                )
            ),
            timeout=120,
        )
        md = (("x-xeno-device-id", resp.device_id), ("authorization", f"Bearer {resp.token}"))
        devices.append((i, stub, resp.device_id, md, identity, store))
    tasks: dict[int, Any] = {}

    def check_in(entry: tuple[Any, ...]) -> None:
        i, stub, _, md, _, _ = entry
        while True:
            resp = stub.CheckIn(pb.CheckInRequest(max_wait_ms=10_000), metadata=md, timeout=120)
            if resp.WhichOneof("outcome") == "task":
                tasks[i] = resp.task
                return

    threads = [threading.Thread(target=check_in, args=(e,)) for e in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ready.put(len(devices))
    go.wait()

    class Device(SecAggDevice):
        step = "encode"

        def _call(self, method: str, request: Any) -> Any:
            self.step = method
            return super()._call(method, request)

        def _upload(self, masked: Any) -> None:
            self.step = "UploadMasked"
            super()._upload(masked)

    def run(entry: tuple[Any, ...]) -> None:
        i, stub, device_id, md, identity, store = entry
        update, weight = update_for(i, d)
        device = Device(stub, md, device_id, identity, store, tasks[i], timeout=lambda: 900.0)
        ok = True
        try:
            device.run(update, weight)
        except grpc.RpcError as err:  # report it, and never leave the driver waiting
            why = f"{err.code().name} {err.details()}"
            print(f"device {i} in {device.step}: {why}", file=sys.stderr)
            ok = False
        except Exception as exc:
            print(f"device {i} in {device.step}: {exc!r}", file=sys.stderr)
            ok = False
        results.put((i, ok))

    threads = [threading.Thread(target=run, args=(e,)) for e in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in channels:
        c.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--devices-per-channel", type=int, default=10)
    parser.add_argument("--phase-timeout", type=float, default=300.0)
    args = parser.parse_args()

    from server.app import ServerConfig, XenoServer

    os.environ.setdefault("XENO_DATA_KEY", os.urandom(32).hex())  # an ephemeral benchmark key
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "grpc", "cryptography", "client.secagg"])
    n = args.clients
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            port=0,
            db=f"sqlite:///{tmp}/bench.db",
            params=args.params,
            eval_data="none",
            clients_per_round=n,
            min_clients=2,
            secagg=True,
            secagg_phase_timeout=args.phase_timeout,
            call_timeout=args.phase_timeout + 60.0,
            round_deadline=1800.0,
            selection_window=1800.0,
            rounds=1,
            metrics_port=-1,
            # Every simulated device shares one address: lift the per-address limits.
            peer_register_rate=1e6,
            peer_register_burst=1e6,
            peer_checkin_rate=1e6,
            peer_checkin_burst=1e6,
        )
        server = XenoServer(config).start()
        d = server.coordinator.model.manifest.total_elements
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        chunks = [list(range(n))[w :: args.workers] for w in range(args.workers)]
        procs = [
            ctx.Process(
                target=worker,
                args=(server.address, c, d, args.devices_per_channel, tmp, ready, go, results),
            )
            for c in chunks
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=1800)
        base = server.store.load_version(config.model, 1).astype(np.float64)
        peak = {"threads": threading.active_count(), "calls": 0}
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                peak["threads"] = max(peak["threads"], threading.active_count())
                peak["calls"] = max(peak["calls"], server.guard.calls.active)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        go.set()
        assert server.coordinator.wait_finished(timeout=1800), "round did not finish"
        wall = time.perf_counter() - started
        watching.set()
        watcher.join()
        rows = [results.get(timeout=600) for _ in range(n)]
        for p in procs:
            p.join(timeout=60)
        [rnd] = server.store.list_rounds(config.model)
        new = server.store.load_version(config.model, 2).astype(np.float64)
        secagg: dict[str, Any] = server.coordinator.last_secagg_stats
        server.stop(grace=0.5)
    from common.quantize import FixedPoint, clip_l2

    fp = FixedPoint.for_round(config.secagg_clip_norm, n, config.secagg_max_weight)
    included = [i for i, ok in rows if ok]
    weights = {i: min(update_for(i, d)[1], fp.max_weight) for i in included}
    mean = sum(
        clip_l2(update_for(i, d)[0], fp.clip_norm)[0].astype(np.float64) * weights[i]
        for i in included
    ) / sum(weights.values())
    bound = fp.error_bound(n) / (sum(weights.values()) / fp.max_weight)
    error = float(np.max(np.abs((new - base) - mean)))
    print(
        json.dumps(
            {
                "clients": n,
                "params": d,
                "degree": secagg["degree"],
                "threshold": secagg["threshold"],
                "round_wall_s": round(wall, 2),
                "server_phase_s": {k: round(v, 2) for k, v in secagg["phase_seconds"].items()},
                "server_threads_peak": peak["threads"],
                "server_threads_pool": config.max_workers,
                "server_calls_peak": peak["calls"],
                "participants": rnd.participants,
                "devices_failed": n - len(included),
                "max_abs_error": error,
                "error_bound": bound,
                "correct": bool(rnd.status == "completed" and error <= bound + 1e-6),
            }
        )
    )


if __name__ == "__main__":
    main()
