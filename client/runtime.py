"""The device loop: register, check in, download, train, report, upload, retry.

A device pulls work over gRPC and never opens a port. Transient failures
(server away, deadline exceeded) are retried with capped exponential
backoff and full jitter; a call refused because the round moved on sends
the device back to check in. SIGTERM lets the current step finish, then
the loop exits.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from threadpoolctl import threadpool_limits

from client.datasource import (
    AssistantExamples,
    DataSource,
    DeviceData,
    JsonlFile,
    LocalData,
    SimulatedShard,
    intent_labels,
)
from client.ledger import PrivacyLedger
from client.personal import (
    FEDREP,
    PersonalStore,
    evaluation_counts,
    personal_names,
    personalization_of,
    train_fedrep,
)
from client.protection import (
    DEFAULT_MIN_NOISE_MULTIPLIER,
    DISTRIBUTED,
    USER_LEVEL,
    Protection,
    TaskDeclined,
    check_task,
)
from client.retry import retry_after_s
from client.secagg import DeviceStoppingError, SecAggDevice, SecAggPolicy
from client.storage import Credentials, IdentityStore, LocalStore
from client.training import (
    LOCAL_OPTIMIZER_KEY,
    LOCAL_OPTIMIZERS,
    DpSgdSettings,
    LocalTrainingConfig,
    TrainResult,
    dp_sample_rate,
    train_local,
    train_local_dp,
)
from common.atrest import Sealer, read_secret, resolve_key
from common.config import setting
from common.data import Dataset
from common.fedeval import EVAL_COUNTS, MAX_EVAL_EXAMPLES
from common.models import FastText, ModelSpec, build_model
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc
from common.privacy import Mechanism, Spend, noise_for_epsilon
from common.secagg.graph import DEFAULT_CORRUPT_FRACTION
from common.tasks import TaskName, TextShard, simulated_shard
from common.tensors import (
    CHUNK_BYTES,
    ChunkAssembler,
    Manifest,
    iter_chunks,
    load_flat_into_module,
    to_wire,
)
from common.tls import client_channel

log = logging.getLogger("xeno.client")

DEVICE_ID_KEY = "x-xeno-device-id"
# How often a device waiting in CheckIn looks at its stop event (the answer itself wakes it).
CHECK_IN_STOP_POLL_S = 0.5
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
ROUND_MOVED_ON = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


class EnrollmentRefusedError(RuntimeError):
    """The server refused to register this device (wrong enrollment key, revoked certificate)."""

    def __init__(
        self, message: str, hint: str = "set --enrollment-key (XENO_ENROLLMENT_KEY) and start again"
    ) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class ClientConfig:
    """Settings of one device client process."""

    server: str = setting("127.0.0.1:50051", "aggregation server HOST:PORT", "XENO_SERVER")
    state_dir: str = setting(
        "data/device", "folder of the device's local store (credentials)", "XENO_STATE_DIR"
    )
    task: str = setting(
        "digits",
        "which simulated data this device holds: digits, or intents (one CLINC150 user)",
        "XENO_TASK",
    )
    models: str = setting(
        "",
        "comma-separated names of the models this device trains (empty: every model of the "
        "server that trains on its --task data)",
        "XENO_CLIENT_MODELS",
    )
    partition: int = setting(
        0,
        "which shard of the task's data this device holds (0-based; -1: its enrollment "
        "order modulo --num-partitions, for fleets started with docker compose --scale)",
        "XENO_PARTITION",
    )
    num_partitions: int = setting(
        10, "number of shards the data is split into", "XENO_NUM_PARTITIONS"
    )
    alpha: float = setting(0.5, "Dirichlet concentration of the label partition", "XENO_ALPHA")
    data_seed: int = setting(0, "seed of the train/test split and partition", "XENO_DATA_SEED")
    test_fraction: float = setting(
        0.2, "fraction of digits held out (not trained on)", "XENO_TEST_FRACTION"
    )
    data: str = setting(
        "",
        'train on this JSONL file of {"text": ..., "intent": ...} lines (the intents task\'s '
        "intent names) instead of a simulated shard",
        "XENO_DATA",
    )
    heldout_fraction: float = setting(
        0.2,
        "fraction of the examples of --data or --user kept held out (never trained "
        "on) to score models on this device",
        "XENO_HELDOUT_FRACTION",
    )
    local_epochs: int | None = setting(
        None, "override the server's local epochs", "XENO_CLIENT_LOCAL_EPOCHS"
    )
    batch_size: int | None = setting(
        None, "override the server's batch size", "XENO_CLIENT_BATCH_SIZE"
    )
    learning_rate: float | None = setting(
        None, "override the server's learning rate", "XENO_CLIENT_LEARNING_RATE"
    )
    proximal_mu: float | None = setting(
        None, "override the server's FedProx mu", "XENO_CLIENT_PROXIMAL_MU"
    )
    enrollment_key_file: str = setting(
        "",
        "file holding the server's enrollment key, if it has one (owner-only)",
        "XENO_ENROLLMENT_KEY_FILE",
    )
    enrollment_key: str = setting(
        "",
        "the enrollment key itself (prefer --enrollment-key-file: a flag's value shows in "
        "process listings)",
        "XENO_ENROLLMENT_KEY",
    )
    device_key_file: str = setting(
        "",
        "file with the 32-byte key (64 hex characters) that encrypts the local store; the "
        "XENO_DEVICE_KEY variable may hold the key itself. Neither given: device.key in "
        "--state-dir, created on first start",
        "XENO_DEVICE_KEY_FILE",
    )
    tls_ca: str = setting(
        "",
        "PEM CA certificate that signed the server's certificate: connect over TLS "
        "(empty: plaintext, loopback development only)",
        "XENO_TLS_CA",
    )
    tls_cert: str = setting(
        "", "PEM device certificate for mTLS (needs --tls-key)", "XENO_TLS_CERT"
    )
    tls_key: str = setting("", "PEM private key of --tls-cert (owner-only)", "XENO_TLS_KEY")
    tls_server_name: str = setting(
        "",
        "host name to expect in the server's certificate when it differs from the one in --server",
        "XENO_TLS_SERVER_NAME",
    )
    user: str = setting(
        "",
        "train on this assistant user's stored examples instead of simulated data: only with "
        "their consent to federated_training (xeno-fl user consent USER --grant "
        "federated_training), checked before any example is read; implies --task intents; "
        "the store is under XENO_HOME",
        "XENO_USER",
    )
    reset: bool = setting(False, "forget saved credentials and register again", "XENO_RESET")
    seed: int = setting(0, "seed of local shuffling", "XENO_CLIENT_SEED")
    max_wait_ms: int = setting(10_000, "longest long-poll of one check-in", "XENO_MAX_WAIT_MS")
    max_backoff: float = setting(
        30.0, "cap of the reconnect backoff in seconds", "XENO_MAX_BACKOFF"
    )
    torch_threads: int = setting(
        1, "torch threads (1 is best when devices share a machine)", "XENO_TORCH_THREADS"
    )
    epsilon_budget: float = setting(
        0.0,
        "sample-level epsilon this device's data may spend in all (0: no budget); tasks "
        "that would exceed it, or that train without DP-SGD, are declined",
        "XENO_EPSILON_BUDGET",
    )
    delta: float = setting(1e-5, "delta of the device's epsilon budgets", "XENO_DELTA")
    allow_plaintext: bool = setting(
        False,
        "run plain rounds, whose update the server sees in the clear (default: only tasks "
        "under secure aggregation are run; others are declined)",
        "XENO_ALLOW_PLAINTEXT",
    )
    min_noise_multiplier: float = setting(
        DEFAULT_MIN_NOISE_MULTIPLIER,
        "decline tasks that promise user-level DP with a noise multiplier, as this device "
        "verifies it from the task's noise and contributor count, below this (0: no minimum; "
        "with --user and no flag: the user's saved setting, from the app's Privacy tab)",
        "XENO_MIN_NOISE_MULTIPLIER",
    )
    require_user_dp: bool = setting(
        False,
        "decline tasks without user-level DP noise this device can verify (distributed DP "
        "under secure aggregation); a --max-user-epsilon budget implies it",
        "XENO_REQUIRE_USER_DP",
    )
    max_user_epsilon: float = setting(
        0.0,
        "user-level epsilon this device's updates may spend per model, from its own ledger "
        "of the noise it verified (0: no budget; a budget also declines tasks without "
        "verifiable distributed DP; with --user and no flag: the user's saved setting, from "
        "the app's Privacy tab)",
        "XENO_MAX_USER_EPSILON",
    )
    min_secagg_cohort: int = setting(
        5,
        "fewest devices a secure round (and the sum it unmasks) may hold; smaller ones are "
        "refused, since a sum of two updates reveals each to the other",
        "XENO_MIN_SECAGG_COHORT",
    )
    secagg_corrupt_fraction: float = setting(
        DEFAULT_CORRUPT_FRACTION,
        "fraction of a round's devices this device assumes hostile; it refuses a "
        "secure-aggregation threshold too low for that many",
        "XENO_SECAGG_CORRUPT_FRACTION",
    )

    def __post_init__(self) -> None:
        if self.data and self.user:
            raise ValueError("--data and --user are two data sources: give one")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("--heldout-fraction must be in [0, 1)")
        if self.min_secagg_cohort < 2:
            raise ValueError("--min-secagg-cohort must be at least 2")
        if not 0 <= self.secagg_corrupt_fraction < 0.5:
            raise ValueError("--secagg-corrupt-fraction must be in [0, 0.5)")

    def protection(self) -> Protection:
        return Protection(
            self.allow_plaintext,
            self.min_noise_multiplier,
            self.max_user_epsilon,
            self.delta,
            self.require_user_dp,
        )


class Backoff:
    """Capped exponential backoff with full jitter (AWS architecture blog, 2015)."""

    def __init__(
        self, base: float = 0.1, cap: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        # The exponent stops growing once past any cap (2**1024 would overflow a float).
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, 64))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class SharedHost:
    """How devices that share one process (a simulation) share its machine.

    Real devices have a machine each and use the default: no limit, the model kept
    between rounds.

    `compute` bounds how many of the process's devices download and train, or encode,
    mask and upload, at once: each of those holds several model-sized buffers (~6 MB
    for the intent model), so hundreds at once would need gigabytes, and on a couple
    of cores they would not finish sooner. A device waiting in a secure-aggregation
    phase or a long poll holds no slot. `keep_model: False` drops the device's model
    after each round (it is rebuilt, in milliseconds, and loaded with the downloaded
    weights anyway).
    """

    compute: threading.Semaphore | None = None
    keep_model: bool = True

    def slot(self) -> AbstractContextManager[object]:
        return self.compute if self.compute is not None else nullcontext()


class DeviceClient:
    """One device: trains on the local data it is given and never on anything else.

    `data` is the training data itself, or a `DeviceData` with held-out data
    too, or a `DataSource` loaded once the device is registered, or None: the
    source that `config` names (`data_source`). `host`: see `SharedHost`.
    """

    def __init__(
        self,
        config: ClientConfig,
        data: LocalData | DeviceData | DataSource | None,
        stop: threading.Event | None = None,
        host: SharedHost | None = None,
    ) -> None:
        self.config = config
        self.host = host or SharedHost()
        self.source: DataSource | None = None
        self.data: LocalData | None = None
        self.heldout: LocalData | None = None
        if isinstance(data, DeviceData):
            self.data, self.heldout = data.train, data.heldout
        elif isinstance(data, Dataset | TextShard):
            self.data = data
        else:
            self.source = data if data is not None else data_source(config)
        self.stop = stop or threading.Event()
        # Certificate files are checked first: a missing or bad one stops the device before
        # it writes anything (its key, its state folder).
        self._channel = client_channel(
            config.server,
            config.tls_ca,
            config.tls_cert,
            config.tls_key,
            options=[("grpc.enable_retries", 0)],
            server_name=config.tls_server_name,
        )
        key = resolve_key(
            config.device_key_file,
            Path(config.state_dir) / "device.key",
            "XENO_DEVICE_KEY",
            log,
            "device key",
        )
        self.enrollment_key = read_secret(
            config.enrollment_key, config.enrollment_key_file, "enrollment key file"
        )
        self.store = LocalStore(config.state_dir, Sealer(key))
        leftovers = self.store.remove_leftovers()
        if leftovers:
            log.info("removed %d temporary file(s) of interrupted writes", len(leftovers))
        self.identities = IdentityStore(self.store)
        self.ledger = PrivacyLedger(self.store)
        self.personal = PersonalStore(self.store)
        self.protection = config.protection()
        self.backoff = Backoff(cap=config.max_backoff)
        self.rounds_done = 0
        self._creds: Credentials | None = None
        self._stub = federation_pb2_grpc.FederationStub(self._channel)
        self._models: dict[str, torch.nn.Module] = {}
        # The model of the last round this device trained (the one it serves outside tests).
        self.trained_model = ""
        # Running A/B tests of the server's model and this device's variant in each.
        self.ab_assignments: dict[str, pb.AbAssignment] = {}
        # The model served for each of those tests (its assigned version, fetched).
        self._serving: dict[str, ServedModel] = {}
        self._serving_lock = threading.Lock()
        # The round in progress, once trained: a retry after a lost answer resumes it with
        # the same update and the same secure-aggregation keys instead of training again.
        self._pending: _PendingTask | None = None

    # -------------------------------------------------------------- credentials
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        assert self._creds is not None
        return (
            (DEVICE_ID_KEY, self._creds.device_id),
            ("authorization", f"Bearer {self._creds.token}"),
        )

    def credentials_scope(self) -> str:
        """Which server the saved credentials belong to: its address, unless said otherwise.

        An embedding app that starts its server on a new port for each round
        (xeno.federated_learning) names the federation instead, so its users register once.
        """
        return self.config.server

    def _ensure_registered(self) -> None:
        if self._creds is not None:
            return
        if self.config.reset:
            self.store.clear_credentials()
            self.identities.clear()
        creds = self.store.load_credentials(self.credentials_scope())
        if creds is None or not self.identities.exists():
            identity = self.identities.load_or_create()
            try:
                resp = self._stub.Register(
                    pb.RegisterRequest(
                        enrollment_key=self.enrollment_key,
                        labels={"runtime": "xeno-fl-python"},
                        identity_public_key=identity.public_key().public_bytes(
                            Encoding.Raw, PublicFormat.Raw
                        ),
                    ),
                    timeout=30,
                )
            except grpc.RpcError as err:
                if err.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise EnrollmentRefusedError(f"registration refused: {err.details()}") from None
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # Register needs no token: only a revoked client certificate is refused so,
                    # and registering again with it cannot help.
                    raise EnrollmentRefusedError(
                        f"registration refused: {err.details()}",
                        "ask the operator for a new device certificate (--tls-cert/--tls-key)",
                    ) from None
                raise
            creds = Credentials(
                self.credentials_scope(), resp.device_id, resp.token, resp.enrollment_index
            )
            self.store.save_credentials(creds)
            log.info("registered as %s", creds.device_id)
        self._creds = creds
        if self.data is None:  # loaded now: --partition -1 picks by the enrollment order
            assert self.source is not None
            loaded = self.source.load(creds.enrollment_index)
            self.data, self.heldout = loaded.train, loaded.heldout
            log.info(
                "training on %s: %d examples, %d held out",
                self.source.describe(),
                len(self.data),
                0 if self.heldout is None else len(self.heldout),
            )

    # -------------------------------------------------------------- main loop
    def run(self) -> int:
        """Loop until the federation finishes or stop is set; returns an exit code."""
        while not self.stop.is_set():
            try:
                self._ensure_registered()
                response = self._check_in()
                if response is None:
                    break
                self.ab_assignments = {a.test_name: a for a in response.ab_tests}
                self._sync_variants()
                self.backoff.reset()
                outcome = response.WhichOneof("outcome")
                if outcome == "finished":
                    log.info("federation finished: %s", response.finished.reason)
                    return 0
                if outcome == "wait":
                    self.stop.wait(response.wait.retry_after_ms / 1000.0 * random.uniform(0.5, 1.0))
                    continue
                self._run_task(response.task)
                self.backoff.reset()
            except grpc.RpcError as err:
                self._handle_error(err)
            except EnrollmentRefusedError as exc:
                log.error("%s; %s", exc, exc.hint)
                return 2
            except DeviceStoppingError as exc:
                log.info("%s", exc)
                break
            except (RuntimeError, ValueError, FloatingPointError, StopIteration) as exc:
                delay = self.backoff.next_delay()
                log.error("task failed: %s; checking in again in %.1fs", exc, delay)
                self.stop.wait(delay)
        log.info("stopping after %d round(s)", self.rounds_done)
        self._leave("stopped")
        return 0

    def _leave(self, reason: str) -> None:
        """Tell the server this device is gone, so it is not selected (best effort)."""
        if self._creds is None:
            return
        try:
            self._stub.Leave(pb.LeaveRequest(reason=reason), metadata=self._metadata(), timeout=2)
        except (grpc.RpcError, ValueError) as err:  # ValueError: the channel was closed
            log.info("could not tell the server this device leaves: %s", err)

    def inference_version(self, ab_test: str) -> int | None:
        """The model version this device serves in an A/B test (from its last check-in)."""
        assignment = self.ab_assignments.get(ab_test)
        return int(assignment.model_version) if assignment is not None else None

    # -------------------------------------------------------------- A/B serving
    def fetch_variant(self, ab_test: str, timeout: float = 60.0) -> ServedModel:
        """Download and serve this device's variant of a test (the version its check-in named).

        The weights are checked like a round's download (length, SHA-256) and must be
        exactly the assigned model and version, in the architecture the server names;
        anything else is refused and the model served before stays.
        """
        self._ensure_registered()
        assignment = self.ab_assignments.get(ab_test)
        if assignment is None:
            raise LookupError(f"this device has no assignment in A/B test {ab_test!r}")
        header, weights = self._receive_model(pb.DownloadModelRequest(ab_test=ab_test), timeout)
        if (header.model_name, header.version) != (
            assignment.model_name,
            assignment.model_version,
        ):
            raise RuntimeError(
                f"A/B test {ab_test!r}: the server sent {header.model_name} v{header.version}, "
                f"this device is assigned {assignment.model_name} v{assignment.model_version}"
            )
        spec = ModelSpec.from_json(header.model_spec.architecture, header.model_spec.config_json)
        model = build_model(spec)
        if Manifest.from_state_dict(model.state_dict()) != Manifest.from_proto(header.manifest):
            raise RuntimeError("the variant's manifest does not match the model spec sent")
        load_flat_into_module(model, weights)
        model.eval()
        served = ServedModel(
            ab_test, assignment.variant, header.model_name, int(header.version), model
        )
        with self._serving_lock:
            self._serving[ab_test] = served
        log.info(
            "serving %s v%d for A/B test %s (%s)",
            served.model_name,
            served.version,
            ab_test,
            served.variant,
        )
        return served

    def serving(self, ab_test: str) -> ServedModel | None:
        """The model served for an A/B test, once fetched."""
        with self._serving_lock:
            return self._serving.get(ab_test)

    def predict(self, ab_test: str, inputs: torch.Tensor) -> torch.Tensor:
        """Inference with this device's variant of the test (raises LookupError before fetch)."""
        served = self.serving(ab_test)
        if served is None:
            raise LookupError(f"no model served for A/B test {ab_test!r} yet (fetch_variant)")
        with torch.no_grad():
            return served.model(inputs)  # type: ignore[no-any-return]

    def _sync_variants(self) -> None:
        """After a check-in: serve each test's assigned version; drop tests that ended."""
        with self._serving_lock:
            for name in [n for n in self._serving if n not in self.ab_assignments]:
                del self._serving[name]
        for name, assignment in self.ab_assignments.items():
            served = self.serving(name)
            if served is not None and served.version == assignment.model_version:
                continue
            try:
                self.fetch_variant(name)
            except (grpc.RpcError, RuntimeError, ValueError) as err:
                # The next check-in tries again; a round must not wait for this.
                log.warning("could not fetch the variant of A/B test %s: %s", name, err)

    def served_model(self, ab_test: str = "") -> str:
        """The model whose performance a report describes ("" lets the server use its default).

        In an A/B test, the test's model; otherwise the model this device last trained, or
        the one model it is configured for.
        """
        assignment = self.ab_assignments.get(ab_test) if ab_test else None
        if assignment is not None:
            return assignment.model_name
        if self.trained_model:
            return self.trained_model
        configured = [m.strip() for m in self.config.models.split(",") if m.strip()]
        return configured[0] if len(configured) == 1 else ""

    def report_performance(self, metrics: dict[str, float], ab_test: str = "") -> None:
        """Report how the served model does here (latency, satisfaction); raises grpc.RpcError.

        The report names the model served (served_model). With ab_test, the server records
        the values for this device's own variant.
        """
        self._ensure_registered()
        request = pb.ReportPerformanceRequest(
            metrics=metrics, ab_test=ab_test, model_name=self.served_model(ab_test)
        )
        self._stub.ReportPerformance(
            request,
            metadata=self._metadata(),
            timeout=30,
        )

    def _handle_error(self, err: grpc.RpcError) -> None:
        code = err.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            log.warning("credentials refused (%s); registering again", err.details())
            self.store.clear_credentials()
            self._creds = None
            self.stop.wait(self.backoff.next_delay())
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Rate limited or the server is full: wait at least what it asks, jittered up so
            # that devices refused together do not come back together.
            hint = retry_after_s(err)
            delay = max(hint * random.uniform(1.0, 1.5), self.backoff.next_delay())
            log.info("server asked to slow down (%s); retrying in %.1fs", err.details(), delay)
            self.stop.wait(delay)
        elif code in ROUND_MOVED_ON:
            log.info("round moved on (%s: %s); checking in again", code.name, err.details())
        elif code in RETRYABLE:
            # UNAVAILABLE from a server whose database is away names a wait too.
            hint = retry_after_s(err)
            delay = max(hint * random.uniform(1.0, 1.5), self.backoff.next_delay())
            log.info(
                "server unavailable (%s: %s); retrying in %.1fs", code.name, err.details(), delay
            )
            self.stop.wait(delay)
        else:
            delay = self.backoff.next_delay()
            log.error("request refused: %s: %s; retrying in %.1fs", code.name, err.details(), delay)
            self.stop.wait(delay)

    def _data_kind(self) -> str:
        """The kind of data this device holds, as CheckIn names it: texts are intents'."""
        if isinstance(self.data, TextShard):
            return TaskName.INTENTS.value
        return self.config.task

    def _check_in(self) -> pb.CheckInResponse | None:
        """Long poll that gives up early when stop is set (returns None then)."""
        future = self._stub.CheckIn.future(
            pb.CheckInRequest(
                max_wait_ms=self.config.max_wait_ms,
                # The server offers only tasks of models that train on this device's data.
                tasks=[self._data_kind()],
                models=[m.strip() for m in self.config.models.split(",") if m.strip()],
            ),
            metadata=self._metadata(),
            timeout=self.config.max_wait_ms / 1000.0 + 30,
        )
        # Woken by the answer, not by polling it: a simulation hosts hundreds of devices
        # per process, and each waking every 50 ms to look cost a core between them.
        answered = threading.Event()
        future.add_done_callback(lambda _f: answered.set())
        while not answered.wait(CHECK_IN_STOP_POLL_S):
            if self.stop.is_set():
                future.cancel()
                return None
        return future.result()  # type: ignore[no-any-return]

    # -------------------------------------------------------------- one task
    def _run_task(self, task: pb.Task) -> None:
        pending = self._pending
        if pending is not None and pending.round_id == task.round_id:
            log.info("round %d: resuming with the update already trained", task.round_number)
            self._deliver(task, pending)
            return
        self._pending = None
        try:
            spend = check_task(task, self.protection, self.ledger)
            cohort = task.secagg.num_selected
            if task.secagg.enabled and cohort < self.config.min_secagg_cohort:
                raise TaskDeclined(
                    f"secure round of {cohort} devices, below this device's minimum of "
                    f"{self.config.min_secagg_cohort} (--min-secagg-cohort)"
                )
            if task.HasField("evaluation"):
                self._run_evaluation(task, spend)
            else:
                self._run_accepted(task, spend)
        except TaskDeclined as declined:
            log.warning("declining round %d: %s", task.round_number, declined)
            self._stub.DeclineTask(
                pb.DeclineTaskRequest(round_id=task.round_id, reason=str(declined)),
                metadata=self._metadata(),
                timeout=30,
            )

    def _run_accepted(self, task: pb.Task, user_spend: Spend | None) -> None:
        """Download, train and upload a task this device's protection allows."""
        # Calls of the task may run until shortly after the round's deadline, no longer.
        deadline = task.deadline_unix_ms / 1000.0 + 5

        def remaining() -> float:
            return max(1.0, deadline - time.time())

        spec = ModelSpec.from_json(task.model_spec.architecture, task.model_spec.config_json)
        fit = task.config
        cfg = self.config
        assert self.data is not None
        optimizer = fit.extra.get(LOCAL_OPTIMIZER_KEY, "sgd")
        if optimizer not in LOCAL_OPTIMIZERS:
            raise TaskDeclined(f"unknown local optimizer {optimizer!r}")
        training = LocalTrainingConfig(
            local_epochs=cfg.local_epochs or fit.local_epochs or 1,
            batch_size=cfg.batch_size or fit.batch_size or 32,
            learning_rate=cfg.learning_rate or fit.learning_rate or 0.05,
            proximal_mu=fit.proximal_mu if cfg.proximal_mu is None else cfg.proximal_mu,
            momentum=fit.momentum,
            optimizer=optimizer,
        )
        seed = cfg.seed * 1_000_003 + task.round_number
        with self.host.slot():
            manifest, weights = self._download(task, remaining())
            model = self._model_for(spec, manifest)
            try:
                result = self._train(task, model, weights, training, seed)
            finally:
                # Only the update is needed from here on: a device waiting in the secure
                # aggregation phases holds no copy of the global model.
                del weights, model
                if not self.host.keep_model:
                    self._models = {}
        if user_spend is not None:
            # Written before anything derived from the update leaves the device.
            self.ledger.record(
                task.round_id, task.model_name, USER_LEVEL, DISTRIBUTED, user_spend, cfg.delta
            )
        secagg = None
        if task.secagg.enabled:
            secagg = self._secagg_device(task, remaining)
        self._pending = _PendingTask(task.round_id, result, manifest, secagg, deadline)
        self._deliver(task, self._pending)

    def _secagg_device(self, task: pb.Task, remaining: Callable[[], float]) -> SecAggDevice:
        """The device side of the task's SecAgg+ round (checks, keys, masking)."""
        assert self._creds is not None
        return SecAggDevice(
            self._stub,
            self._metadata(),
            self._creds.device_id,
            self.identities.load_or_create(),
            self.identities,
            task,
            timeout=lambda: remaining() + 60,
            policy=SecAggPolicy(
                min_cohort=self.config.min_secagg_cohort,
                corrupt_fraction=self.config.secagg_corrupt_fraction,
            ),
            compute=self.host.compute,
            stop=self.stop,
        )

    def _run_evaluation(self, task: pb.Task, user_spend: Spend | None) -> None:
        """An evaluation-only task: score the version on held-out data, report the counts.

        Nothing is trained and no update leaves: only the counts vector, masked under
        secure aggregation (with this device's share of the DP noise when the task
        promises it, recorded in the ledger first), else with ReportEvaluation.
        """
        deadline = task.deadline_unix_ms / 1000.0 + 5

        def remaining() -> float:
            return max(1.0, deadline - time.time())

        spec = ModelSpec.from_json(task.model_spec.architecture, task.model_spec.config_json)
        with self.host.slot():
            manifest, weights = self._download(task, remaining())
            model = self._model_for(spec, manifest)
            try:
                counts = self._evaluation_counts(task, model, weights)
            finally:
                del weights, model
                if not self.host.keep_model:
                    self._models = {}
        cfg = self.config
        if user_spend is not None:
            # Written before anything derived from the held-out data leaves the device.
            self.ledger.record(
                task.round_id, task.model_name, USER_LEVEL, DISTRIBUTED, user_spend, cfg.delta
            )
        if task.secagg.enabled:
            secagg = self._secagg_device(task, remaining)
            secagg.run(np.asarray(counts, dtype=np.float64), 1)
        else:
            try:
                self._stub.ReportEvaluation(
                    pb.ReportEvaluationRequest(round_id=task.round_id, counts=counts),
                    metadata=self._metadata(),
                    timeout=remaining(),
                )
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise  # ALREADY_EXISTS: a retry after a lost answer, already counted
        log.info(
            "round %d: evaluated %s v%d on %d held-out examples",
            task.round_number,
            task.model_name,
            task.model_version,
            counts[0],
        )

    def _evaluation_counts(
        self, task: pb.Task, model: torch.nn.Module, weights: np.ndarray
    ) -> list[int]:
        """The counts an evaluation task asks for (common.fedeval.EVAL_COUNTS), bounded.

        At most max_examples held-out examples are scored (the first ones), so each
        count is within the bound the task's DP clip is sized for.
        """
        ev = task.evaluation
        if list(ev.counts) != list(EVAL_COUNTS):
            raise TaskDeclined(f"unknown evaluation counts {list(ev.counts)}")
        if not 1 <= ev.max_examples <= MAX_EVAL_EXAMPLES:
            raise TaskDeclined(f"evaluation bound {ev.max_examples} out of range")
        try:
            method, _, _ = personalization_of(dict(task.config.extra))
        except ValueError as exc:
            raise TaskDeclined(str(exc)) from None
        heldout = None
        if self.heldout is not None and len(self.heldout):
            scored = self._data_for(model, self.heldout)
            heldout = Dataset(scored.x[: ev.max_examples], scored.y[: ev.max_examples])
        head = None
        if method == FEDREP:
            state = model.state_dict()
            shapes = {n: tuple(state[n].shape) for n in personal_names(model)}
            head = self.personal.load(task.model_name, shapes)
        examples, correct, personal = evaluation_counts(model, weights, heldout, head)
        return [examples, correct, personal]

    def _deliver(self, task: pb.Task, pending: _PendingTask) -> None:
        """Report metrics and send the trained update (plain or secure)."""
        result = pending.result
        self._stub.ReportMetrics(
            pb.ReportMetricsRequest(round_id=task.round_id, metrics=result.metrics),
            metadata=self._metadata(),
            timeout=30,
        )
        if pending.secagg is not None:
            pending.secagg.run(result.delta, result.num_examples)
        else:
            remaining = max(1.0, pending.deadline - time.time())
            self._upload(task, pending.manifest, result.delta, result.num_examples, remaining)
        self._pending = None
        self.rounds_done += 1
        self.trained_model = task.model_name
        log.info(
            "round %d: trained on %d examples%s",
            task.round_number,
            result.num_examples,
            "".join(f", {k} {v:.3f}" for k, v in result.metrics.items() if "seconds" not in k),
        )

    def _data_for(self, model: torch.nn.Module, data: LocalData | None = None) -> Dataset:
        """Local data (default: the training data) in the input form of the task's model."""
        data = self.data if data is None else data
        assert data is not None
        if isinstance(data, TextShard):
            if not isinstance(model, FastText):
                raise TaskDeclined("this device holds text; the task's model does not take text")
            return data.featurized(model.features)
        if isinstance(model, FastText):
            raise TaskDeclined("the task's model takes text; this device holds feature vectors")
        return data

    def _heldout_scores(self, model: torch.nn.Module, weights: np.ndarray) -> dict[str, float]:
        """Held-out counts of the downloaded version: federated evaluation (none without data)."""
        if self.heldout is None or len(self.heldout) == 0:
            return {}
        heldout = self._data_for(model, self.heldout)
        load_flat_into_module(model, weights)
        model.eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(heldout.x)).argmax(1).numpy()
        model.train()
        correct = int((predicted == heldout.y).sum())
        return {
            "heldout_examples": float(len(heldout)),
            "heldout_global_correct": float(correct),
            "heldout_global_accuracy": correct / len(heldout),
        }

    def _train_personalized(
        self,
        task: pb.Task,
        model: torch.nn.Module,
        weights: np.ndarray,
        training: LocalTrainingConfig,
        seed: int,
        personal_epochs: int,
        personal_lr: float,
    ) -> TrainResult:
        """A FedRep round; the personal head is written to the sealed store, never sent."""
        if task.privacy.dp_sgd.enabled:
            raise TaskDeclined("personalization (fedrep) under DP-SGD is not supported here")
        if self.config.epsilon_budget > 0:
            raise TaskDeclined(
                f"privacy budget: the task trains without DP-SGD and this device only "
                f"spends its data under DP (epsilon budget {self.config.epsilon_budget:g})"
            )
        data = self._data_for(model)
        heldout = None if self.heldout is None else self._data_for(model, self.heldout)
        fed = train_fedrep(
            model, weights, data, heldout, training, personal_epochs, personal_lr, seed
        )
        self.personal.save(task.model_name, fed.personal_head)
        result = fed.result
        if task.privacy.user_dp.mechanism != pb.USER_DP_NONE or task.secagg.enabled:
            # Counts on private data would escape the accounted mechanism, or the secure
            # sum: under secure aggregation they are reported by evaluation tasks, masked.
            for key in [k for k in result.metrics if k.startswith("heldout_")]:
                result.metrics.pop(key)
        return result

    def _train(
        self,
        task: pb.Task,
        model: torch.nn.Module,
        weights: np.ndarray,
        training: LocalTrainingConfig,
        seed: int,
    ) -> TrainResult:
        """Local training as the task asks, within this device's privacy budget.

        With DP-SGD, the round's spend is checked against the budget before any
        training and written to the ledger before the update can leave the device.
        """
        try:
            method, personal_epochs, personal_lr = personalization_of(dict(task.config.extra))
        except ValueError as exc:
            raise TaskDeclined(str(exc)) from None
        if method == FEDREP:
            return self._train_personalized(
                task, model, weights, training, seed, personal_epochs, personal_lr
            )
        data = self._data_for(model)
        dp_sgd = task.privacy.dp_sgd
        private = dp_sgd.enabled or task.privacy.user_dp.mechanism != pb.USER_DP_NONE
        # The downloaded version scored on this device's held-out data (not under DP: the
        # counts would be a release outside the accounted mechanisms; not under secure
        # aggregation: the server would see them in the clear; evaluation tasks sum them).
        clear = not private and not task.secagg.enabled
        scores = self._heldout_scores(model, weights) if clear else {}
        budget = self.config.epsilon_budget
        if not dp_sgd.enabled:
            if budget > 0:
                raise TaskDeclined(
                    f"privacy budget: the task trains without DP-SGD and this device only "
                    f"spends its data under DP (epsilon budget {budget:g})"
                )
            result = train_local(model, weights, data, training, seed)
            result.metrics.update(scores)
            if task.privacy.user_dp.mechanism != pb.USER_DP_NONE:
                # Metrics computed on private data would escape the accounted mechanism.
                result.metrics.pop("train_loss", None)
                result.metrics.pop("train_accuracy", None)
            return result
        q, per_epoch = dp_sample_rate(len(data), training.batch_size)
        steps = per_epoch * training.local_epochs
        z = dp_sgd.noise_multiplier
        if z <= 0:
            if dp_sgd.target_epsilon <= 0 or dp_sgd.planned_rounds < 1:
                raise TaskDeclined("DP-SGD task names neither a noise multiplier nor a target")
            z = _noise_for_epsilon(
                dp_sgd.target_epsilon, q, steps * dp_sgd.planned_rounds, dp_sgd.delta or 1e-5
            )
        spend = Spend(Mechanism.GAUSSIAN, z, q, steps)
        delta = self.config.delta
        if budget > 0:
            spent = self.ledger.epsilon(delta)
            after = self.ledger.epsilon_after(spend, delta)
            if after > budget:
                raise TaskDeclined(
                    f"privacy budget exceeded: spent {spent:.3f} of {budget:g} "
                    f"(delta {delta:g}); this round would bring it to {after:.3f}"
                )
        result = train_local_dp(
            model,
            weights,
            data,
            training,
            DpSgdSettings(z, dp_sgd.max_grad_norm or 1.0),
            seed=None,  # never the configured shuffling seed: sample and noise must be secret
        )
        recorded = Spend(Mechanism.GAUSSIAN, z, result.sample_rate, result.steps)
        entry = self.ledger.record(
            task.round_id, task.model_name, "sample", "dp-sgd", recorded, delta
        )
        result.metrics["dp_sgd_epsilon"] = entry.epsilon
        result.metrics["dp_sgd_noise_multiplier"] = z
        return result

    def _model_for(self, spec: ModelSpec, manifest: Manifest) -> torch.nn.Module:
        key = spec.architecture + spec.config_json()
        model = self._models.get(key)
        if model is None:
            model = build_model(spec)
            if Manifest.from_state_dict(model.state_dict()) != manifest:
                raise RuntimeError("the server's manifest does not match the model spec it sent")
            self._models = {key: model}
        return model

    def _download(self, task: pb.Task, timeout: float) -> tuple[Manifest, np.ndarray]:
        header, weights = self._receive_model(
            pb.DownloadModelRequest(round_id=task.round_id), timeout
        )
        if (header.model_name, header.version) != (task.model_name, task.model_version):
            raise RuntimeError(
                f"the server sent {header.model_name} v{header.version} for a task on "
                f"{task.model_name} v{task.model_version}"
            )
        return Manifest.from_proto(header.manifest), weights

    def _receive_model(
        self, request: pb.DownloadModelRequest, timeout: float
    ) -> tuple[pb.ModelHeader, np.ndarray]:
        """One model stream: exact length and SHA-256 checked before the weights are used."""
        stream = self._stub.DownloadModel(request, metadata=self._metadata(), timeout=timeout)
        first = next(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise RuntimeError("model stream did not start with a header")
        header = first.header
        assembler = ChunkAssembler(header.total_bytes)
        digest = hashlib.sha256()
        for msg in stream:
            assembler.add(msg.data)
            digest.update(msg.data)
        weights = assembler.finish()
        if digest.digest() != header.sha256:
            raise RuntimeError("downloaded model fails its SHA-256 check")
        return header, weights

    def _upload(
        self,
        task: pb.Task,
        manifest: Manifest,
        delta: np.ndarray,
        num_examples: int,
        timeout: float,
    ) -> None:
        data = to_wire(delta)

        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(
                header=pb.UpdateHeader(
                    round_id=task.round_id,
                    base_version=task.model_version,
                    manifest=manifest.to_proto(),
                    total_bytes=len(data),
                    num_examples=num_examples,
                )
            )
            for chunk in iter_chunks(data, CHUNK_BYTES):
                yield pb.UpdateChunk(data=chunk)

        try:
            self._stub.UploadUpdate(messages(), metadata=self._metadata(), timeout=timeout)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # A retry after a lost response: the server already counted this update.

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class ServedModel:
    """A model version this device serves for inference in an A/B test."""

    ab_test: str
    variant: str
    model_name: str
    version: int
    model: torch.nn.Module


@dataclass
class _PendingTask:
    round_id: str
    result: TrainResult
    manifest: Manifest
    secagg: SecAggDevice | None
    deadline: float


@functools.lru_cache(maxsize=64)
def _noise_for_epsilon(target: float, sample_rate: float, steps: int, delta: float) -> float:
    """The same plan gives the same noise every round: bisect once (about 0.5 s), not each time."""
    return noise_for_epsilon(target, sample_rate, steps, delta)


def data_source(config: ClientConfig) -> DataSource:
    """The local data source `config` names: --data, --user, else a simulated shard."""
    task = TaskName.parse(config.task)
    if config.data:
        return JsonlFile(
            Path(config.data), intent_labels(task), config.heldout_fraction, config.data_seed
        )
    if config.user:
        return AssistantExamples(
            config.user,
            intent_labels(task),
            heldout_fraction=config.heldout_fraction,
            seed=config.data_seed,
        )
    return SimulatedShard(
        task,
        config.partition,
        config.num_partitions,
        config.alpha,
        config.data_seed,
        config.test_fraction,
    )


def load_partition(config: ClientConfig, partition: int | None = None) -> LocalData:
    """The simulated training data of shard `partition` (default: the configured one)."""
    task = TaskName.parse(config.task)
    shard = config.partition if partition is None else partition
    return simulated_shard(
        task, shard, config.num_partitions, config.alpha, config.data_seed, config.test_fraction
    )


def prepare_device(
    config: ClientConfig, stop: threading.Event | None = None, host: SharedHost | None = None
) -> DeviceClient:
    """The device `config` describes, its local data loaded (or named, if it needs enrollment).

    `run_device` runs one per process; a simulation's worker process hosts many,
    each with its own config, store, identity and channel, all stopped by one event.
    """
    if config.user:  # the assistant's examples are texts of the shared intent model
        config = replace(config, task=TaskName.INTENTS.value)
    source = data_source(config)
    # A bad file or missing consent stops the device before it registers.
    data = None if source.needs_enrollment else source.load()
    if data is not None:
        log.info(
            "training on %s: %d examples, %d held out",
            source.describe(),
            len(data.train),
            0 if data.heldout is None else len(data.heldout),
        )
    return DeviceClient(config, source if data is None else data, stop, host)


def run_device(config: ClientConfig, install_signal_handlers: bool = True) -> int:
    """Entry point of `xeno-fl client`."""
    torch.set_num_threads(max(1, config.torch_threads))
    # numpy's BLAS pool as many: its threads spin after each call (~44 ms of CPU for one
    # 400k-value norm with a thread per core, the update's clip), 0.4 ms on one thread.
    threadpool_limits(max(1, config.torch_threads))
    stop = threading.Event()
    if install_signal_handlers:

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: finishing the current step, then exiting", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    client = prepare_device(config, stop)
    try:
        return client.run()
    finally:
        client.close()
