"""Secure aggregation benchmark: one SecAgg+ round over real gRPC on loopback, one JSON line.

    python benchmarks/secagg.py --clients 100 --params 1000000 --dropout 0.1

The server runs in this process; devices run in --workers processes (threads
inside), each with a random update of --params float32 values. A fraction
--dropout of the devices vanishes after uploading (--dropout-phase
before-upload: after sharing keys, so their pairwise masks must be
reconstructed). Reported:

  server_cpu_s     CPU time of the server process from the first AdvertiseKeys
                   to the round's new version (relay, sum, unmask, decode; all threads)
  server_phase_s   wall time of each phase, and the CPU time of the final unmasking
  client_mask_s    one device's quantize + all masks, measured alone (median of 5)
  bytes_per_client secure-aggregation bytes a device sends and receives (median)
  confirm_*        the consistency check (ConfirmSurvivors) alone: a device's bytes and
                   its CPU time checking the relayed signatures (medians); the server's
                   time is the "confirm" entry of server_phase_s and server_phase_cpu_s
  correct          the new model moved by the plaintext weighted mean, within the bound

XENO_BENCH_PERF=FILE records the server process alone with `perf record -g` from
the start of the round to its end (perf must be installed); XENO_BENCH_PYSPY=FILE
does the same with `py-spy record --native` (Python frames too), as collapsed stacks.
server_thread_cpu_s splits the server's CPU by thread (the asyncio loop, the worker
pool, gRPC's own threads, the round driver); server_minor_faults counts the server
process's page faults during the round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WEIGHT_RANGE = (50, 500)


def update_for(index: int, d: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(1000 + index)
    weight = int(rng.integers(*WEIGHT_RANGE))
    return rng.normal(0, 0.01, d).astype(np.float32), weight


def worker(address, indices, d, drop, drop_phase, state_dir, ready, go, results) -> None:
    import os

    import grpc
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if cores := os.environ.get("XENO_BENCH_DEVICE_CORES"):
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})

    from client.secagg import SecAggDevice
    from client.storage import IdentityStore, LocalStore
    from common.atrest import Sealer
    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc

    channel = grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    stub = federation_pb2_grpc.FederationStub(channel)
    devices = []
    for i in indices:
        store = IdentityStore(LocalStore(f"{state_dir}/dev{i}", Sealer(os.urandom(32))))
        identity = store.load_or_create()
        resp = stub.Register(
            pb.RegisterRequest(
                identity_public_key=identity.public_key().public_bytes(
                    Encoding.Raw, PublicFormat.Raw
                )
            )
        )
        md = (("x-xeno-device-id", resp.device_id), ("authorization", f"Bearer {resp.token}"))
        devices.append((i, resp.device_id, md, identity, store))
    tasks: dict[int, object] = {}

    def check_in(entry) -> None:
        i, _, md, _, _ = entry
        tasks[i] = stub.CheckIn(pb.CheckInRequest(max_wait_ms=60_000), metadata=md).task

    threads = [threading.Thread(target=check_in, args=(e,)) for e in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ready.put(len(devices))
    go.wait()
    stop_at = "GetUnmaskRequest" if drop_phase == "after-upload" else "UploadMasked"

    class Device(SecAggDevice):
        dropping = False

        def _call(self, method, request):
            if self.dropping and method == stop_at:
                raise ConnectionAbortedError
            return super()._call(method, request)

        def _upload(self, masked):
            if self.dropping and stop_at == "UploadMasked":
                raise ConnectionAbortedError
            super()._upload(masked)

    def run(entry) -> None:
        i, device_id, md, identity, store = entry
        update, weight = update_for(i, d)
        device = Device(stub, md, device_id, identity, store, tasks[i], timeout=lambda: 600.0)
        device.dropping = i in drop
        uploaded = True
        try:
            device.run(update, weight)
        except ConnectionAbortedError:
            uploaded = drop_phase == "after-upload"
        except Exception as exc:  # report it, and never leave the driver waiting
            print(f"device {i}: {exc!r}", file=sys.stderr)
            uploaded = False
        finally:
            r = device.report
            results.put(
                (
                    i,
                    uploaded,
                    r.bytes_sent + r.bytes_received,
                    r.mask_seconds,
                    r.confirm_bytes,
                    r.confirm_seconds,
                )
            )

    threads = [threading.Thread(target=run, args=(e,)) for e in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()


def isolated_mask_seconds(d: int, degree: int, n: int) -> float:
    """One device's quantize + masks with `degree` neighbours, alone on the machine."""
    from client.secagg import mask_update
    from common.quantize import FixedPoint
    from common.secagg import agree, generate_keypair
    from common.secagg.crypto import mask_info

    fp = FixedPoint.for_round(10.0, n, 1000)
    update, weight = update_for(0, d)
    me, peers = generate_keypair(), [generate_keypair().public for _ in range(degree)]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(5):
        # What SecAggDevice.mask does: the key agreements, then the device's own masking.
        start = time.perf_counter()
        encoded = fp.encode(update, weight, rng)
        pairwise = [
            (agree(me.private, pk, mask_info("r")), 1 if j % 2 else -1)
            for j, pk in enumerate(peers)
        ]
        mask_update(encoded, bytes(32), pairwise)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed per name (digits dropped).

    Shows where the server's CPU goes: the asyncio loop, the worker pool, gRPC's
    own threads, the round driver.
    """
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            # schedstat: nanoseconds on CPU (stat's clock ticks would lose up to 10 ms
            # per thread, and the pool has a hundred threads)
            on_cpu = int((task / "schedstat").read_text().split()[0]) / 1e9
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        name = python_names.get(int(task.name)) or comm
        name = name.split(" ")[0].rstrip("0123456789_-")
        out[name] = out.get(name, 0.0) + on_cpu
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--dropout-phase", choices=["after-upload", "before-upload"], default="after-upload"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--phase-timeout", type=float, default=60.0)
    parser.add_argument("--staging-buffers", type=int, default=4)
    args = parser.parse_args()

    from server.app import ServerConfig, XenoServer

    os.environ.setdefault("XENO_DATA_KEY", os.urandom(32).hex())  # an ephemeral benchmark key

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "grpc", "cryptography", "client.secagg"])
    n, d = args.clients, args.params
    drop = set(range(n - round(args.dropout * n), n))
    with tempfile.TemporaryDirectory() as tmp:
        # A one-hidden-layer MLP has params = 75 h + 10; pick h for exactly d when possible.
        server = XenoServer(
            ServerConfig(
                port=0,
                db=f"sqlite:///{tmp}/bench.db",
                params=d,
                eval_data="none",
                clients_per_round=n,
                min_clients=2,
                secagg=True,
                secagg_phase_timeout=args.phase_timeout,
                staging_buffers=args.staging_buffers,
                round_deadline=600.0,
                selection_window=600.0,
                max_workers=max(64, 3 * n),
                rounds=1,
                # metrics on any free port: a fixed one collides with other servers here
                metrics_port=0,
            )
        ).start()
        d = server.coordinator.model.manifest.total_elements
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        chunks = [list(range(n))[w :: args.workers] for w in range(args.workers)]
        procs = [
            ctx.Process(
                target=worker,
                args=(server.address, c, d, drop, args.dropout_phase, tmp, ready, go, results),
            )
            for c in chunks
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=600)
        base = server.store.load_version(server.config.model, 1).astype(np.float64)
        import gc

        gc_time = [0.0, 0.0, 0.0]
        gc_started = [0.0]

        def gc_timer(event: str, info: dict) -> None:  # type: ignore[type-arg]
            # Time in the collector, per generation (thread CPU of whoever triggered it).
            if event == "start":
                gc_started[0] = time.thread_time()
            else:
                gc_time[info["generation"]] += time.thread_time() - gc_started[0]

        gc.callbacks.append(gc_timer)
        tracked = len(gc.get_objects())
        threads_start = thread_cpu()
        cpu_start, wall_start, faults_start = cpu(), time.perf_counter(), minor_faults()
        phase_cpu: dict[str, float] = {}
        phase_threads: dict[str, dict[str, float]] = {}
        last_phase, last_cpu, last_threads = ["advertise"], [cpu_start], [threads_start]

        def on_change(_change: object = None) -> None:
            # Server CPU per phase, sampled when the coordinator announces a change (a
            # polling thread here would itself cost the server process CPU under load).
            rnd = server.coordinator._round
            phase = rnd.secagg.phase.value if rnd is not None and rnd.secagg else "closing"
            if phase == last_phase[0] and _change is not None:
                return
            now, threads = cpu(), thread_cpu()
            done = last_phase[0]
            phase_cpu[done] = phase_cpu.get(done, 0.0) + now - last_cpu[0]
            per = phase_threads.setdefault(done, {})
            for k, v in threads.items():
                per[k] = per.get(k, 0.0) + v - last_threads[0].get(k, 0.0)
            last_phase[0], last_cpu[0], last_threads[0] = phase, now, threads

        server.coordinator.add_change_listener(on_change)
        profiler = None
        if out := os.environ.get("XENO_BENCH_PERF"):
            # perf on the server process alone, from the start of the round to its end.
            import subprocess

            profiler = subprocess.Popen(
                ["perf", "record", "-F", "999", "-g", "-p", str(os.getpid()), "-o", out],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        elif out := os.environ.get("XENO_BENCH_PYSPY"):
            # py-spy (Python and native frames, all threads, busy samples only), raw
            # collapsed stacks for the round; py-spy must be installed.
            import subprocess

            profiler = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--native",
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--pid",
                    str(os.getpid()),
                    "--output",
                    out,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(2.0)
        go.set()
        assert server.coordinator.wait_finished(timeout=900), "round did not finish"
        server_cpu = cpu() - cpu_start
        server_faults = minor_faults() - faults_start
        threads_end = thread_cpu()
        on_change()
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait()
        wall = time.perf_counter() - wall_start
        rows = [results.get(timeout=600) for _ in range(n)]
        for p in procs:
            p.join(timeout=60)
        [rnd] = server.store.list_rounds(server.config.model)
        new = server.store.load_version(server.config.model, 2).astype(np.float64)
        secagg: dict = server.coordinator.last_secagg_stats  # type: ignore[type-arg]
        server.stop(grace=0.5)
    included = sorted(r[0] for r in rows if r[1])
    confirmed = [r for r in rows if r[4] > 0]
    from common.quantize import FixedPoint, clip_l2

    fp = FixedPoint.for_round(10.0, n, 1000)
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
                "dropout": args.dropout,
                "dropout_phase": args.dropout_phase,
                "degree": secagg["degree"],
                "threshold": secagg["threshold"],
                "server_cpu_s": round(server_cpu, 3),
                "server_phase_s": {k: round(v, 3) for k, v in secagg["phase_seconds"].items()},
                "server_unmask_cpu_s": round(secagg["unmask_cpu_seconds"], 3),
                "server_phase_cpu_s": {k: round(v, 3) for k, v in phase_cpu.items()},
                "server_phase_thread_cpu_s": {
                    phase: {k: round(v, 2) for k, v in per.items() if v >= 0.005}
                    for phase, per in phase_threads.items()
                },
                "server_gc_s": [round(x, 3) for x in gc_time],
                "server_minor_faults": server_faults,
                "gc_tracked_objects": tracked,
                "server_thread_cpu_s": {
                    k: round(v - threads_start.get(k, 0.0), 2)
                    for k, v in sorted(threads_end.items(), key=lambda kv: -kv[1])
                    if v - threads_start.get(k, 0.0) >= 0.005
                },
                "client_mask_s": round(isolated_mask_seconds(d, secagg["degree"], n), 4),
                "client_mask_s_in_round_median": round(
                    statistics.median(r[3] for r in rows if r[3] > 0), 4
                ),
                "bytes_per_client": int(statistics.median(r[2] for r in rows if r[1])),
                # The consistency check alone (ConfirmSurvivors): server wall and CPU time of
                # its phase are server_phase_s / server_phase_cpu_s["confirm"].
                "confirm_bytes_per_client": int(statistics.median(r[4] for r in confirmed))
                if confirmed
                else 0,
                "confirm_client_verify_s": round(statistics.median(r[5] for r in confirmed), 4)
                if confirmed
                else 0.0,
                "bytes_limit": int(1.05 * 4 * d + 64_000),
                "round_wall_s": round(wall, 3),
                "participants": rnd.participants,
                "max_abs_error": error,
                "error_bound": bound,
                "correct": bool(rnd.status == "completed" and error <= bound + 1e-6),
            }
        )
    )


if __name__ == "__main__":
    main()
