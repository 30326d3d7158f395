"""Assemble and run the aggregation server: store, coordinator, servicers, interceptors.

`XenoServer` is what `xeno-fl server`, `xeno-fl simulate`, the benchmarks
and the end-to-end tests all start: a real gRPC server (asyncio, on its own
event-loop thread) on a TCP port with health checking and, with
`--reflection`, reflection, over the domain layer. Domain work runs in a
bounded thread pool; no call holds a thread while it waits
(server/services/aio.py), and server/services/guard.py bounds what callers
can hold.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.atrest import DataKeyError, Sealer
from common.certs import Role
from common.config import setting
from common.modelspec import ModelSpec
from common.pb import admin_pb2, admin_pb2_grpc, federation_pb2
from common.tasks import TaskName, default_model_name, evaluation_set
from common.tensors import Manifest, flatten_state_dict, load_flat_into_module
from common.tls import server_credentials
from server.lifecycle.devices import DeviceLifecycle
from server.lifecycle.performance import AlertSettings, PerformanceLog
from server.memory import freeze_startup_heap, tune_allocator
from server.modelconf import MODEL_KEYS, ModelSettings, ModelTable, parse_models_file
from server.observability import HealthMonitor, ServerMetrics, disk_space_check
from server.privacy import UserDpPolicy
from server.refusals import RefusalLog
from server.registry import DeviceRegistry
from server.revocation import Revocation, Revocations
from server.rounds import RoundConfig, RoundCoordinator, RoundSummary, check_strategy
from server.runner import FederatedModel, ModelRunner
from server.security import (
    Exposure,
    Principal,
    check_exposure,
    parse_admin_tokens,
    read_secret,
    resolve_data_key,
)
from server.services.admin import AdminServicer
from server.services.aio import Changes, Runner, capture_handlers, register_servicer
from server.services.common import AuthInterceptor
from server.services.federation import FederationServicer, register_federation
from server.services.guard import GuardConfig, GuardInterceptor
from server.store import ModelDefinition, Store, describe_error
from server.store.lock import DatabaseInUseError, DatabaseLock, WritesSuspendedError
from server.strategies import FitInstructions, StrategyName

log = logging.getLogger("xeno.server")

T = TypeVar("T")

FEDERATION_SERVICE = federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one aggregation server process."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: all interfaces)", "XENO_HOST")
    port: int = setting(50051, "TCP port to listen on; 0 picks a free one", "XENO_PORT")
    db: str = setting("sqlite:///data/xeno.db", "SQLAlchemy database URL", "XENO_DB")
    task: str = setting(
        "digits",
        "what a new model trains: digits (an MLP on 8x8 digits) or intents (the fastText-style "
        "model on CLINC150's 150 intents); sets the model's spec and the evaluation data",
        "XENO_TASK",
    )
    model: str = setting(
        "",
        "name of the default federated model (empty: digits-mlp or intents-fasttext, by "
        "--task); devices that name no model or data kind train it",
        "XENO_MODEL",
    )
    models: str = setting(
        "",
        "TOML file of more models to train at once, one table [models.NAME] each with "
        "settings named like these flags (which are their defaults); see the README",
        "XENO_MODELS",
    )
    hidden: str = setting(
        "64",
        "MLP hidden layer sizes, comma-separated (used when the model is created)",
        "XENO_HIDDEN",
    )
    params: int = setting(
        0,
        "size the MLP's hidden layer for about this many parameters instead of --hidden",
        "XENO_PARAMS",
    )
    seed: int = setting(0, "seed of the initial weights", "XENO_SEED")
    strategy: str = setting(
        "fedavg",
        "fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, or a robust one that needs "
        "--no-secagg: median, trimmed-mean, krum, multi-krum",
        "XENO_STRATEGY",
    )
    trim_fraction: float = setting(
        0.1,
        "trimmed-mean: fraction of the largest and of the smallest values dropped per coordinate",
        "XENO_TRIM_FRACTION",
    )
    byzantine: int = setting(
        1, "krum / multi-krum: number of hostile devices f tolerated per round", "XENO_BYZANTINE"
    )
    multi_krum_m: int = setting(
        0, "multi-krum: updates averaged per round (0: n - f)", "XENO_MULTI_KRUM_M"
    )
    update_clip_norm: float = setting(
        0.0,
        "plain rounds: scale every update down to this L2 norm before it counts, so one "
        "device cannot move the model further (0: off)",
        "XENO_UPDATE_CLIP_NORM",
    )
    server_lr: float | None = setting(
        None,
        "server learning rate (default: 1.0 for fedavg/fedavgm, 0.01 for the adaptive ones)",
        "XENO_SERVER_LR",
    )
    proximal_mu: float = setting(
        0.01, "FedProx proximal weight mu sent to devices", "XENO_PROXIMAL_MU"
    )
    local_epochs: int = setting(5, "local epochs per round on each device", "XENO_LOCAL_EPOCHS")
    batch_size: int = setting(16, "local minibatch size", "XENO_BATCH_SIZE")
    learning_rate: float = setting(0.05, "local SGD learning rate", "XENO_LEARNING_RATE")
    momentum: float = setting(0.9, "local SGD momentum", "XENO_MOMENTUM")
    local_optimizer: str = setting(
        "sgd",
        "devices' local optimizer: sgd (with --momentum) or adam (fresh moments each round; "
        "for the intent model, whose head and embedding need very different SGD rates)",
        "XENO_LOCAL_OPTIMIZER",
    )
    personalization: str = setting(
        "none",
        "fedrep: each device also fine-tunes a personal head it keeps (FedRep, Collins et al. "
        "2021) and reports the global and personalized accuracy on its held-out data; none",
        "XENO_PERSONALIZATION",
    )
    personal_epochs: int = setting(
        5,
        "epochs of the personal head's fine-tuning per round with --personalization",
        "XENO_PERSONAL_EPOCHS",
    )
    personal_learning_rate: float = setting(
        0.5,
        "SGD learning rate of the personal head's fine-tuning (the head overfits at the "
        "body's rate)",
        "XENO_PERSONAL_LEARNING_RATE",
    )
    min_clients: int = setting(
        2,
        "fewest updates that complete a round (and devices needed to start one)",
        "XENO_MIN_CLIENTS",
    )
    clients_per_round: int = setting(
        10,
        "target updates per round; the round closes as soon as this many arrive",
        "XENO_CLIENTS_PER_ROUND",
    )
    overselect: float = setting(
        0.0,
        "select this fraction more devices than the target, to absorb dropouts",
        "XENO_OVERSELECT",
    )
    round_deadline: float = setting(
        60.0,
        "seconds after which a round closes with what it has (or fails)",
        "XENO_ROUND_DEADLINE",
    )
    max_examples_weight: int = setting(
        1_000_000,
        "a plain round weighs each update by its example count, capped at this",
        "XENO_MAX_EXAMPLES_WEIGHT",
    )
    selection_window: float = setting(
        2.0,
        "seconds to wait for more devices once min-clients are available",
        "XENO_SELECTION_WINDOW",
    )
    rounds: int = setting(
        0, "stop after this many completed rounds (0: run forever)", "XENO_ROUNDS"
    )
    staging_buffers: int = setting(
        4,
        "uploads staged at once; server memory is about (staging buffers + 4) x model size",
        "XENO_STAGING_BUFFERS",
    )
    stream_window_kib: int = setting(
        256,
        "gRPC flow-control window per upload stream, in KiB: what a waiting upload may "
        "buffer in server memory. Raise it for devices on high-latency links (throughput "
        "per stream is at most window / round-trip time); 0 restores gRPC's adaptive "
        "window, which can buffer megabytes per concurrent upload",
        "XENO_STREAM_WINDOW_KIB",
    )
    secagg: bool = setting(
        True,
        "secure aggregation (SecAgg+): the server only learns the sum of the updates; "
        "--no-secagg runs plain rounds (debugging, robust aggregators)",
        "XENO_SECAGG",
    )
    secagg_clip_norm: float = setting(
        10.0, "L2 clip of each update before fixed-point encoding", "XENO_SECAGG_CLIP_NORM"
    )
    secagg_max_weight: int = setting(
        1000,
        "cap of a device's example-count weight under secure aggregation",
        "XENO_SECAGG_MAX_WEIGHT",
    )
    secagg_phase_timeout: float = setting(
        10.0,
        "seconds each secure-aggregation phase waits for slow devices",
        "XENO_SECAGG_PHASE_TIMEOUT",
    )
    secagg_dropout: float = setting(
        0.1,
        "expected dropout rate the neighbour degree and threshold are derived for",
        "XENO_SECAGG_DROPOUT",
    )
    secagg_degree: int = setting(
        0, "neighbours per device k (0: derived, about 2 log2 n)", "XENO_SECAGG_DEGREE"
    )
    secagg_threshold: int = setting(
        0,
        "shares needed to reconstruct t (0, or anything lower: the malicious-model bound "
        "floor((k + 1 + a) / 2) + 1, a the corrupt neighbours tolerated)",
        "XENO_SECAGG_THRESHOLD",
    )
    secagg_corrupt_fraction: float = setting(
        0.05,
        "fraction of a round's devices that may be hostile or the server's own; the "
        "threshold and degree are derived to tolerate them (devices refuse less than "
        "their own --secagg-corrupt-fraction)",
        "XENO_SECAGG_CORRUPT_FRACTION",
    )
    dp: str = setting(
        "none",
        "user-level DP of the global model: distributed (Skellam noise from the devices "
        "under secure aggregation; the server adds nothing), central (a trusted server "
        "adds Gaussian noise; needs --no-secagg) or none",
        "XENO_DP",
    )
    dp_noise_multiplier: float = setting(
        0.0,
        "noise std of each round's sum over the clip norm (0: derived from --dp-target-epsilon)",
        "XENO_DP_NOISE_MULTIPLIER",
    )
    dp_target_epsilon: float = setting(
        0.0,
        "user-level epsilon the model may spend over --rounds rounds; sets the noise",
        "XENO_DP_TARGET_EPSILON",
    )
    dp_clip_norm: float = setting(
        1.0, "L2 clip of each device's whole update under DP", "XENO_DP_CLIP_NORM"
    )
    dp_min_contributors: int = setting(
        0,
        "distributed DP: fewest updates whose noise adds up to the target; smaller sums "
        "are never unmasked (0: --min-clients)",
        "XENO_DP_MIN_CONTRIBUTORS",
    )
    dp_delta: float = setting(1e-5, "delta of the user-level guarantee", "XENO_DP_DELTA")
    dp_adaptive_quantile: float = setting(
        0.0,
        "adaptive clipping (Andrew et al. 2021): move the clip towards this quantile of the "
        "devices' update norms, e.g. 0.5 (0: a fixed --dp-clip-norm)",
        "XENO_DP_ADAPTIVE_QUANTILE",
    )
    dp_clip_lr: float = setting(
        0.2, "adaptive clipping: geometric step of the clip per round", "XENO_DP_CLIP_LR"
    )
    dp_clip_count_noise: float = setting(
        0.0,
        "adaptive clipping: noise std of the count of updates inside the clip, in devices "
        "(0: the larger of clients per round / 20 and the noise multiplier); it takes a "
        "share of the privacy budget",
        "XENO_DP_CLIP_COUNT_NOISE",
    )
    privacy_budget: float = setting(
        0.0,
        "global user-level epsilon budget of the model: no round starts that would exceed "
        "it (0: none)",
        "XENO_PRIVACY_BUDGET",
    )
    dp_sgd: bool = setting(
        False,
        "sample-level DP: devices train with Opacus DP-SGD and keep a privacy ledger",
        "XENO_DP_SGD",
    )
    dp_sgd_noise_multiplier: float = setting(
        0.0,
        "DP-SGD noise multiplier (0: each device derives it from --dp-sgd-target-epsilon)",
        "XENO_DP_SGD_NOISE_MULTIPLIER",
    )
    dp_sgd_target_epsilon: float = setting(
        0.0,
        "sample-level epsilon each device may spend over --rounds rounds",
        "XENO_DP_SGD_TARGET_EPSILON",
    )
    dp_sgd_max_grad_norm: float = setting(
        1.0, "DP-SGD per-sample gradient clip", "XENO_DP_SGD_MAX_GRAD_NORM"
    )
    dp_sgd_delta: float = setting(1e-5, "delta of the sample-level guarantee", "XENO_DP_SGD_DELTA")
    eval_data: str = setting(
        "auto",
        "held-out data for server-side evaluation: auto (the task's: a fifth of digits, or "
        "CLINC150's in-scope test split) or none",
        "XENO_EVAL_DATA",
    )
    data_seed: int = setting(0, "seed of the train/test split and partition", "XENO_DATA_SEED")
    test_fraction: float = setting(
        0.2, "fraction of digits held out for evaluation", "XENO_TEST_FRACTION"
    )
    data_key_file: str = setting(
        "",
        "file with the 32-byte data key (64 hex characters) that encrypts model blobs at rest; "
        "the XENO_DATA_KEY variable may hold the key itself. Neither given: the key file "
        "xeno.key next to the SQLite database (./data for PostgreSQL), created on first start",
        "XENO_DATA_KEY_FILE",
    )
    enrollment_key_file: str = setting(
        "",
        "file holding the secret devices must present to register (owner-only)",
        "XENO_ENROLLMENT_KEY_FILE",
    )
    enrollment_key: str = setting(
        "",
        "the enrollment secret itself (prefer --enrollment-key-file: a flag's value shows in "
        "process listings; empty: open enrollment, loopback or mTLS only)",
        "XENO_ENROLLMENT_KEY",
    )
    admin_token_file: str = setting(
        "",
        "file of admin credentials (owner-only): one bearer token per line, either TOKEN "
        "(role admin) or NAME ROLE TOKEN with ROLE viewer, operator or admin; make one with "
        "`xeno-fl admin token add FILE NAME --role ROLE`",
        "XENO_ADMIN_TOKEN_FILE",
    )
    admin_token: str = setting(
        "",
        "an admin bearer token itself, role admin (prefer --admin-token-file: a flag's value "
        "shows in process listings; none at all: the admin API is open, loopback only)",
        "XENO_ADMIN_TOKEN",
    )
    token_ttl: float = setting(
        30 * 86400.0,
        "seconds a device token stays valid after its last use (0: forever); an expired "
        "device registers again",
        "XENO_TOKEN_TTL",
    )
    refusal_window: float = setting(
        60.0,
        "seconds over which refused requests are counted into one audit row per class and "
        "actor (a flood of refusals cannot grow the audit log without bound)",
        "XENO_REFUSAL_WINDOW",
    )
    revocation_refresh: float = setting(
        5.0,
        "seconds between reloads of the certificate revocation list from the database (a "
        "revocation made through this server's Admin API applies at once)",
        "XENO_REVOCATION_REFRESH",
    )
    tls_cert: str = setting(
        "", "PEM certificate the server presents (TLS); needs --tls-key", "XENO_TLS_CERT"
    )
    tls_key: str = setting("", "PEM private key of --tls-cert (owner-only)", "XENO_TLS_KEY")
    tls_client_ca: str = setting(
        "",
        "PEM CA certificate client certificates must be signed by: devices and admins "
        "connect with a certificate (mTLS), and a device is bound to its certificate",
        "XENO_TLS_CLIENT_CA",
    )
    insecure: bool = setting(
        False,
        "allow plaintext gRPC on a non-loopback address (only behind a proxy that terminates TLS)",
        "XENO_INSECURE",
    )
    metrics_host: str = setting(
        "127.0.0.1",
        "address of the Prometheus /metrics endpoint (0.0.0.0: all interfaces)",
        "XENO_METRICS_HOST",
    )
    metrics_port: int = setting(
        9464,
        "port of the Prometheus /metrics endpoint (0: a free one, -1: off)",
        "XENO_METRICS_PORT",
    )
    health_interval: float = setting(
        2.0, "seconds between the checks behind gRPC health", "XENO_HEALTH_INTERVAL"
    )
    finish_grace: float = setting(
        30.0,
        "seconds a finished federation (--rounds reached) keeps serving until every device "
        "that checked in has heard that it finished; it stops as soon as all have",
        "XENO_FINISH_GRACE",
    )
    stall_grace: float = setting(
        30.0,
        "seconds the round driver may lag behind its deadlines (a round past its deadline, "
        "devices waiting with no round started, round ends not stored) before health "
        "reports NOT_SERVING",
        "XENO_STALL_GRACE",
    )
    min_free_disk_mb: float = setting(
        64.0,
        "health reports NOT_SERVING while the SQLite database's file system has less free "
        "space than this, in MB (0: no check; PostgreSQL's disk is the database's to watch)",
        "XENO_MIN_FREE_DISK_MB",
    )
    alert_k_sigma: float = setting(
        3.0,
        "degradation alert: a metric's newest value worse than the mean of its baseline by "
        "more than this many standard deviations of the baseline",
        "XENO_ALERT_K_SIGMA",
    )
    alert_baseline_window: int = setting(
        20,
        "degradation alert: how many values before the newest form its baseline (at least 2)",
        "XENO_ALERT_BASELINE_WINDOW",
    )
    alert_window: int = setting(
        30,
        "degradation alert: how many newest values the trend test (Mann-Kendall) looks at "
        "(at least 3)",
        "XENO_ALERT_WINDOW",
    )
    keep_versions: int = setting(
        1000,
        "retention: keep the newest N versions (0: keep every version), every --keep-every-th "
        "one, and always the head and every version a tag, an A/B test or a rollback refers "
        "to; older ones and their blobs are deleted after each round, a few per transaction",
        "XENO_KEEP_VERSIONS",
    )
    keep_every: int = setting(
        100,
        "retention: also keep versions 1, K + 1, 2K + 1, ... (0: none of them)",
        "XENO_KEEP_EVERY",
    )
    eval_every: int = setting(
        0,
        "federated evaluation: after every K-th completed round, an evaluation-only round in "
        "which devices score the new version on their own held-out data and report counts "
        "(summed under secure aggregation, with the model's user-level DP); 0: none",
        "XENO_EVAL_EVERY",
    )
    eval_max_examples: int = setting(
        1000,
        "federated evaluation: a device scores at most this many of its held-out examples, "
        "which bounds its counts (the clip of their user-level DP)",
        "XENO_EVAL_MAX_EXAMPLES",
    )
    store_retry: float = setting(
        3.0,
        "seconds a round's database write is retried, with backoff, on transient errors "
        "before the round fails (and is recorded failed once the database answers)",
        "XENO_STORE_RETRY",
    )
    max_workers: int = setting(
        32,
        "threads for database and aggregation work; no call holds one while it waits "
        "(long polls and secure-aggregation phases wait as coroutines)",
        "XENO_MAX_WORKERS",
    )
    max_concurrent_rpcs: int = setting(
        4096,
        "calls in progress at once (health checks exempt); the one over is refused with "
        "RESOURCE_EXHAUSTED. A secure-aggregation cohort of n devices needs about n",
        "XENO_MAX_CONCURRENT_RPCS",
    )
    stream_first_message_timeout: float = setting(
        10.0,
        "seconds a client stream (upload, reflection) may take to send its first message",
        "XENO_STREAM_FIRST_MESSAGE_TIMEOUT",
    )
    stream_idle_timeout: float = setting(
        30.0,
        "seconds a client stream may go without a message before the server closes it; "
        "an idle upload gives its staging buffer back",
        "XENO_STREAM_IDLE_TIMEOUT",
    )
    call_timeout: float = setting(
        120.0,
        "seconds a unary call may take before the server gives up on it with "
        "DEADLINE_EXCEEDED (a handler stuck on a silent database gives its slot back); "
        "must exceed --secagg-phase-timeout, which phase calls may wait",
        "XENO_CALL_TIMEOUT",
    )
    checkin_rate: float = setting(
        5.0, "check-ins per second allowed per device (sustained)", "XENO_CHECKIN_RATE"
    )
    checkin_burst: float = setting(
        20.0, "check-ins a device may make at once", "XENO_CHECKIN_BURST"
    )
    peer_checkin_rate: float = setting(
        500.0,
        "check-ins per second allowed per client address (all its devices)",
        "XENO_PEER_CHECKIN_RATE",
    )
    peer_checkin_burst: float = setting(
        2000.0, "check-ins a client address may make at once", "XENO_PEER_CHECKIN_BURST"
    )
    register_rate: float = setting(
        0.2,
        "registrations per second allowed per device identity key",
        "XENO_REGISTER_RATE",
    )
    register_burst: float = setting(
        5.0, "registrations an identity key may make at once", "XENO_REGISTER_BURST"
    )
    peer_register_rate: float = setting(
        50.0, "registrations per second allowed per client address", "XENO_PEER_REGISTER_RATE"
    )
    peer_register_burst: float = setting(
        500.0, "registrations a client address may make at once", "XENO_PEER_REGISTER_BURST"
    )
    reflection: bool = setting(
        False,
        "serve gRPC reflection (lets anyone list the services; off by default)",
        "XENO_REFLECTION",
    )

    def guard_config(self) -> GuardConfig:
        # A phase call may wait out its phase (plus 5 s); a long poll waits up to 10 s.
        if self.call_timeout <= max(self.secagg_phase_timeout + 5.0, 10.0):
            raise ValueError(
                f"--call-timeout {self.call_timeout:g} must exceed the longest wait of a "
                f"unary call: --secagg-phase-timeout + 5 s = {self.secagg_phase_timeout + 5:g} s"
                " and the 10 s long poll"
            )
        return GuardConfig(
            max_concurrent_rpcs=self.max_concurrent_rpcs,
            first_message_s=self.stream_first_message_timeout,
            idle_s=self.stream_idle_timeout,
            call_s=self.call_timeout,
            device_checkin_rate=self.checkin_rate,
            device_checkin_burst=self.checkin_burst,
            peer_checkin_rate=self.peer_checkin_rate,
            peer_checkin_burst=self.peer_checkin_burst,
            device_register_rate=self.register_rate,
            device_register_burst=self.register_burst,
            peer_register_rate=self.peer_register_rate,
            peer_register_burst=self.peer_register_burst,
        )

    def __post_init__(self) -> None:
        task = TaskName.parse(self.task)
        if self.personalization not in ("none", "fedrep"):
            raise ValueError(
                f"unknown --personalization {self.personalization!r}; use fedrep or none"
            )
        if not self.model:
            object.__setattr__(self, "model", default_model_name(task))

    def alert_settings(self) -> AlertSettings:
        """The degradation-alert thresholds; ValueError naming the flag when one is invalid."""
        if not (math.isfinite(self.alert_k_sigma) and self.alert_k_sigma > 0):
            raise ValueError(f"--alert-k-sigma must be > 0, got {self.alert_k_sigma}")
        if self.alert_baseline_window < 2:
            raise ValueError(
                f"--alert-baseline-window must be at least 2, got {self.alert_baseline_window}"
            )
        if self.alert_window < 3:
            raise ValueError(f"--alert-window must be at least 3, got {self.alert_window}")
        return AlertSettings(
            alert_window=self.alert_window,
            baseline_window=self.alert_baseline_window,
            k_sigma=self.alert_k_sigma,
            min_baseline=min(AlertSettings.min_baseline, self.alert_baseline_window),
        )

    def model_settings(self) -> ModelSettings:
        """The default model's settings (and the defaults of every model in --models)."""
        return ModelSettings(**{key: getattr(self, key) for key in MODEL_KEYS})

    def model_spec(self) -> ModelSpec:
        return self.model_settings().model_spec()

    def round_config(self) -> RoundConfig:
        return self.model_settings().round_config()

    def user_dp_policy(self) -> UserDpPolicy | None:
        return self.model_settings().user_dp_policy()

    def fit_instructions(self) -> FitInstructions:
        return self.model_settings().fit_instructions()


def create_model(
    store: Store, name: str, settings: ModelSettings, definition: ModelDefinition | None = None
) -> None:
    """Create the model (version 1: seeded initial weights) with its definition, if given."""
    spec = settings.model_spec()
    from common.models import build_model  # torch: only to create a new model

    module = build_model(spec, seed=settings.seed)
    state = module.state_dict()
    store.create_model(
        name,
        spec,
        Manifest.from_state_dict(state),
        settings.strategy,
        flatten_state_dict(state),
        definition=definition,
    )
    log.info("created model %s (%s) at version 1", name, spec)


def ensure_model(store: Store, config: ServerConfig) -> None:
    """Create the configured model (version 1) unless the store already has it."""
    if store.get_model(config.model) is None:
        create_model(store, config.model, config.model_settings())


def define_models(
    store: Store, default: str, configured: list[ModelTable]
) -> list[tuple[ModelDefinition, ModelSettings]]:
    """Create or update the configured models' definitions; every model to train, in order.

    `configured` is the default model (first) and the models file's. A model that exists
    keeps its weights and its pause state; its settings become the configured ones. Models
    created over the Admin API (or by an earlier models file) are restored from their
    stored definitions; the definition of an earlier default model (`--model`) is not.
    """
    out: list[tuple[ModelDefinition, ModelSettings]] = []
    for table in configured:
        source = "flags" if table.name == default else "file"
        definition = ModelDefinition(
            table.name, table.settings.task, table.settings.to_json(), table.paused, source
        )
        existing = store.get_model(table.name)
        if existing is None:
            create_model(store, table.name, table.settings, definition)
            stored = store.model_definition(table.name) or definition
        else:
            expected = table.settings.model_spec().architecture
            if table.name != default and existing.spec.architecture != expected:
                raise ValueError(
                    f"model {table.name!r} exists as a {existing.spec.architecture} model; "
                    f"task {table.settings.task!r} trains a {expected} model: give the "
                    "new model another name"
                )
            stored = store.define_model(definition)
        out.append((stored, table.settings))
    names = {table.name for table in configured}
    for stored in store.model_definitions():
        if stored.name in names or stored.source == "flags":
            continue
        try:
            settings = ModelSettings.from_json(stored.settings)
            settings.validate()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the stored definition of model {stored.name!r}: {exc}") from None
        out.append((stored, settings))
    return out


def admin_tokens(config: ServerConfig) -> dict[str, Principal]:
    """The admin credentials: the token file's, plus --admin-token (role admin)."""
    tokens: dict[str, Principal] = {}
    if config.admin_token_file:
        text = read_secret("", config.admin_token_file, "admin token file")
        tokens.update(parse_admin_tokens(text, config.admin_token_file))
    if config.admin_token:
        tokens[config.admin_token] = Principal("admin", Role.ADMIN)
    return tokens


def make_evaluator(
    spec: ModelSpec, config: ServerConfig | ModelSettings
) -> DeferredEvaluator | None:
    """The server-side evaluator, or None; its loading (torch, the data) comes later."""
    if config.eval_data == "none":
        return None
    task = TaskName.parse(config.task)
    if config.eval_data not in ("auto", task.value):
        raise ValueError(f"unknown eval data {config.eval_data!r}; use auto or none")

    def build() -> Callable[[np.ndarray], dict[str, float]]:
        from common.evaluation import evaluate  # torch: 2-9 s of imports, not needed to serve
        from common.models import build_model

        test = evaluation_set(task, spec, config.data_seed, config.test_fraction)
        module = build_model(spec)

        def evaluate_vector(vector: np.ndarray) -> dict[str, float]:
            load_flat_into_module(module, vector)
            loss, acc = evaluate(module, test)
            return {"accuracy": acc, "loss": loss}

        return evaluate_vector

    return DeferredEvaluator(build)


class DeferredEvaluator:
    """An evaluator built in the background once the server serves.

    Importing torch and loading the evaluation data took most of a restart (2-9 s of a
    loaded machine's 3-12 s); nothing of it is needed to take check-ins. A round that
    closes before it is ready waits for it, so every version still gets its metrics.
    """

    def __init__(self, build: Callable[[], Callable[[np.ndarray], dict[str, float]]]) -> None:
        self._build = build
        self._ready = threading.Event()
        self._evaluate: Callable[[np.ndarray], dict[str, float]] | None = None
        self._error = ""
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="evaluator-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self._evaluate = self._build()
        except Exception as error:  # reported by every evaluation: the round fails with it
            log.exception("the server-side evaluator could not be built")
            self._error = f"{type(error).__name__}: {error}"
        finally:
            self._ready.set()

    def __call__(self, vector: np.ndarray) -> dict[str, float]:
        self.start()  # a caller before start() (tests driving the coordinator) loads it here
        self._ready.wait()
        if self._evaluate is None:
            raise RuntimeError(f"the server-side evaluator could not be built: {self._error}")
        return self._evaluate(vector)


def grpc_server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments of the server.

    A fixed per-stream window instead of BDP probing: with adaptive windows, the
    uploads waiting for a staging buffer each let gRPC buffer megabytes, so a
    100-device round of a 1M-parameter model held ~400 MB in transport buffers, and
    first-touch page faults on that memory cost more CPU than the aggregation itself
    (benchmarks/secagg.py: 1.8 s -> 0.9 s of server CPU per round).
    """
    if config.stream_window_kib < 0:
        raise ValueError("stream_window_kib must be 0 (adaptive) or a window in KiB")
    options = [("grpc.so_reuseport", 0)]
    if config.stream_window_kib > 0:
        options += [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", config.stream_window_kib << 10),
        ]
    return options


class XenoServer:
    """A running aggregation server (gRPC + round driver)."""

    def __init__(
        self,
        config: ServerConfig,
        recorder: Callable[[str, np.ndarray], None] | None = None,
        store: Store | None = None,
    ) -> None:
        """A server over config.db, or over `store` (an embedding app's, left open on stop)."""
        self.config = config
        self._recorder = recorder
        # Every model's settings are checked before anything is created on disk.
        default_settings = config.model_settings()
        tables = parse_models_file(config.models, default_settings) if config.models else []
        from_file = {t.name: t for t in tables}
        default_table = from_file.pop(config.model, None) or ModelTable(
            config.model, default_settings
        )
        default_settings = default_table.settings
        StrategyName(default_settings.strategy)  # fail early with a clear message on a typo
        check_strategy(default_settings.make_strategy(), default_settings.round_config())
        # Secrets and certificates are checked before anything is created on disk.
        enrollment_key = read_secret(
            config.enrollment_key, config.enrollment_key_file, "enrollment key file"
        )
        self.admin_tokens = admin_tokens(config)
        self._credentials = (
            server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert or config.tls_key or config.tls_client_ca
            else None
        )
        mtls = bool(config.tls_client_ca)
        check_exposure(
            Exposure(
                host=config.host,
                tls=self._credentials is not None,
                mtls=mtls,
                insecure=config.insecure,
                enrollment_key=bool(enrollment_key),
                admin_credential=bool(self.admin_tokens),
                metrics_host=config.metrics_host,
                metrics_on=config.metrics_port >= 0,
            )
        )
        if config.token_ttl < 0:
            raise ValueError("--token-ttl must be >= 0 (0: tokens never expire)")
        if not config.refusal_window > 0:
            raise ValueError("--refusal-window must be a positive number of seconds")
        if not config.revocation_refresh > 0:
            raise ValueError("--revocation-refresh must be a positive number of seconds")
        self.alert_settings = config.alert_settings()
        self._owns_store = store is None
        self._db_lock: DatabaseLock | None = None
        if store is None:
            key = resolve_data_key(config.data_key_file, _data_dir(config.db))
            store = Store(config.db, Sealer(key))
            # Shared with other servers; an offline key rotation needs it alone.
            self._db_lock = DatabaseLock(store.engine)
            if not self._db_lock.acquire(exclusive=False):
                store.close()
                raise DatabaseInUseError(
                    "a data key rotation (xeno-fl admin rotate-key) is running on this "
                    "database; start the server when it has finished, with the new key"
                )
        self.store = store
        self._lock_problem = ""  # sticky: a data key changed under this server
        if self._db_lock is not None:
            self.store.write_guard = self._guard_write
        try:
            self.store.create_schema()
        except BaseException:
            if self._db_lock is not None:
                self._db_lock.release()
                store.close()
            raise
        definitions = define_models(self.store, config.model, [default_table, *from_file.values()])
        self.registry = DeviceRegistry(self.store, enrollment_key, config.token_ttl)
        self.revocations = Revocations(
            lambda: [
                Revocation(r.serial, r.kind, r.name, r.reason, r.revoked_at)
                for r in self.store.revoked_certificates()
            ],
            config.revocation_refresh,
        )
        self._started = False
        self.models = ModelRunner(
            self.store,
            config.model,
            build=self._build_coordinator,
            initialize=lambda name, settings, definition: create_model(
                self.store, name, settings, definition
            ),
            base=config.model_settings(),
        )
        for definition, settings in definitions:
            coordinator = self._build_coordinator(definition.name, settings)
            if definition.paused:
                coordinator.pause()
            self.models.add(
                FederatedModel(
                    definition.name, coordinator, settings.task, settings, definition.source
                )
            )
        self.coordinator = self.models.default_coordinator
        self.evaluator = self.coordinator.evaluator
        # The gRPC server lives on its own event loop; domain work runs in the pool.
        if config.max_workers < 1:
            raise ValueError("--max-workers must be at least 1")
        self._pool = futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="xeno-work"
        )
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )
        self._loop_thread.start()
        self.changes = Changes(self._loop)
        for coordinator in self.models.coordinators():
            coordinator.add_change_listener(self.changes.announce)
        self.runner = Runner(self._pool, self.changes)
        self.refusals = RefusalLog(self.store.append_audit, config.refusal_window)
        self.guard = GuardInterceptor(config.guard_config(), self.refusals)
        self.health = health_aio.HealthServicer()
        try:
            self._grpc = self._on_loop(self._make_grpc())
        except BaseException:
            self._shutdown_loop()
            raise
        self.metrics = ServerMetrics(config.model)
        # Rounds feed the performance history off the round driver's thread, in order.
        self.performance = PerformanceLog(self.store, settings=self.alert_settings)
        self._tracking = futures.ThreadPoolExecutor(1, thread_name_prefix="performance")
        self.models.add_listener(self._observe)
        self.metrics_port: int | None = None
        checks = {
            "database": self._database_problem,
            "round_driver": self.models.health_problem,
            "disk": disk_space_check(self.store.local_dir, config.min_free_disk_mb),
        }
        if self._db_lock is not None:
            checks["database_lock"] = self._database_lock_problem
        self.health_monitor = HealthMonitor(
            checks,
            self._set_serving,
            self.metrics,
            interval_s=config.health_interval,
        )
        try:
            target = f"{config.host}:{config.port}"
            if self._credentials is not None:
                self.port = self._grpc.add_secure_port(target, self._credentials)
            else:
                self.port = self._grpc.add_insecure_port(target)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            self._shutdown_loop()
            raise OSError(f"could not listen on {config.host}:{config.port}; is the port in use?")

    def _build_coordinator(self, name: str, settings: ModelSettings) -> RoundCoordinator:
        """The round coordinator of a model that exists in the store."""
        model = self.store.get_model(name)
        assert model is not None
        evaluator = make_evaluator(model.spec, settings)
        coordinator = RoundCoordinator(
            self.store,
            name,
            settings.make_strategy(),
            settings.round_config(),
            evaluator=evaluator,
            identity_keys=self.registry.identity_key,
            recorder=self._recorder,
        )
        if getattr(self, "changes", None) is not None:  # a model created while serving
            coordinator.add_change_listener(self.changes.announce)
        if self._started and evaluator is not None:
            evaluator.start()
        return coordinator

    def _observe(self, model: FederatedModel) -> None:
        """Metrics (labelled by model) and the performance history of a model's rounds."""
        name, coordinator = model.name, model.coordinator
        self.metrics.track(name)
        coordinator.add_start_listener(lambda round_id: self.metrics.round_started(round_id, name))
        coordinator.add_listener(
            lambda summary: self.metrics.round_finished(
                summary, coordinator.last_secagg_stats, name
            )
        )
        self.metrics.set_alerts(self.performance.alert_counts(name), name)
        coordinator.add_listener(lambda summary: self._queue_tracking(name, summary))
        if coordinator.config.user_dp is not None:  # a restart reports what the ledger holds
            self.metrics.epsilon.labels(name).set(coordinator.privacy_account().epsilon)

    async def _make_grpc(self) -> grpc.aio.Server:
        config = self.config
        server = grpc.aio.server(
            # Auth first: the guard (and its per-device limits) sees authenticated calls only.
            interceptors=[
                AuthInterceptor(
                    self.registry.authenticate,
                    self.admin_tokens,
                    device_cert_name=self.registry.cert_name if config.tls_client_ca else None,
                    revocations=self.revocations,
                    refusals=self.refusals,
                ),
                self.guard,
            ],
            options=grpc_server_options(config),
        )
        register_federation(
            FederationServicer(
                self.registry,
                self.coordinator,
                self.runner,
                lifecycle=DeviceLifecycle(
                    self.store, config.model, alert_settings=self.alert_settings
                ),
                require_device_cert=bool(config.tls_client_ca),
                models=self.models,
            ),
            server,
        )
        register_servicer(
            server,
            ADMIN_SERVICE,
            capture_handlers(
                admin_pb2_grpc.add_AdminServicer_to_server,
                AdminServicer(
                    self.store,
                    config.privacy_budget,
                    models=self.models,
                    revocations=self.revocations,
                    before_audit_read=lambda: self.refusals.flush(everything=True),
                    alert_settings=self.alert_settings,
                ),
            ),
            self.runner,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (FEDERATION_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                server,
            )
        return server

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run a coroutine on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _shutdown_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _queue_tracking(self, model: str, summary: RoundSummary) -> None:
        self._tracking.submit(self._track_round, model, summary)

    def _track_round(self, model: str, summary: RoundSummary) -> None:
        try:
            self.performance.record_round(model, summary)
            self.metrics.set_alerts(self.performance.alert_counts(model), model)
        except Exception:
            log.exception("recording the performance of round %d failed", summary.number)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> XenoServer:
        tune_allocator()  # before the first upload (server/memory.py says why)
        self._on_loop(self._grpc.start())
        self.models.start()
        self._set_serving(True)
        self.health_monitor.start()
        self.revocations.start()
        self.refusals.start()
        self._started = True
        for coordinator in self.models.coordinators():
            if isinstance(coordinator.evaluator, DeferredEvaluator):
                coordinator.evaluator.start()  # after the port is up: torch is not needed to serve
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_host, self.config.metrics_port
            )
        log.info(
            "serving on %s (models %s, db %s)",
            self.address,
            ", ".join(m.name for m in self.models.models()),
            _safe_url(self.config.db),
        )
        freeze_startup_heap()  # after start-up built its long-lived objects (memory.py)
        return self

    def _database_problem(self) -> str:
        try:
            self.store.ping()
        except Exception as error:
            return f"the database does not answer ({describe_error(error)})"
        return ""

    def _database_lock_problem(self) -> str:
        """Take the database lock again after an outage lost it (server/store/lock.py)."""
        assert self._db_lock is not None
        if self._lock_problem:
            return self._lock_problem
        problem, retaken = self._db_lock.check()
        if retaken:
            try:  # a rotation may have run, or been left half done, while the lock was away
                self.store.check_data_key()
            except DataKeyError as error:
                self._lock_problem = f"writes stopped: {error}"
                log.error("%s", self._lock_problem)
                return self._lock_problem
        return problem

    def _guard_write(self, connection: Any) -> None:
        if self._lock_problem:
            raise WritesSuspendedError(self._lock_problem)
        assert self._db_lock is not None
        self._db_lock.guard_write(connection)

    def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if not self._loop.is_running():
            return

        async def set_all() -> None:
            for service in ("", FEDERATION_SERVICE, ADMIN_SERVICE):
                await self.health.set(service, status)

        future = asyncio.run_coroutine_threadsafe(set_all(), self._loop)
        if threading.current_thread() is not self._loop_thread:
            future.result(timeout=10)

    def stop(self, grace: float = 2.0) -> None:
        self.health_monitor.stop()
        self.metrics.close()
        self._on_loop(self.health.enter_graceful_shutdown())
        self.models.stop()
        self._on_loop(self._grpc.stop(grace), timeout=grace + 30)
        self._tracking.shutdown(wait=True)
        self._shutdown_loop()
        self.registry.close()
        self.revocations.stop()
        self.refusals.stop()
        if self._owns_store:
            self.store.close()
        if self._db_lock is not None:
            self._db_lock.release()

    def wait(self) -> None:
        self._on_loop(self._grpc.wait_for_termination(), timeout=None)


def _data_dir(url: str) -> str:
    """Where the server keeps local files: the SQLite database's folder, else ./data."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return str(Path(str(parsed.database)).resolve().parent)
    return "data"


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT or until the configured rounds are done."""
    server = XenoServer(config).start()
    print(f"xeno-fl server listening on {server.address}", flush=True)
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.is_set():
        finite = any(c.config.rounds for c in server.models.coordinators())
        if finite and server.models.finished:
            # Devices busy with their last round (seconds on a loaded machine) check in
            # after it: one that found the port closed would retry until killed.
            until = time.monotonic() + config.finish_grace
            while server.models.unannounced() and time.monotonic() < until:
                if done.wait(0.2):
                    break
            done.wait(0.5)  # the last "finished" responses leave before the port closes
            break
        done.wait(0.5)
    server.stop()
    return 0
