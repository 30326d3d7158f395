"""The round state machine of one federated model: the server's domain core.

Devices check in (long poll); when enough are available the coordinator
selects a cohort, hands each its task, serves the global model, folds each
accepted update into a running weighted sum, and closes the round when the
target number of updates has arrived, when every selected device is
accounted for, or at the deadline. A round with fewer than `min_clients`
updates fails cleanly and the next one starts; stragglers are ignored.

Memory is O(d): one float64 accumulator plus a fixed pool of float32
staging buffers; a robust strategy (median, trimmed mean, Krum) needs each
update, so its rounds keep them, n x d float32. Plain rounds may clip every
update to an L2 bound (`update_clip_norm`) before it counts. An upload is
staged, validated whole (length, finiteness) and only then added in one
vectorized step, so a refused or truncated upload never touches the
aggregate. Nothing here knows about gRPC; the
clock is injectable and `step()` drives time-based transitions, so tests
run the state machine without a network.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from common.fedeval import EVAL_COUNTS, check_counts, eval_clip_norm, evaluation_fixed_point
from common.quantize import FixedPoint
from common.secagg import derive_params
from common.secagg.graph import threshold_bound
from common.tensors import WIRE_DTYPE, ChunkAssembler, Manifest, sha256_hex, to_wire
from server.errors import (
    Change,
    ErrorKind,
    FederationError,
    Pending,
    RoundCompleted,
    hold,
    hold_all,
)
from server.faults import crash_point
from server.privacy import (
    LEDGER_MECHANISM,
    PrivacyAccount,
    UserDpMechanism,
    UserDpPolicy,
    budget_message,
)
from server.secagg import DeviceKeys, Phase, SecAggRound, SecAggSettings, ShareKind
from server.store import (
    ModelRecord,
    OptimizerState,
    ParticipantRecord,
    PrivacyRecord,
    Store,
    SupersededError,
    describe_error,
    retry_transient,
)
from server.strategies import FitInstructions, RobustStrategy, Strategy

T = TypeVar("T")
log = logging.getLogger("xeno.server.rounds")

# The longest the round driver sleeps through an open secure-aggregation phase.
SECAGG_DRIVER_WAIT_S = 0.5
_RETRY_BASE_S = 0.1
_RETRY_CAP_S = 2.0
audit = logging.getLogger("xeno.audit")

Evaluator = Callable[[np.ndarray], dict[str, float]]

# How long an unmask call waits for a closing round's aggregation and commit.
CLOSE_WAIT_S = 30.0
# Completed rounds whose uploaders are remembered (a late unmask call learns of success).
RECENT_COMPLETED_ROUNDS = 8


@dataclass(frozen=True)
class RoundConfig:
    """How rounds are run; see `xeno-fl server --help` for each setting."""

    min_clients: int = 2
    clients_per_round: int = 10
    overselect: float = 0.0
    round_deadline_s: float = 60.0
    selection_window_s: float = 2.0
    rounds: int = 0
    max_wait_s: float = 10.0
    # A device is available while it waits in CheckIn, and for this long after a CheckIn
    # returned (the gap before its next one); a stopped device is never selected.
    availability_ttl_s: float = 2.0
    max_examples_weight: int = 1_000_000
    staging_buffers: int = 4
    # Plain rounds: every update is scaled down to this L2 norm before it counts (0: off).
    update_clip_norm: float = 0.0
    secagg: bool = False
    secagg_clip_norm: float = 10.0
    secagg_max_weight: int = 1000
    secagg_phase_timeout_s: float = 10.0
    secagg_dropout: float = 0.1
    secagg_degree: int = 0
    secagg_threshold: int = 0
    secagg_corrupt_fraction: float = 0.05
    # User-level DP of the global model (None: off) and sample-level DP-SGD on devices.
    user_dp: UserDpPolicy | None = None
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 0.0
    dp_sgd_max_grad_norm: float = 1.0
    dp_sgd_target_epsilon: float = 0.0
    dp_sgd_delta: float = 1e-5
    # A write that fails transiently is tried again for this long before the round fails.
    store_retry_s: float = 3.0
    # How far past its deadlines the driver may lag before health reports NOT_SERVING.
    stall_grace_s: float = 30.0
    # Retention after each completed round: keep the newest keep_versions versions (0: all),
    # every keep_every-th one, and every protected one (Store.protected_versions).
    keep_versions: int = 0
    keep_every: int = 0
    retention_batch: int = 20  # versions deleted per transaction
    # Federated evaluation: after every eval_every-th completed round (0: never) an
    # evaluation-only round scores the new version on the devices' held-out data, each
    # device counting at most eval_max_examples of its examples (the DP clip's bound).
    eval_every: int = 0
    eval_max_examples: int = 1000

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError("min_clients must be at least 1")
        if self.clients_per_round < self.min_clients:
            raise ValueError("clients_per_round must be at least min_clients")
        if self.overselect < 0:
            raise ValueError("overselect must be non-negative")
        if not math.isfinite(self.round_deadline_s) or self.round_deadline_s <= 0:
            raise ValueError("round_deadline_s must be a finite positive number")
        if self.staging_buffers < 1:
            raise ValueError("staging_buffers must be at least 1")
        if self.max_examples_weight < 1:
            raise ValueError("max_examples_weight must be at least 1")
        if not math.isfinite(self.update_clip_norm) or self.update_clip_norm < 0:
            raise ValueError("the update clip norm must be a finite non-negative number")
        dp = self.user_dp.mechanism if self.user_dp else UserDpMechanism.NONE
        if dp is UserDpMechanism.DISTRIBUTED and not self.secagg:
            raise ValueError("distributed DP adds its noise under secure aggregation: turn it on")
        if dp is UserDpMechanism.CENTRAL and self.secagg:
            raise ValueError(
                "central DP needs a trusted server that sees the sum before noise: "
                "run it with --no-secagg, or use --dp distributed"
            )
        no_target = self.dp_sgd_target_epsilon <= 0 or self.rounds < 1
        if self.dp_sgd and self.dp_sgd_noise_multiplier <= 0 and no_target:
            raise ValueError(
                "DP-SGD needs --dp-sgd-noise-multiplier, or --dp-sgd-target-epsilon "
                "with a finite --rounds"
            )
        if self.dp_sgd and self.dp_sgd_max_grad_norm <= 0:
            raise ValueError("the DP-SGD per-sample clip must be positive")
        if self.eval_every < 0:
            raise ValueError("--eval-every must be non-negative (0: no federated evaluation)")
        if not 1 <= self.eval_max_examples <= 1_000_000:
            raise ValueError("--eval-max-examples must be in 1..1000000")

    @property
    def cohort_size(self) -> int:
        """Devices selected per round: the target plus over-selection."""
        return math.ceil(self.clients_per_round * (1 + self.overselect))


class Status(enum.Enum):
    SELECTED = "selected"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    DECLINED = "declined"


@dataclass
class Participant:
    device_id: str
    status: Status = Status.SELECTED
    num_examples: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def record(self) -> ParticipantRecord:
        status = self.status.value
        if self.status is Status.UPLOADED and self.metrics:
            status = "reported"
        if self.status in (Status.SELECTED, Status.UPLOADING):
            status = "dropped"
        return ParticipantRecord(
            self.device_id,
            status,
            self.num_examples,
            self.bytes_in,
            self.bytes_out,
            dict(self.metrics),
            self.note,
        )


@dataclass(frozen=True)
class SecAggTask:
    """What a device needs to run secure aggregation in a round."""

    threshold: int
    degree: int
    fixed_point: FixedPoint
    num_selected: int
    min_contributors: int = 0


@dataclass(frozen=True)
class DpSgdTask:
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    delta: float
    planned_rounds: int


@dataclass(frozen=True)
class TaskInfo:
    round_id: str
    round_number: int
    model_name: str
    model_version: int
    model: ModelRecord
    fit: FitInstructions
    deadline_unix_ms: int
    model_bytes: int
    secagg: SecAggTask | None = None
    user_dp: UserDpPolicy | None = None
    dp_sgd: DpSgdTask | None = None
    # Set: an evaluation-only task; devices report counts of at most this many examples.
    eval_max_examples: int = 0


@dataclass(frozen=True)
class CheckInOutcome:
    task: TaskInfo | None = None
    retry_after_ms: int = 0
    reason: str = ""
    finished: bool = False


@dataclass(frozen=True)
class RoundSummary:
    """What a finished round produced; passed to listeners (progress display, metrics)."""

    round_id: str
    number: int
    status: str
    version: int | None
    selected: int
    participants: int
    dropouts: int
    bytes_in: int
    bytes_out: int
    seconds: float
    metrics: dict[str, float]
    failure_reason: str = ""
    # "training", or "evaluation": a round that scored `version` on the devices' held-out
    # data (metrics federated_accuracy, ...) and produced no version.
    kind: str = "training"


@dataclass(frozen=True)
class _Result:
    """What a round would produce: kept until its commit is known to have happened or not."""

    vector: np.ndarray
    strategy_state: dict[str, np.ndarray]
    clip: float
    metrics: dict[str, float]
    privacy: PrivacyRecord | None


@dataclass
class _Unsettled:
    """A round that ended while the database did not answer: its end is written later."""

    round_id: str
    number: int
    reason: str
    seconds: float
    participants: list[ParticipantRecord]
    since: float
    result: _Result | None = None


@dataclass
class _Round:
    id: str
    number: int
    base_version: int
    base_vector: np.ndarray
    model_bytes: bytes
    model_sha256: bytes
    fit: FitInstructions
    cohort: dict[str, Participant]
    started: float
    deadline: float
    deadline_unix_ms: int
    accumulator: np.ndarray
    weight_sum: float = 0.0
    closing: bool = False
    secagg: SecAggRound | None = None
    secagg_task: SecAggTask | None = None
    clip: float = 0.0  # the user-level DP clip of this round
    inside_clip: int = 0  # central DP: updates that were inside the clip
    sessions: set[UploadSession] = field(default_factory=set)  # uploads in progress
    # Robust strategies: the round's accepted updates, one row each (allocated on first use).
    updates: np.ndarray | None = None
    kept: int = 0
    clipped: int = 0  # updates the server-side clip scaled down
    # Evaluation-only round: devices report counts of the base version, nothing is trained.
    evaluation: bool = False
    counts: np.ndarray | None = None  # plain evaluation rounds: the running sum of counts

    def count(self, *statuses: Status) -> int:
        return sum(p.status in statuses for p in self.cohort.values())


def check_strategy(strategy: Strategy, config: RoundConfig) -> None:
    """Refuse (ValueError) a strategy the round settings cannot serve."""
    if not strategy.needs_individual_updates:
        return
    if config.secagg:
        raise ValueError(
            f"strategy {strategy.name!r} needs each device's update, and secure "
            "aggregation reveals only their sum: run it with --no-secagg, or choose "
            "fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad"
        )
    if config.user_dp is not None:
        raise ValueError(
            f"strategy {strategy.name!r} is not accounted for user-level DP (its "
            "sensitivity is not the mean's): run it without --dp"
        )
    if not isinstance(strategy, RobustStrategy):
        raise TypeError("a strategy that needs individual updates must be a RobustStrategy")


class RoundCoordinator:
    """Drives the rounds of one model. Thread-safe; gRPC handlers call it concurrently.

    The secure-aggregation phase calls (keys, shares, an upload's header, the unmask
    request, the confirmation) take the lock with `hold`: the transport runs them on
    its event loop, where the lock is only tried (server/errors.py, WouldWait).
    """

    def __init__(
        self,
        store: Store,
        model_name: str,
        strategy: Strategy,
        config: RoundConfig,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        identity_keys: Callable[[str], bytes | None] | None = None,
        recorder: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        self.store = store
        self.model_name = model_name
        self.strategy = strategy
        self.config = config
        self.evaluator = evaluator
        self.clock = clock
        self.identity_keys = identity_keys or (lambda _device: None)
        self.recorder = recorder
        self._rng = rng or random.SystemRandom()
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # Devices blocked in a secure-aggregation phase wait here, woken only when a phase
        # changes: waking every waiting device on every submission costs O(n^2) wake-ups.
        self._phase_cond = threading.Condition(lock)
        # Free staging buffers (guarded by the lock). An upload takes one at its first data
        # chunk, not at its header, and gives it back when it ends, idles or its round closes.
        self._staging = [np.empty(0, dtype=WIRE_DTYPE) for _ in range(config.staging_buffers)]
        self._change_listeners: list[Callable[[Change], None]] = []
        self._available: dict[str, float] = {}
        self._polling: collections.Counter[str] = collections.Counter()  # CheckIns in flight
        self._available_since: float | None = None
        self._round: _Round | None = None
        self._closed_rounds: collections.OrderedDict[str, str] = collections.OrderedDict()
        # (version, devices whose update is in the sum) of the last few completed rounds: a
        # device that uploaded and asks to unmask after the round closed learns it succeeded.
        self._completed_uploads: collections.OrderedDict[str, tuple[int, frozenset[str]]] = (
            collections.OrderedDict()
        )
        self._completed_this_run = 0
        self.last_secagg_stats: dict[str, object] = {}
        self._finished = False
        # Paused: no round starts (an open one finishes) and no device counts as available.
        self._paused = False
        # Versions waiting for an evaluation-only round (they start before training rounds),
        # and whether training has done its rounds (the federation ends once they ran).
        self._eval_queue: collections.deque[int] = collections.deque()
        self._training_done = False
        self._listeners: list[Callable[[RoundSummary], None]] = []
        self._start_listeners: list[Callable[[str], None]] = []
        self._driver: threading.Thread | None = None
        self._stopping = threading.Event()
        # Rounds whose end could not be written yet; no round starts until they are, since
        # one of them may have committed a version whose acknowledgement was lost.
        self._unsettled: dict[str, _Unsettled] = {}
        self._settle_at = 0.0
        self._start_at = 0.0
        self._retry_delay = {"settle": _RETRY_BASE_S, "start": _RETRY_BASE_S}
        self.store_error = ""  # the last write failure, "" once writes succeed again
        # Since when results fail to be stored (None once one is): a disk that is full for
        # the blob but not for the small failure rows fails every round, yet "progresses".
        self._results_failing: tuple[float, str] | None = None
        self._heartbeat = clock()

        check_strategy(strategy, config)
        model = store.get_model(model_name)
        if model is None:
            raise ValueError(f"model {model_name!r} does not exist in the store")
        self.model = model
        self._vector = store.load_version(model_name, model.current_version)
        strategy.initialize(self._vector)
        self._restore_optimizer_state(model.current_version)
        self._dp_sgd_task = (
            DpSgdTask(
                config.dp_sgd_noise_multiplier,
                config.dp_sgd_max_grad_norm,
                config.dp_sgd_target_epsilon,
                config.dp_sgd_delta,
                config.rounds,
            )
            if config.dp_sgd
            else None
        )
        self.budget_exhausted = ""
        policy = config.user_dp
        self._central_dp = (
            policy if policy is not None and policy.mechanism is UserDpMechanism.CENTRAL else None
        )
        self._noise_rng = np.random.default_rng()  # seeded from OS entropy
        self._clip = policy.clip_norm if policy is not None else 0.0
        if policy is not None and policy.adaptive:
            # Adaptive clipping resumes where the last completed round left the clip.
            for version in reversed(store.list_versions(model_name)):
                if "dp_clip_next" in version.metrics:
                    self._clip = float(version.metrics["dp_clip_next"])
                    break
        interrupted = store.fail_running_rounds(model_name, "server restarted during the round")
        if interrupted:
            log.warning("marked %d interrupted round(s) as failed", interrupted)

    def _restore_optimizer_state(self, version: int) -> None:
        """Resume the server optimizer (moments, momentum) from the state stored with version."""
        state = self.store.load_optimizer_state(self.model_name, version)
        if state is None:
            return
        if state.strategy != self.strategy.name:
            log.warning(
                "version %d was produced by %s; %s starts from fresh optimizer state",
                version,
                state.strategy,
                self.strategy.name,
            )
            return
        self.strategy.load_state_dict(state.arrays)

    # ------------------------------------------------------------------ public API
    def add_listener(self, listener: Callable[[RoundSummary], None]) -> None:
        """Call listener with the summary of every round that ends (completed or failed)."""
        self._listeners.append(listener)

    def add_start_listener(self, listener: Callable[[str], None]) -> None:
        """Call listener with the id of every round that starts."""
        self._start_listeners.append(listener)

    def add_change_listener(self, listener: Callable[[Change], None]) -> None:
        """Call listener (from any thread, maybe under the lock) on every `Change`.

        The transport layer uses it to call `Pending` calls again; listeners must
        only schedule work, never block or call back into the coordinator.
        """
        self._change_listeners.append(listener)

    def _signal(self, change: Change) -> None:
        if change is Change.PHASE:
            self._phase_cond.notify_all()
            self._cond.notify_all()  # the driver sleeps through a phase (_driver_wait_s)
        for listener in self._change_listeners:
            listener(change)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def available_devices(self) -> int:
        """Devices that checked in and wait for a task now (a progress display's figure)."""
        return len(self._available)

    def pause(self) -> None:
        """Start no more rounds; an open round still finishes. Waiting devices are let go."""
        with self._cond:
            self._paused = True
            self._available.clear()
            self._available_since = None
            self._cond.notify_all()
            self._signal(Change.ROUND)

    def resume(self) -> None:
        """Start rounds again as soon as enough devices check in."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()
            self._signal(Change.ROUND)

    def schedule_evaluation(self, version: int = 0) -> tuple[int, int]:
        """Queue an evaluation-only round of `version` (0: the head): (version, queued).

        Refused with FederationError, changing nothing: a negative version
        (INVALID_ARGUMENT), one the store does not hold (NOT_FOUND), a paused or
        finished model (FAILED_PRECONDITION). A version already queued is not queued twice.
        """
        if version < 0:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "the version must be positive")
        self._check_evaluable()
        target = version or self.model.current_version
        versions = [v.version for v in self.store.list_versions(self.model_name)]
        if target not in versions:
            held = f"{min(versions)}..{max(versions)}" if versions else "none"
            raise FederationError(
                ErrorKind.NOT_FOUND,
                f"model {self.model_name!r} has no version {target} (versions held: {held})",
            )
        with self._cond:
            self._check_evaluable()
            if target not in self._eval_queue:
                self._eval_queue.append(target)
            queued = len(self._eval_queue)
            self._cond.notify_all()
            self._signal(Change.ROUND)
        log.info("model %s: evaluation of version %d scheduled", self.model_name, target)
        return target, queued

    def _check_evaluable(self) -> None:
        if self._finished:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"model {self.model_name!r} runs no more rounds "
                f"({self.budget_exhausted or 'its federation has finished'})",
            )
        if self._paused:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"model {self.model_name!r} is paused: resume it to run an evaluation round",
            )

    @property
    def pending_evaluations(self) -> list[int]:
        """Versions waiting for their evaluation round, oldest first."""
        with self._cond:
            return list(self._eval_queue)

    def check_in_now(self, device_id: str) -> CheckInOutcome | None:
        """A task for this device or the end of the federation; None: nothing yet.

        Never blocks. The device counts as available for selection (for
        `availability_ttl_s`, longer than any long poll); the transport layer
        long-polls by calling again on each `Change.ROUND`, up to the device's wait.
        """
        with self._cond:
            if self._finished:
                return CheckInOutcome(
                    finished=True, reason=self.budget_exhausted or "the federation has finished"
                )
            task = self._task_for(device_id)
            if task is not None:
                return task
            if not self._paused:
                self._mark_available(device_id, self.clock())
            return None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def poll_started(self, device_id: str) -> None:
        """A CheckIn of this device is waiting: it is available for as long as it waits."""
        with self._cond:
            self._polling[device_id] += 1

    def poll_ended(self, device_id: str, cancelled: bool) -> None:
        """The CheckIn returned, or was cancelled (the device hung up: it is gone)."""
        with self._cond:
            self._polling[device_id] -= 1
            if self._polling[device_id] <= 0:
                del self._polling[device_id]
        if cancelled:
            self.leave(device_id, "check-in cancelled", only_if_untouched=True)

    def check_in(
        self,
        device_id: str,
        max_wait_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> CheckInOutcome:
        """Long poll: a task for this device, or when to come back.

        `cancelled` tells whether the caller has gone (its RPC was cancelled): the
        device then stops counting as available at once.
        """
        wait = max(0.0, min(max_wait_s, self.config.max_wait_s))
        with self._cond:
            give_up = self.clock() + wait
            self._polling[device_id] += 1
            try:
                while True:
                    if self._finished:
                        return CheckInOutcome(
                            finished=True,
                            reason=self.budget_exhausted or "the federation has finished",
                        )
                    if cancelled is not None and cancelled():
                        self._available.pop(device_id, None)
                        return CheckInOutcome(retry_after_ms=200, reason="check-in cancelled")
                    task = self._task_for(device_id)
                    if task is not None:
                        return task
                    now = self.clock()
                    if not self._paused:
                        self._mark_available(device_id, now)
                    remaining = give_up - now
                    if remaining <= 0 or self._stopping.is_set():
                        return CheckInOutcome(
                            retry_after_ms=200, reason="no task for this device yet"
                        )
                    self._cond.wait(min(remaining, 1.0))
            finally:
                self._polling[device_id] -= 1
                if self._polling[device_id] <= 0:
                    del self._polling[device_id]

    def leave(self, device_id: str, reason: str, only_if_untouched: bool = False) -> None:
        """The device is gone: never select it, and stop waiting for it in the open round.

        With only_if_untouched (its check-in was cancelled), the open round lets the
        device go only if it never downloaded the round's model: it may have got its task.
        """
        with self._cond:
            self._available.pop(device_id, None)
            rnd = self._round
            participant = rnd.cohort.get(device_id) if rnd is not None else None
            if rnd is not None and not rnd.closing and participant is not None:
                untouched = participant.bytes_out == 0
                if participant.status is Status.SELECTED and (untouched or not only_if_untouched):
                    participant.status = Status.DECLINED
                    participant.note = f"left: {reason}"[:500]
                    if rnd.secagg is not None:
                        rnd.secagg.withdraw(device_id)
                        self._advance_secagg(rnd.secagg)
                    log.info("device %s left round %d: %s", device_id, rnd.number, reason)
            self._cond.notify_all()
            self._signal(Change.ROUND)

    def forget(self, device_id: str, erase: Callable[[], T]) -> T:
        """Take the device out of selection and run `erase` while no round can pick it.

        Refused (FAILED_PRECONDITION) while the device is in the open round's
        cohort: that round's records still name it, so it must close first.
        """
        with self._cond:
            rnd = self._round
            if rnd is not None and device_id in rnd.cohort:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"the device is in round {rnd.number}; call Forget again after it closes",
                )
            self._available.pop(device_id, None)
            return erase()

    def owns_round(self, round_id: str) -> bool:
        """Whether round_id is this model's open round or one of its recently closed ones.

        Lock-free on purpose (one read of the round, dict lookups, atomic under the GIL):
        routing a call to its model must not wait while another model holds its lock.
        """
        rnd = self._round
        return (
            (rnd is not None and rnd.id == round_id)
            or round_id in self._closed_rounds
            or round_id in self._completed_uploads
        )

    def task_for(self, device_id: str) -> TaskInfo | None:
        with self._cond:
            out = self._task_for(device_id)
            return out.task if out else None

    def model_for_download(self, device_id: str, round_id: str) -> tuple[TaskInfo, bytes, bytes]:
        """(task, model bytes, sha256) for a device of the round; raises FederationError."""
        with self._cond:
            rnd = self._active_round(round_id)
            participant = self._member(rnd, device_id)
            if participant.status not in (Status.SELECTED, Status.UPLOADING):
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"device already {participant.status.value} in round {round_id}",
                )
            return self._task_info(rnd), rnd.model_bytes, rnd.model_sha256

    def record_download(self, device_id: str, round_id: str, nbytes: int) -> None:
        with self._cond:
            rnd = self._round
            if rnd is not None and rnd.id == round_id and device_id in rnd.cohort:
                rnd.cohort[device_id].bytes_out += nbytes

    def begin_upload(
        self,
        device_id: str,
        round_id: str,
        base_version: int,
        manifest: Manifest,
        total_bytes: int,
        num_examples: int,
    ) -> UploadSession:
        """Validate an upload header and reserve a staging buffer; raises FederationError."""
        with self._cond:
            rnd = self._active_round(round_id)
            participant = self._member(rnd, device_id)
            if rnd.evaluation:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    "this is an evaluation round: it takes counts, not an update "
                    "(ReportEvaluation, or UploadMasked under secure aggregation)",
                )
            if rnd.secagg is not None:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    "this round uses secure aggregation: send the update with UploadMasked",
                )
            if participant.status is Status.UPLOADED:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS,
                    f"an update from this device for round {round_id} was already accepted",
                )
            if participant.status is Status.UPLOADING:
                raise FederationError(
                    ErrorKind.ABORTED,
                    f"an upload from this device for round {round_id} is already in progress; "
                    "retry once it has finished",
                )
            if participant.status is not Status.SELECTED:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"device is {participant.status.value} in round {round_id}; check in again",
                )
            if base_version != rnd.base_version:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"update computed against version {base_version}, round {round_id} "
                    f"trains version {rnd.base_version} (Task.model_version)",
                )
            if manifest != self.model.manifest:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT,
                    "update manifest does not match the model's manifest "
                    f"({len(manifest.tensors)} tensors / {manifest.total_elements} elements vs "
                    f"{len(self.model.manifest.tensors)} / {self.model.manifest.total_elements})",
                )
            if total_bytes != self.model.manifest.total_bytes:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"declared size {total_bytes} bytes, the model needs "
                    f"{self.model.manifest.total_bytes} "
                    f"(float32 x {self.model.manifest.total_elements})",
                )
            if num_examples < 1:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, "num_examples must be at least 1")
            participant.status = Status.UPLOADING
            weight = min(num_examples, self.config.max_examples_weight)
            return self._staged_session(UploadSession, rnd, participant, total_bytes, weight)

    def _staged_session(
        self,
        kind: type[UploadSession],
        rnd: _Round,
        participant: Participant,
        total_bytes: int,
        weight: int,
    ) -> UploadSession:
        """A session without a buffer yet (call under the lock): a header alone holds none."""
        session = kind(self, rnd, participant, total_bytes, weight)
        rnd.sessions.add(session)
        return session

    def _check_staging(self, session: UploadSession, take: bool) -> np.ndarray | None:
        with self._cond:
            rnd = session.round
            if self._round is not rnd or rnd.closing:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"round {rnd.id} closed before the upload completed; check in again",
                )
            if not self._staging:
                deadline = max(rnd.deadline, rnd.secagg.phase_deadline if rnd.secagg else 0.0)
                raise Pending(
                    Change.STAGING,
                    max(1.0, deadline - self.clock()),
                    "server busy staging uploads; retry",
                )
            return self._staging.pop() if take else None

    def _take_staging(self, session: UploadSession) -> np.ndarray:
        """A free staging buffer for the session's first data chunk; Pending when none is free.

        Waiting for a buffer must not hold a thread or the lock: it is backpressure on
        the stream, bounded by the round's (or phase's) deadline.
        """
        buffer = self._check_staging(session, take=True)
        assert buffer is not None
        if buffer.size < self.model.manifest.total_elements + 1:
            buffer = np.empty(self.model.manifest.total_elements + 1, dtype=WIRE_DTYPE)
        return buffer

    def report_metrics(self, device_id: str, round_id: str, metrics: dict[str, float]) -> None:
        with self._cond:
            rnd = self._active_round(round_id)
            participant = self._member(rnd, device_id)
            if participant.status is Status.DECLINED:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"device is {participant.status.value} in round {round_id}",
                )
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"non-finite metric values: {', '.join(sorted(bad))}",
                )
            if len(metrics) > 64:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, "at most 64 metrics per report")
            participant.metrics = dict(metrics)

    def report_evaluation(self, device_id: str, round_id: str, counts: list[int]) -> None:
        """A device's counts in a plain evaluation round; raises FederationError."""
        with self._cond:
            rnd = self._active_round(round_id)
            participant = self._member(rnd, device_id)
            if not rnd.evaluation:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"round {round_id} is a training round: it takes an update, not counts",
                )
            if rnd.secagg is not None:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    "this evaluation uses secure aggregation: send the counts with UploadMasked",
                )
            if participant.status is Status.UPLOADED:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS,
                    f"counts from this device for round {round_id} were already accepted",
                )
            if participant.status is not Status.SELECTED:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"device is {participant.status.value} in round {round_id}",
                )
            try:
                values = check_counts(counts, self.config.eval_max_examples)
            except ValueError as exc:
                raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
            assert rnd.counts is not None
            rnd.counts += np.asarray(values, dtype=np.int64)
            participant.status = Status.UPLOADED
            participant.num_examples = values[0]
            self._cond.notify_all()

    def decline(self, device_id: str, round_id: str, reason: str) -> None:
        with self._cond:
            rnd = self._active_round(round_id)
            participant = self._member(rnd, device_id)
            if participant.status is Status.UPLOADED:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION, "the update of this device was already accepted"
                )
            if participant.status is Status.DECLINED:
                return
            participant.status = Status.DECLINED
            participant.note = reason[:500]
            if rnd.secagg is not None:
                rnd.secagg.withdraw(device_id)
                self._advance_secagg(rnd.secagg)
            log.info("device %s declined round %s: %s", device_id, rnd.number, participant.note)
            self._cond.notify_all()

    # ------------------------------------------------------------------ secure aggregation
    def _secagg_round(self, device_id: str, round_id: str) -> tuple[_Round, SecAggRound]:
        rnd = self._active_round(round_id)
        participant = self._member(rnd, device_id)
        if rnd.secagg is None:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                "this round does not use secure aggregation: send the update with UploadUpdate",
            )
        if participant.status is Status.DECLINED:
            raise FederationError(ErrorKind.FAILED_PRECONDITION, "device declined this round")
        return rnd, rnd.secagg

    def _advance_secagg(self, secagg: SecAggRound) -> None:
        if secagg.advance(self.clock()):
            self._signal(Change.PHASE)
            if secagg.finished:
                self._cond.notify_all()  # wake the driver to close the round

    def _await_phase_end(self, rnd: _Round, secagg: SecAggRound, phase: Phase) -> None:
        """Return once `phase` has closed; while it is open raise Pending (never block).

        Every phase call submits idempotently and then calls this, so the transport
        layer can simply call again on `Change.PHASE` without holding a thread for
        the phase: the submission is repeated harmlessly and the answer returned.
        """
        self._advance_secagg(secagg)
        if secagg.phase is Phase.FAILED:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"secure aggregation of round {rnd.id} failed: {secagg.failure}; check in again",
            )
        if secagg.phase is phase:
            if rnd.closing or self._stopping.is_set():
                raise FederationError(ErrorKind.UNAVAILABLE, "phase still open; call again")
            raise Pending(Change.PHASE, max(0.0, secagg.phase_deadline - self.clock()) + 5.0)

    def advertise_keys(
        self, device_id: str, round_id: str, keys: DeviceKeys
    ) -> tuple[list[str], list[DeviceKeys], int, int]:
        """Phase 1: accept signed round keys; once the phase closes, the neighbours' keys.

        Idempotent; raises Pending while the phase is open.
        """
        with hold(self._cond):
            rnd, secagg = self._secagg_round(device_id, round_id)
            mine = secagg.keys.get(device_id)
            if secagg.phase is Phase.ADVERTISE or mine is None:
                secagg.advertise(device_id, keys)
            elif mine.signature != keys.signature:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS, "this device already advertised other round keys"
                )
            if secagg.phase is Phase.ADVERTISE:
                self._await_phase_end(rnd, secagg, Phase.ADVERTISE)
            degree = min(secagg.settings.degree, len(secagg.participants) - 1)
            return (
                list(secagg.participants),
                secagg.neighbour_keys(device_id),
                degree,
                secagg.threshold,
            )

    def share_keys(
        self,
        device_id: str,
        round_id: str,
        shares: dict[str, bytes],
        commitments: dict[str, tuple[bytes, bytes]] | None = None,
    ) -> list[tuple[str, bytes]]:
        """Phase 2: accept encrypted shares; once the phase closes, the shares for me.

        Idempotent; raises Pending while the phase is open.
        """
        with hold(self._cond):
            rnd, secagg = self._secagg_round(device_id, round_id)
            sent = secagg.shares.get(device_id)
            if secagg.phase is Phase.SHARE or sent is None:
                secagg.share(device_id, shares, commitments)
            elif sent != shares:
                raise FederationError(ErrorKind.ALREADY_EXISTS, "shares were already sent")
            if secagg.phase is Phase.SHARE:
                self._await_phase_end(rnd, secagg, Phase.SHARE)
            return secagg.shares_for(device_id)

    def begin_masked_upload(
        self, device_id: str, round_id: str, total_elements: int, total_bytes: int
    ) -> UploadSession:
        """Phase 3: validate a masked upload's header and reserve a staging buffer."""
        with hold(self._cond):
            rnd, secagg = self._secagg_round(device_id, round_id)
            if total_bytes != 4 * total_elements:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT, "total_bytes must be 4 x total_elements (uint32)"
                )
            secagg.begin_upload(device_id, total_elements)
            participant = rnd.cohort[device_id]
            return self._staged_session(MaskedUploadSession, rnd, participant, total_bytes, 0)

    def unmask_request(
        self, device_id: str, round_id: str
    ) -> tuple[list[str], list[str], int, list[str]]:
        """Phase 4a: once uploads close, (survivors, dropped) among my neighbours.

        Also the number of uploads in the sum and the round's survivor set. Raises
        Pending while the upload phase is open, and RoundCompleted when the round already
        completed with this device's update in its sum (the others' shares sufficed).
        """
        with hold(self._cond):
            self._check_completed(device_id, round_id)
            rnd, secagg = self._secagg_round(device_id, round_id)
            if secagg.phase in (Phase.ADVERTISE, Phase.SHARE, Phase.UPLOAD):
                if device_id not in secagg.uploaded:
                    raise FederationError(
                        ErrorKind.FAILED_PRECONDITION, "no masked update from this device yet"
                    )
                self._await_phase_end(rnd, secagg, secagg.phase)
            request = secagg.unmask_request(device_id)
            return (
                list(request.survivors),
                list(request.dropped),
                len(secagg.uploaded),
                list(secagg.survivor_set),
            )

    def confirm_survivors(
        self, device_id: str, round_id: str, signature: bytes
    ) -> list[tuple[str, bytes, bytes]]:
        """Phase 4b: accept a signature over the survivor set.

        Once the phase closes: the signatures of the devices within two hops of this one.
        Idempotent; raises Pending while the phase is open, RoundCompleted once the round
        completed with this device's update in its sum.
        """
        with hold(self._cond):
            self._check_completed(device_id, round_id)
            rnd, secagg = self._secagg_round(device_id, round_id)
            mine = secagg.confirmations.get(device_id)
            if secagg.phase in (Phase.CONFIRM, Phase.UNMASK) or mine is None:
                secagg.confirm(device_id, signature)
            elif mine != signature:
                raise FederationError(
                    ErrorKind.ALREADY_EXISTS, "this device already confirmed the survivor set"
                )
            if secagg.phase is Phase.CONFIRM:
                self._await_phase_end(rnd, secagg, Phase.CONFIRM)
            return secagg.confirmations_for(device_id)

    def unmask(
        self,
        device_id: str,
        round_id: str,
        revealed: list[tuple[str, ShareKind, bytes]],
        unverifiable: list[str],
    ) -> None:
        """Phase 4c: accept revealed shares; the driver unmasks once the phase closes.

        Raises RoundCompleted when the round already completed with this device's
        update in its sum: the shares are then not needed and dropped.
        """
        with self._cond:
            self._check_completed(device_id, round_id)
            _rnd, secagg = self._secagg_round(device_id, round_id)
            secagg.unmask(device_id, revealed, unverifiable)
            self._advance_secagg(secagg)

    def _check_completed(self, device_id: str, round_id: str) -> None:
        """Raise RoundCompleted if the round completed with this device's masked update.

        A round whose secure aggregation finished, or that is being closed (aggregation
        and its commit run outside the lock), may still fail, so the call is Pending until
        the round's end is known. Called with the lock held.
        """
        rnd = self._round
        if rnd is not None and rnd.id == round_id:
            finished = rnd.secagg is not None and rnd.secagg.finished
            if rnd.closing or finished:  # the sum is unmasked (or failed): the end is near
                raise Pending(Change.ROUND, CLOSE_WAIT_S, "the round is closing; call again")
            return
        done = self._completed_uploads.get(round_id)
        if done is not None and device_id in done[1]:
            raise RoundCompleted(done[0])

    # ------------------------------------------------------------------ time and lifecycle
    def step(self) -> RoundSummary | None:
        """Start or close a round when due. Called by the driver thread, or by tests."""
        stale: list[UploadSession] = []
        if self._unsettled and not self._settle():
            return None
        with self._cond:
            if self._finished:
                return None
            now = self.clock()
            rnd = self._round
            if rnd is None:
                if not self._paused:  # a paused model starts no round
                    self._maybe_start_round(now)
                return None
            if rnd.closing:
                return None
            due = True
            if rnd.secagg is not None:
                if rnd.secagg.advance(now):
                    self._signal(Change.PHASE)
                if rnd.secagg.phase not in (Phase.ADVERTISE, Phase.SHARE, Phase.UPLOAD):
                    stale = list(rnd.sessions)  # uploads too late to be added
                due = rnd.secagg.finished
            else:
                accepted = rnd.count(Status.UPLOADED)
                pending = rnd.count(Status.SELECTED, Status.UPLOADING)
                due = accepted >= self.config.clients_per_round or pending == 0
                due = due or now >= rnd.deadline
            if due:
                rnd.closing = True
        # Outside the lock: a session's lock comes before the coordinator's.
        for session in stale:
            session.abort("the upload phase of its round closed")
        return self._close_round(rnd) if due else None

    def start(self, interval_s: float = 0.1) -> None:
        """Run step() in a background thread until stop()."""

        def loop() -> None:
            while not self._stopping.is_set():
                self._heartbeat = self.clock()
                try:
                    self.step()
                except Exception:
                    log.exception("round driver step failed")
                with self._cond:
                    self._cond.wait(self._driver_wait_s(interval_s))

        self._heartbeat = self.clock()
        self._driver = threading.Thread(target=loop, name="round-driver", daemon=True)
        self._driver.start()

    def _driver_wait_s(self, interval_s: float) -> float:
        """How long the driver may sleep before its next step (called with the lock held).

        While a secure round's phase is open there is nothing to do before the phase's
        deadline: the calls that complete a phase close it and announce the change (which
        wakes the driver, see `_signal`), and a finished round wakes it too. Polling at
        `interval_s` anyway was ~0.02 s of server CPU per round of benchmarks/secagg.py.
        The sleep is capped (SECAGG_DRIVER_WAIT_S) for what ends a phase without a call
        announcing it (an upload stream breaking off, say).
        """
        rnd = self._round
        if self._unsettled or rnd is None or rnd.closing or rnd.secagg is None:
            return interval_s
        secagg = rnd.secagg
        if secagg.finished:
            return interval_s
        if rnd.sessions and secagg.phase not in (Phase.ADVERTISE, Phase.SHARE, Phase.UPLOAD):
            return interval_s  # uploads too late to be added: the next step ends them
        until = min(SECAGG_DRIVER_WAIT_S, secagg.phase_deadline - self.clock())
        return max(interval_s, until)

    def health_problem(self) -> str:
        """Why the federation is not making progress it should make ("" when it is).

        Lock-free on purpose: the check must answer even while a stuck step holds the
        lock. Progress is owed when the driver is running, a round is open, or enough
        devices wait; the allowance is the relevant deadline plus `stall_grace_s`.
        """
        if self._stopping.is_set() or self._finished:
            return ""
        cfg = self.config
        grace = cfg.stall_grace_s
        now = self.clock()
        driver = self._driver
        if driver is not None:
            if not driver.is_alive():
                return "the round driver thread has died"
            busy = now - self._heartbeat
            if busy > cfg.round_deadline_s + grace:
                return f"the round driver has been stuck in one step for {busy:.0f}s"
        unsettled = list(self._unsettled.values())
        if unsettled:
            waiting = now - min(u.since for u in unsettled)
            if waiting > grace:
                return (
                    f"{len(unsettled)} round end(s) could not be stored for {waiting:.0f}s "
                    f"({self.store_error or 'database error'}); no round can start"
                )
        failing = self._results_failing
        if failing is not None and now - failing[0] > grace:
            return f"no round result could be stored for {now - failing[0]:.0f}s ({failing[1]})"
        rnd = self._round
        if rnd is not None:
            end = rnd.deadline
            if rnd.secagg is not None:
                end = max(end, rnd.secagg.phase_deadline)
            late = now - end
            if late > grace:
                return f"round {rnd.number} is {late:.0f}s past its deadline"
            return ""
        since = self._available_since
        if since is not None and not self._paused:
            idle = now - since - cfg.selection_window_s
            if idle > grace:
                why = f": {self.store_error}" if self.store_error else ""
                return (
                    f"{len(self._available)} device(s) wait but no round has started "
                    f"for {idle:.0f}s{why}"
                )
        return ""

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            self._signal(Change.PHASE)
            self._signal(Change.ROUND)
        if self._driver is not None:
            self._driver.join(timeout=10)

    def abort_open_round(self, reason: str) -> RoundSummary | None:
        """End the open round without a result, as "aborted" with reason; after stop().

        For a model being deleted: no driver will close its round, which would
        otherwise read "running" for ever. Its uploads in progress are cut off and
        its participants recorded as they stand. None when no round was open, or
        when the driver was already closing it (it records that end itself).
        """
        with self._cond:
            rnd = self._round
            if rnd is None or rnd.closing:
                return None
            rnd.closing = True  # uploads and phase calls are refused from here on
            in_flight = list(rnd.sessions)
        for session in in_flight:
            session.abort(reason)
        seconds = self.clock() - rnd.started
        participants = [p.record() for p in rnd.cohort.values()]
        try:
            retry_transient(
                lambda: self.store.fail_round(rnd.id, reason, seconds, participants, "aborted"),
                self.config.store_retry_s,
                f"recording the abort of round {rnd.number}",
            )
        except Exception as error:
            # The row stays "running"; the next start of this model (if it is created
            # again) marks it failed, as after a crash.
            log.error("round %d: its abort could not be recorded (%s)", rnd.number, error)
        summary = RoundSummary(
            round_id=rnd.id,
            number=rnd.number,
            status="aborted",
            version=None,
            selected=len(rnd.cohort),
            participants=rnd.count(Status.UPLOADED),
            dropouts=rnd.count(Status.SELECTED, Status.UPLOADING, Status.DECLINED),
            bytes_in=sum(p.bytes_in for p in participants),
            bytes_out=sum(p.bytes_out for p in participants),
            seconds=seconds,
            metrics={},
            failure_reason=reason,
        )
        with self._cond:
            self._closed_rounds[rnd.id] = summary.status
            self._round = None
            self._cond.notify_all()
            self._signal(Change.PHASE)
            self._signal(Change.ROUND)
        log.warning("round %d aborted: %s", rnd.number, reason)
        for listener in self._listeners:
            try:
                listener(summary)
            except Exception:
                log.exception("round listener failed")
        return summary

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._finished, timeout)

    # ------------------------------------------------------------------ internals
    def _mark_available(self, device_id: str, now: float) -> None:
        if device_id not in self._available:
            self._cond.notify_all()
        self._available[device_id] = now

    def _task_for(self, device_id: str) -> CheckInOutcome | None:
        rnd = self._round
        if rnd is None or rnd.closing:
            return None
        participant = rnd.cohort.get(device_id)
        if participant is None or participant.status is not Status.SELECTED:
            return None
        if rnd.secagg is not None and rnd.secagg.phase is not Phase.ADVERTISE:
            return None  # too late to join this round's secure aggregation
        return CheckInOutcome(task=self._task_info(rnd))

    def _task_info(self, rnd: _Round) -> TaskInfo:
        policy = self.config.user_dp
        user_dp = replace(policy, clip_norm=rnd.clip) if policy is not None else None
        if rnd.evaluation and user_dp is not None:
            # The counts' clip (every count in [0, max examples]) is what the noise is for.
            user_dp = replace(user_dp, target_quantile=0.0)
        return TaskInfo(
            round_id=rnd.id,
            round_number=rnd.number,
            model_name=self.model_name,
            model_version=rnd.base_version,
            model=self.model,
            fit=rnd.fit,
            deadline_unix_ms=rnd.deadline_unix_ms,
            model_bytes=len(rnd.model_bytes),
            secagg=rnd.secagg_task,
            user_dp=user_dp,
            dp_sgd=None if rnd.evaluation else self._dp_sgd_task,
            eval_max_examples=self.config.eval_max_examples if rnd.evaluation else 0,
        )

    def _active_round(self, round_id: str) -> _Round:
        rnd = self._round
        if rnd is not None and rnd.id == round_id and not rnd.closing:
            return rnd
        if (rnd is not None and rnd.id == round_id) or round_id in self._closed_rounds:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"round {round_id} is closed; check in again for a new task",
            )
        raise FederationError(ErrorKind.NOT_FOUND, f"unknown round id {round_id!r}")

    @staticmethod
    def _member(rnd: _Round, device_id: str) -> Participant:
        participant = rnd.cohort.get(device_id)
        if participant is None:
            raise FederationError(
                ErrorKind.PERMISSION_DENIED, f"device is not in the cohort of round {rnd.id}"
            )
        return participant

    def _maybe_start_round(self, now: float) -> None:
        ttl = self.config.availability_ttl_s
        polling = self._polling
        for dev in [
            d for d, seen in self._available.items() if now - seen > ttl and d not in polling
        ]:
            del self._available[dev]
        candidates = sorted(self._available)
        if self.config.secagg:
            # Only devices with an enrolled identity key can sign their round keys.
            candidates = [d for d in candidates if self.identity_keys(d)]
        count = len(candidates)
        if count < max(self.config.min_clients, 2 if self.config.secagg else 1):
            self._available_since = None
            return
        if self._available_since is None:
            self._available_since = now
        enough = count >= self.config.cohort_size
        if not enough and now - self._available_since < self.config.selection_window_s:
            return
        if now < self._start_at:
            return  # the last start could not be written: back off
        evaluating = bool(self._eval_queue)
        if self._training_done and not evaluating:
            return
        chosen = self._rng.sample(candidates, min(count, self.config.cohort_size))
        round_id = uuid.uuid4().hex
        version = self.model.current_version
        vector = self._vector
        number = 0
        try:
            if evaluating:
                version = self._eval_queue[0]
                why = self._evaluation_refused(len(chosen))
                if not why:
                    try:
                        vector = self.store.load_version(self.model_name, version)
                    except KeyError:  # pruned by retention since it was queued
                        why = "the version is no longer stored"
                if why:
                    self._eval_queue.popleft()
                    log.warning("evaluation of version %d skipped: %s", version, why)
                    if self._training_done and not self._eval_queue:
                        self._finished = True
                        self._cond.notify_all()
                        self._signal(Change.ROUND)
                    return
            else:
                if self._privacy_budget_exhausted(len(chosen)):
                    return
                self._follow_head()
                version = self.model.current_version
                vector = self._vector
            number = self.store.next_round_number(self.model_name)
            self.store.start_round(self.model_name, round_id, number, version, len(chosen))
        except Exception as error:
            self.store_error = describe_error(error)
            delay = self._backoff("start")
            log.error(
                "could not start a round (%s); trying again in %.1fs", self.store_error, delay
            )
            self._start_at = now + delay
            if number:  # the start may have committed without our knowing: fail it later
                self._unsettled[round_id] = _Unsettled(
                    round_id,
                    number,
                    f"the round's start could not be recorded ({self.store_error})",
                    0.0,
                    [],
                    now,
                )
            return
        self.store_error = ""
        self._retry_delay["start"] = _RETRY_BASE_S
        for dev in chosen:
            del self._available[dev]
        self._available_since = None
        if evaluating:
            self._eval_queue.popleft()
        model_bytes = to_wire(vector)
        wall_deadline = time.time() + self.config.round_deadline_s
        self._round = _Round(
            id=round_id,
            number=number,
            base_version=version,
            base_vector=vector,
            model_bytes=model_bytes,
            model_sha256=bytes.fromhex(sha256_hex(model_bytes)),
            fit=self.strategy.configure_fit(number),
            cohort={d: Participant(d) for d in chosen},
            started=now,
            deadline=now + self.config.round_deadline_s,
            deadline_unix_ms=int(wall_deadline * 1000),
            accumulator=np.zeros(0 if evaluating else vector.size, dtype=np.float64),
            clip=eval_clip_norm(self.config.eval_max_examples) if evaluating else self._clip,
            evaluation=evaluating,
            counts=np.zeros(len(EVAL_COUNTS), dtype=np.int64) if evaluating else None,
        )
        if self.config.secagg:
            self._attach_secagg(self._round, now)
        log.info(
            "round %d started: %d devices selected, %s version %d",
            number,
            len(chosen),
            "evaluating" if evaluating else "base",
            version,
            extra={"round": number, "round_id": round_id, "status": "started"},
        )
        for listener in self._start_listeners:
            listener(round_id)
        self._cond.notify_all()
        self._signal(Change.ROUND)

    def _follow_head(self) -> None:
        """Train from the store's head: a rollback or a pushed version moves it under us."""
        model = self.store.get_model(self.model_name)
        if model is None or model.current_version == self.model.current_version:
            return
        self._vector = self.store.load_version(self.model_name, model.current_version)
        self.strategy.initialize(self._vector)
        self._restore_optimizer_state(model.current_version)
        log.info(
            "model %s: head moved from version %d to %d outside the rounds; training from it",
            self.model_name,
            self.model.current_version,
            model.current_version,
        )
        self.model = model

    def privacy_account(self) -> PrivacyAccount:
        delta = self.config.user_dp.delta if self.config.user_dp else 1e-5
        return PrivacyAccount(self.store.privacy_ledger(self.model_name), delta)

    def _round_fixed_point(self, cohort: int) -> FixedPoint:
        cfg = self.config
        if cfg.user_dp is not None and cfg.user_dp.mechanism is UserDpMechanism.DISTRIBUTED:
            return cfg.user_dp.fixed_point(cohort, self.model.manifest.total_elements, self._clip)
        return FixedPoint.for_round(cfg.secagg_clip_norm, cohort, cfg.secagg_max_weight)

    def _eval_fixed_point(self, cohort: int) -> FixedPoint:
        """An evaluation round's exact integer encoding, with the model's distributed DP noise."""
        policy, limit = self.config.user_dp, self.config.eval_max_examples
        if policy is not None and policy.mechanism is UserDpMechanism.DISTRIBUTED:
            z, m = policy.noise_multiplier, min(policy.min_contributors, cohort)
            return evaluation_fixed_point(limit, cohort, z, m)
        return evaluation_fixed_point(limit, cohort)

    def _evaluation_refused(self, cohort: int) -> str:
        """Why an evaluation round of this cohort may not start ("" when it may)."""
        try:
            fixed_point = self._eval_fixed_point(cohort) if self.config.secagg else None
        except ValueError as exc:
            return str(exc)
        policy = self.config.user_dp
        if policy is None or policy.budget <= 0:
            return ""
        account = self.privacy_account()
        projected = account.epsilon_after(policy.spend(fixed_point))
        if projected <= policy.budget:
            return ""
        return budget_message(self.model_name, account.epsilon, policy.budget, projected)

    def _privacy_record(self, rnd: _Round, contributors: int) -> PrivacyRecord | None:
        """The ledger entry of a round about to complete, with the model's new total."""
        policy = self.config.user_dp
        if policy is None:
            return None
        fixed_point = rnd.secagg_task.fixed_point if rnd.secagg_task else None
        spend = policy.spend(fixed_point)
        return PrivacyRecord(
            level="user",
            mechanism=LEDGER_MECHANISM[policy.mechanism],
            noise_multiplier=policy.noise_multiplier,
            clip_norm=rnd.clip,
            cohort=contributors,
            epsilon=self.privacy_account().epsilon_after(spend),
            delta=policy.delta,
            sensitivity=spend.l2_sensitivity,
            dimension=spend.dimension,
        )

    def _min_contributors(self, cohort: int) -> int:
        policy = self.config.user_dp
        if policy is None or policy.mechanism is not UserDpMechanism.DISTRIBUTED:
            return 0
        return min(policy.min_contributors, cohort)

    def _privacy_budget_exhausted(self, cohort: int) -> bool:
        policy = self.config.user_dp
        if policy is None or policy.budget <= 0:
            return False
        account = self.privacy_account()
        fixed_point = self._round_fixed_point(cohort) if self.config.secagg else None
        projected = account.epsilon_after(policy.spend(fixed_point))
        if projected <= policy.budget:
            return False
        self.budget_exhausted = budget_message(
            self.model_name, account.epsilon, policy.budget, projected
        )
        log.warning("%s", self.budget_exhausted)
        self._finished = True
        self._cond.notify_all()
        self._signal(Change.ROUND)
        return True

    def _attach_secagg(self, rnd: _Round, now: float) -> None:
        cfg = self.config
        n = len(rnd.cohort)
        params = derive_params(n, cfg.secagg_dropout, corrupt_fraction=cfg.secagg_corrupt_fraction)
        degree = min(cfg.secagg_degree or params.degree, n - 1)
        if degree < n - 1 and degree % 2:
            degree += 1  # the ring graph is symmetric for even degrees (or complete)
        # Never below the malicious-model bound (devices refuse less).
        bound = threshold_bound(n, degree, cfg.secagg_corrupt_fraction)
        threshold = min(max(cfg.secagg_threshold, bound), degree + 1)
        fixed_point = self._eval_fixed_point(n) if rnd.evaluation else self._round_fixed_point(n)
        min_uploads = self._min_contributors(n)
        rnd.secagg_task = SecAggTask(threshold, degree, fixed_point, n, min_uploads)
        rnd.secagg = SecAggRound(
            round_id=rnd.id,
            cohort=sorted(rnd.cohort),
            identity_keys={d: self.identity_keys(d) or b"" for d in rnd.cohort},
            settings=SecAggSettings(
                threshold,
                degree,
                fixed_point,
                cfg.secagg_phase_timeout_s,
                min_uploads=min_uploads,
                corrupt_fraction=cfg.secagg_corrupt_fraction,
            ),
            vector_length=(
                len(EVAL_COUNTS) if rnd.evaluation else self.model.manifest.total_elements
            )
            + 1,
            advertise_deadline=rnd.deadline,
            target=cfg.clients_per_round,
            recorder=self.recorder,
            model_name=self.model_name,
            model_version=rnd.base_version,
            phase_started=now,
        )

    def _close_round(self, rnd: _Round) -> RoundSummary:
        """Aggregate (or fail) a closing round; never raises.

        Runs outside the lock; uploads to the round are refused meanwhile. Whatever
        goes wrong (aggregation, evaluation, the database), the round ends in memory
        at once, completed or failed, and the driver goes on. A failure that cannot
        be written yet is written by `_settle` once the database answers again.
        """
        with self._cond:
            in_flight = list(rnd.sessions)
        for session in in_flight:  # their buffers go back to the pool now, not at their deadline
            session.abort("its round closed")
        if rnd.evaluation:
            return self._close_evaluation(rnd)
        accepted = rnd.count(Status.UPLOADED)
        seconds = self.clock() - rnd.started
        participants = [p.record() for p in rnd.cohort.values()]
        version: int | None = None
        result: _Result | None = None
        reason = ""
        before = self._strategy_state()
        try:
            result, reason = self._round_result(rnd, accepted)
        except Exception as error:
            log.exception("round %d: aggregation failed", rnd.number)
            reason = f"aggregating the round failed: {describe_error(error)}"
        if result is not None:
            outcome = result
            try:
                version = retry_transient(
                    lambda: self.store.complete_round(
                        self.model_name,
                        rnd.id,
                        outcome.vector,
                        outcome.metrics,
                        seconds,
                        participants,
                        outcome.privacy,
                        OptimizerState(self.strategy.name, outcome.strategy_state),
                    ),
                    self.config.store_retry_s,
                    f"storing round {rnd.number}",
                )
                self.store_error = ""
                self._results_failing = None
            except SupersededError as error:
                reason = str(error)
            except Exception as error:
                self.store_error = describe_error(error)
                if self._results_failing is None:
                    self._results_failing = (self.clock(), self.store_error)
                reason = f"the round's result could not be stored ({self.store_error})"
                log.error("round %d: %s", rnd.number, reason)
        if version is None:
            self.strategy.load_state_dict(before)
            version = self._record_failure(rnd, reason, seconds, participants, result)
            if version is not None:
                reason = ""
        metrics = result.metrics if result is not None and version is not None else {}
        summary = RoundSummary(
            round_id=rnd.id,
            number=rnd.number,
            status="completed" if version is not None else "failed",
            version=version,
            selected=len(rnd.cohort),
            participants=accepted,
            dropouts=rnd.count(Status.SELECTED, Status.UPLOADING, Status.DECLINED),
            bytes_in=sum(p.bytes_in for p in participants),
            bytes_out=sum(p.bytes_out for p in participants),
            seconds=seconds,
            metrics=metrics,
            failure_reason=reason,
        )
        with self._cond:
            if version is not None and result is not None:
                self._apply(version, result)
            self._closed_rounds[rnd.id] = summary.status
            while len(self._closed_rounds) > 1000:
                self._closed_rounds.popitem(last=False)
            if version is not None:
                uploaded = frozenset(
                    d for d, p in rnd.cohort.items() if p.status is Status.UPLOADED
                )
                self._completed_uploads[rnd.id] = (version, uploaded)
                while len(self._completed_uploads) > RECENT_COMPLETED_ROUNDS:
                    self._completed_uploads.popitem(last=False)
            self._round = None
            self._cond.notify_all()
            self._signal(Change.PHASE)
            self._signal(Change.ROUND)
        if version is not None:
            log.info(
                "round %d completed: version %d, %d/%d updates, %.2fs, %s",
                rnd.number,
                version,
                accepted,
                len(rnd.cohort),
                seconds,
                {k: round(v, 4) for k, v in metrics.items()},
            )
        else:
            log.warning(
                "round %d failed: %s",
                rnd.number,
                reason,
                extra={"round": rnd.number, "round_id": rnd.id, "status": "failed"},
            )
        for listener in self._listeners:
            try:
                listener(summary)
            except Exception:
                log.exception("round listener failed")
        if version is not None:
            self.apply_retention()
        return summary

    def _close_evaluation(self, rnd: _Round) -> RoundSummary:
        """Sum (or fail) a closing evaluation round and store its result; never raises.

        The result is the sum of the devices' counts (under secure aggregation the
        server learns nothing else), stored as the round's metrics with its ledger entry.
        """
        accepted = rnd.count(Status.UPLOADED)
        seconds = self.clock() - rnd.started
        participants = [p.record() for p in rnd.cohort.values()]
        metrics: dict[str, float] = {}
        privacy: PrivacyRecord | None = None
        try:
            metrics, privacy, reason = self._evaluation_result(rnd, accepted)
        except Exception as error:
            log.exception("evaluation round %d: summing failed", rnd.number)
            reason = f"summing the counts failed: {describe_error(error)}"
        status = "failed"
        if not reason:
            try:
                retry_transient(
                    lambda: self.store.complete_evaluation(
                        rnd.id, metrics, seconds, participants, privacy
                    ),
                    self.config.store_retry_s,
                    f"storing evaluation round {rnd.number}",
                )
                self.store_error = ""
                status = "evaluated"
            except Exception as error:
                self.store_error = describe_error(error)
                reason = f"the evaluation could not be stored ({self.store_error})"
        if status == "failed":
            metrics = {}
            self._record_failure(rnd, reason, seconds, participants, None)
        summary = RoundSummary(
            round_id=rnd.id,
            number=rnd.number,
            status=status,
            version=rnd.base_version,
            selected=len(rnd.cohort),
            participants=accepted,
            dropouts=rnd.count(Status.SELECTED, Status.UPLOADING, Status.DECLINED),
            bytes_in=sum(p.bytes_in for p in participants),
            bytes_out=sum(p.bytes_out for p in participants),
            seconds=seconds,
            metrics=metrics,
            failure_reason=reason,
            kind="evaluation",
        )
        with self._cond:
            self._closed_rounds[rnd.id] = status
            while len(self._closed_rounds) > 1000:
                self._closed_rounds.popitem(last=False)
            if status == "evaluated":
                uploaded = frozenset(
                    d for d, p in rnd.cohort.items() if p.status is Status.UPLOADED
                )
                self._completed_uploads[rnd.id] = (rnd.base_version, uploaded)
                while len(self._completed_uploads) > RECENT_COMPLETED_ROUNDS:
                    self._completed_uploads.popitem(last=False)
            self._round = None
            if self._training_done and not self._eval_queue:
                self._finished = True
            self._cond.notify_all()
            self._signal(Change.PHASE)
            self._signal(Change.ROUND)
        if status == "evaluated":
            log.info(
                "round %d evaluated version %d: %d/%d devices, %s",
                rnd.number,
                rnd.base_version,
                accepted,
                len(rnd.cohort),
                {k: round(v, 4) for k, v in metrics.items()},
            )
        else:
            log.warning("evaluation round %d failed: %s", rnd.number, reason)
        for listener in self._listeners:
            try:
                listener(summary)
            except Exception:
                log.exception("round listener failed")
        return summary

    def _evaluation_result(
        self, rnd: _Round, accepted: int
    ) -> tuple[dict[str, float], PrivacyRecord | None, str]:
        """(metrics, ledger entry, "") of an evaluation round, or ({}, None, why it failed)."""
        if rnd.secagg is not None:
            result = rnd.secagg.result
            if result is None:
                return {}, None, rnd.secagg.failure or "secure aggregation did not finish"
            sums = np.asarray(result.weighted_sum, dtype=np.float64)
            contributors = round(result.weight_sum)
        else:
            assert rnd.counts is not None
            sums = rnd.counts.astype(np.float64)
            contributors = accepted
            central = self._central_dp
            if central is not None and accepted:
                # Trusted-server DP: the counts' sum gets Gaussian noise of std z x clip.
                sums = sums + self._noise_rng.normal(
                    0.0, central.noise_multiplier * rnd.clip, sums.size
                )
        if accepted < self.config.min_clients:
            return (
                {},
                None,
                f"only {accepted} device(s) reported counts, {self.config.min_clients} needed",
            )
        examples, correct, personal = (float(v) for v in sums[: len(EVAL_COUNTS)])
        metrics: dict[str, float] = {
            "evaluation": 1.0,
            "eval_devices": float(contributors),
            "eval_examples": examples,
            "eval_correct": correct,
            "eval_personal_correct": personal,
            "eval_max_examples": float(self.config.eval_max_examples),
        }
        if examples > 0:
            # Noisy sums (DP) may fall outside [0, examples]: the accuracy is clamped.
            metrics["federated_accuracy"] = min(1.0, max(0.0, correct / examples))
            if rnd.fit.extra.get("personalization", "none") != "none":
                metrics["federated_personalized_accuracy"] = min(1.0, max(0.0, personal / examples))
        if rnd.secagg is not None:
            metrics["secagg"] = 1.0
        privacy = self._privacy_record(rnd, contributors)
        if privacy is not None:
            metrics["dp_epsilon"] = privacy.epsilon
        return metrics, privacy, ""

    def apply_retention(self, max_batches: int = 5) -> list[int]:
        """Delete versions the retention policy no longer keeps, a small transaction at a time.

        Never fails a round: a database error is logged and the next round tries again.
        At most max_batches transactions per call, so a backlog cannot stall the driver.
        """
        cfg = self.config
        if cfg.keep_versions <= 0:
            return []
        deleted: list[int] = []
        try:
            for _ in range(max_batches):
                batch = self.store.prune_versions(
                    self.model_name,
                    cfg.keep_versions,
                    cfg.keep_every,
                    cfg.retention_batch,
                    keep_restored=True,
                )
                deleted += batch
                if len(batch) < cfg.retention_batch:
                    break
        except Exception as error:
            log.warning("retention: could not delete old versions (%s)", describe_error(error))
        if deleted:
            log.info("retention: deleted %d old version(s) of %s", len(deleted), self.model_name)
        return deleted

    def _round_result(self, rnd: _Round, accepted: int) -> tuple[_Result | None, str]:
        """The round's new weights and metrics, or why it has none."""
        mean_delta: np.ndarray | None = None
        noisy_inside: float | None = None
        reason = ""
        self.last_secagg_stats = {}
        if rnd.secagg is not None:
            self.last_secagg_stats = {
                "degree": rnd.secagg.settings.degree,
                "threshold": rnd.secagg.threshold,
                "phase_seconds": dict(rnd.secagg.phase_seconds),
                "unmask_cpu_seconds": rnd.secagg.unmask_cpu_seconds,
            }
            result = rnd.secagg.result
            if result is None:
                reason = rnd.secagg.failure or "secure aggregation did not finish"
            elif accepted < self.config.min_clients:
                reason = f"only {accepted} update(s) survived, {self.config.min_clients} needed"
            else:
                mean_delta = (result.weighted_sum / result.weight_sum).astype(np.float32)
                noisy_inside = result.indicator_sum
        elif accepted >= self.config.min_clients:
            total = rnd.accumulator
            central = self._central_dp
            if central is not None:
                std = central.update_noise_multiplier * rnd.clip
                total = total + self._noise_rng.normal(0.0, std, total.size)
                if central.adaptive:
                    noisy_inside = rnd.inside_clip + self._noise_rng.normal(
                        0.0, central.count_noise
                    )
            if isinstance(self.strategy, RobustStrategy):
                assert rnd.updates is not None
                try:
                    mean_delta = self.strategy.combine(rnd.updates[: rnd.kept])
                except ValueError as exc:
                    reason = f"{self.strategy.name}: {exc}"
            else:
                mean_delta = (total / rnd.weight_sum).astype(np.float32)
        else:
            reason = (
                f"only {accepted} update(s) arrived before the deadline, "
                f"{self.config.min_clients} needed"
            )
        if mean_delta is None:
            return None, reason
        new_vector = self.strategy.aggregate_fit(rnd.base_vector, mean_delta)
        if not np.all(np.isfinite(new_vector)):
            return None, "aggregate is not finite; the round's updates were discarded"
        metrics = dict(self.evaluator(new_vector)) if self.evaluator else {}
        metrics["update_norm"] = float(np.linalg.norm(mean_delta))
        if self.config.update_clip_norm > 0:
            metrics["updates_clipped"] = float(rnd.clipped)
        if rnd.secagg is not None and rnd.secagg.result is not None:
            metrics["secagg"] = 1.0
            metrics["secagg_threshold"] = float(rnd.secagg.threshold)
            metrics["secagg_degree"] = float(rnd.secagg.settings.degree)
            metrics["secagg_dropped"] = float(len(rnd.secagg.result.dropped))
        privacy = self._privacy_record(rnd, accepted)
        next_clip = rnd.clip
        if privacy is not None:
            metrics["dp_epsilon"] = privacy.epsilon
            metrics["dp_clip"] = rnd.clip
            policy = self.config.user_dp
            if policy is not None and policy.adaptive and noisy_inside is not None:
                next_clip = policy.next_clip(rnd.clip, noisy_inside, accepted)
                metrics["dp_clip_next"] = next_clip
                metrics["dp_noisy_inside_fraction"] = noisy_inside / accepted
        return _Result(new_vector, self._strategy_state(), next_clip, metrics, privacy), ""

    def _strategy_state(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, copy=True) for k, v in self.strategy.state_dict().items()}

    def _apply(self, version: int, result: _Result) -> None:
        """Make a stored version the current model (under the lock)."""
        self._vector = result.vector
        self._clip = result.clip
        self._results_failing = None
        self.strategy.load_state_dict(result.strategy_state)
        self.model = ModelRecord(**{**self.model.__dict__, "current_version": version})
        self._completed_this_run += 1
        every = self.config.eval_every
        if every and self._completed_this_run % every == 0 and version not in self._eval_queue:
            self._eval_queue.append(version)
        if self.config.rounds and self._completed_this_run >= self.config.rounds:
            # The evaluations still queued run first (of the last version, with eval_every).
            self._training_done = True
            self._finished = not self._eval_queue

    def _record_failure(
        self,
        rnd: _Round,
        reason: str,
        seconds: float,
        participants: list[ParticipantRecord],
        result: _Result | None,
    ) -> int | None:
        """Write a round's failure; returns its version if it turns out to have completed."""
        try:
            stored = retry_transient(
                lambda: self.store.fail_round(rnd.id, reason, seconds, participants),
                self.config.store_retry_s,
                f"recording the failure of round {rnd.number}",
            )
        except Exception as error:
            self.store_error = describe_error(error)
            log.error(
                "round %d: its failure could not be recorded (%s); no round starts until "
                "the database takes it",
                rnd.number,
                self.store_error,
            )
            self._unsettled[rnd.id] = _Unsettled(
                rnd.id, rnd.number, reason, seconds, participants, self.clock(), result
            )
            return None
        self.store_error = ""
        if stored is not None and result is not None:
            # The commit went through but its acknowledgement was lost: keep that version.
            log.warning(
                "round %d: its result was stored after all, as version %d", rnd.number, stored
            )
            return stored
        return None

    def _settle(self) -> bool:
        """Write the ends of rounds the database missed; True when none is left.

        Driver thread only, outside the lock. A round found completed (its commit
        went through, the acknowledgement did not) is adopted as the current
        version, so its update is neither lost nor applied a second time.
        """
        now = self.clock()
        if now < self._settle_at:
            return False
        for entry in list(self._unsettled.values()):
            try:
                stored = self.store.fail_round(
                    entry.round_id, entry.reason, entry.seconds, entry.participants
                )
            except Exception as error:
                self.store_error = describe_error(error)
                self._settle_at = now + self._backoff("settle")
                return False
            del self._unsettled[entry.round_id]
            if stored is not None and entry.result is not None:
                with self._cond:
                    self._apply(stored, entry.result)
                    self._cond.notify_all()
                    self._signal(Change.ROUND)
                    self._signal(Change.ROUND)
                log.warning(
                    "round %d: its result was stored after all, as version %d",
                    entry.number,
                    stored,
                )
            elif stored is not None:
                self._reload_model()
            else:
                log.info("round %d: its failure is recorded now", entry.number)
        self.store_error = ""
        self._retry_delay["settle"] = _RETRY_BASE_S
        return True

    def _reload_model(self) -> None:
        model = self.store.get_model(self.model_name)
        if model is None:
            raise RuntimeError(f"model {self.model_name!r} vanished from the store")
        vector = self.store.load_version(self.model_name, model.current_version)
        with self._cond:
            self.model = model
            self._vector = vector
            self.strategy.initialize(vector)
            self._restore_optimizer_state(model.current_version)

    def _backoff(self, what: str) -> float:
        delay = self._retry_delay[what]
        self._retry_delay[what] = min(delay * 2, _RETRY_CAP_S)
        return delay

    # called by UploadSession
    def _commit(self, session: UploadSession, vector: np.ndarray) -> None:
        with self._cond:
            rnd, participant = session.round, session.participant
            if self._round is not rnd or rnd.closing:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"round {rnd.id} closed before the upload completed; check in again",
                )
            if participant.status is not Status.UPLOADING:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"device {participant.status.value} the round during its upload",
                )
            weight = session.weight
            if self._central_dp is not None:
                # Trusted-server DP: clip the whole update, weight every device equally.
                norm = float(np.linalg.norm(vector))
                if norm > rnd.clip:
                    vector *= np.float32(rnd.clip / norm)
                else:
                    rnd.inside_clip += 1
                weight = 1
            bound = self.config.update_clip_norm
            if bound > 0:
                norm = l2_norm(vector)
                if norm > bound:
                    vector *= np.float32(bound / norm)
                    rnd.clipped += 1
            if isinstance(self.strategy, RobustStrategy):
                if rnd.updates is None:
                    rnd.updates = np.empty((len(rnd.cohort), vector.size), dtype=np.float32)
                rnd.updates[rnd.kept] = vector
                rnd.kept += 1
            else:
                vector *= np.float32(weight)
                rnd.accumulator += vector
                rnd.weight_sum += weight
            participant.status = Status.UPLOADED
            participant.num_examples = session.weight
            participant.bytes_in += session.total_bytes
            self._cond.notify_all()

    def _commit_masked(self, session: UploadSession, parts: list[np.ndarray]) -> None:
        with self._cond:
            rnd, participant = session.round, session.participant
            if self._round is not rnd or rnd.closing or rnd.secagg is None:
                raise FederationError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"round {rnd.id} closed before the upload completed; check in again",
                )
            rnd.secagg.end_upload(participant.device_id, [p.view(np.uint32) for p in parts])
            crash_point("upload")
            participant.status = Status.UPLOADED
            participant.bytes_in += session.total_bytes
            self._advance_secagg(rnd.secagg)

    def _release(self, session: UploadSession, accepted: bool) -> None:
        with self._cond:
            rnd = session.round
            rnd.sessions.discard(session)
            if not accepted and rnd.secagg is not None:
                rnd.secagg.end_upload(session.participant.device_id, None)
            if not accepted and session.participant.status is Status.UPLOADING:
                session.participant.status = Status.SELECTED
            if session.buffer is not None:
                self._staging.append(session.buffer)
                self._signal(Change.STAGING)


def l2_norm(vector: np.ndarray) -> float:
    """L2 norm without float32 overflow: finite values near 1e38 would square to inf."""
    peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if peak == 0.0:
        return 0.0
    return peak * float(np.linalg.norm(vector / np.float32(peak)))


class UploadSession:
    """One device's upload in progress: chunks into a staging buffer, then one atomic add.

    The buffer is taken at the first data chunk (a header alone holds none) and
    given back when the upload commits, fails, is abandoned by its stream (idle
    timeout, broken connection) or its round closes (`RoundCoordinator` reaps the
    sessions of a closing round). A per-session lock orders the memcpy of a chunk
    against such a release: a buffer is never reused while a chunk is written into it.
    Lock order: session, then coordinator.
    """

    def __init__(
        self,
        coordinator: RoundCoordinator,
        rnd: _Round,
        participant: Participant,
        total_bytes: int,
        weight: int,
    ) -> None:
        self._coordinator = coordinator
        self.round = rnd
        self.participant = participant
        self.total_bytes = total_bytes
        self.weight = weight
        self.buffer: np.ndarray | None = None
        self.assembler: ChunkAssembler | None = None
        self._lock = threading.RLock()
        self._done = False
        self.released_because = ""

    @property
    def received(self) -> int:
        return self.assembler.received if self.assembler is not None else 0

    def _check_open(self) -> None:
        if self._done:
            raise FederationError(
                ErrorKind.FAILED_PRECONDITION,
                f"upload abandoned: {self.released_because or 'it already ended'}; check in again",
            )

    def await_buffer(self) -> None:
        """Return once a staging buffer is free (without taking it); Pending while none is.

        The transport reads the first data chunk only then, so an upload queued for a
        buffer leaves its data in gRPC's flow-controlled window (256 KiB) instead of
        holding a whole chunk in server memory: memory stays O(d + n x window).
        The transport runs it on its event loop: the session's and the coordinator's locks
        are only tried there (`hold_all`; the pool takes over when either is held).
        """
        with hold_all(self._lock, self._coordinator._cond):
            self._check_open()
            if self.assembler is None:
                self._coordinator._check_staging(self, take=False)

    def add_chunk(self, data: bytes | memoryview) -> None:
        """Copy one chunk in; Pending (call again) while no staging buffer is free.

        Runs on the transport's event loop. The first chunk, which takes a staging buffer
        under the coordinator's lock, comes through `call_without_waiting`: both locks are
        only tried (`hold_all`); later chunks take only the session's lock.
        """
        first = self.assembler is None  # set once, under the lock: None now may be stale
        locks = (self._lock, self._coordinator._cond) if first else (self._lock,)
        with hold_all(*locks):
            self._check_open()
            if self.assembler is None:
                if not data:
                    return  # an empty chunk needs no buffer
                buffer = self._coordinator._take_staging(self)
                self.buffer = buffer
                try:
                    self.assembler = ChunkAssembler(
                        self.total_bytes, buffer, keep_chunks=self.keep_chunks
                    )
                except ValueError as exc:
                    self.abort()
                    raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
            try:
                self.assembler.add(data)
            except ValueError as exc:
                self.abort()
                raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None

    # Keep chunks uncopied until commit (MaskedUploadSession) instead of staging them.
    keep_chunks = False
    # Whether `commit` is cheap enough for the transport's event loop (a plain update's
    # checks and strategy run in the pool).
    commit_on_loop = False

    def _finish_vector(self) -> np.ndarray:
        self._check_open()
        if self.assembler is None:
            raise FederationError(
                ErrorKind.INVALID_ARGUMENT,
                f"stream truncated: received 0 of {self.total_bytes} declared bytes",
            )
        try:
            return self.assembler.finish()
        except ValueError as exc:
            raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None

    def commit(self) -> None:
        """Validate the whole update and add it to the round; raises FederationError.

        On any refusal the session is aborted: the device may upload again.
        """
        with self._lock:
            try:
                vector = self._finish_vector()
                if not np.isfinite(vector).all():
                    bad = int(np.count_nonzero(~np.isfinite(vector)))
                    raise FederationError(
                        ErrorKind.INVALID_ARGUMENT,
                        f"update contains {bad} NaN or Inf value(s); it was discarded",
                    )
                self._coordinator._commit(self, vector)
            except FederationError:
                self.abort()
                raise
            self._finish(accepted=True)

    def abort(self, because: str = "") -> None:
        """Discard a partial upload and give its buffer back; the device may upload again."""
        with self._lock:
            if not self._done and because:
                self.released_because = because
            self._finish(accepted=False)

    def _finish(self, accepted: bool) -> None:
        if not self._done:
            self._done = True
            self._coordinator._release(self, accepted)


class MaskedUploadSession(UploadSession):
    """A secure-aggregation upload: uint32 residues, checked for length only, added mod 2^32.

    Its chunks are not copied into the staging buffer: they stay in gRPC's message
    buffers (read-only bytes) and are added to the sum, part by part, at commit. The
    staging buffer is still taken at the first data chunk: it bounds the uploads in
    flight, whose chunks hold as much memory, and holds a stream cut mid-value.
    """

    keep_chunks = True
    # The transport commits it on its event loop: no hop to the pool and back per upload
    # (the add is ~1 ms for 1M elements; both locks are only tried there, `hold_all`).
    commit_on_loop = True

    def commit(self) -> None:
        with hold_all(self._lock, self._coordinator._cond):
            try:
                self._check_open()
                if self.assembler is None:
                    self._finish_vector()  # raises: nothing was received
                assert self.assembler is not None
                try:
                    parts = self.assembler.finish_parts()
                except ValueError as exc:
                    raise FederationError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
                self._coordinator._commit_masked(self, parts)
            except FederationError:
                self.abort()
                raise
            self._finish(accepted=True)
