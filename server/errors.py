"""Domain errors of the server, each with the gRPC status a servicer maps it to.

The domain layer raises these and knows nothing of gRPC; the servicers turn
`kind` into a status code (server/services/common.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    ABORTED = "ABORTED"


class FederationError(Exception):
    """A refused request: the state is unchanged; `message` says what to do next."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Change(enum.Enum):
    """What a pending call waits for; the coordinator announces each (see `Pending`)."""

    ROUND = "round"  # a round started or closed, the federation finished, the server stops
    PHASE = "phase"  # a secure-aggregation phase closed
    STAGING = "staging"  # a staging buffer came back to the pool


class Pending(Exception):  # noqa: N818 - a state, not a failure
    """The answer needs `change` to happen first; nothing was changed that a retry would repeat.

    Domain calls never block: a call that must wait (a secure-aggregation phase that is
    still open, an upload chunk with no free staging buffer) raises Pending, and the
    transport layer calls again once the coordinator announces `change`, giving up after
    `timeout_s` with `expired` (an error of kind `expired_kind`). Every call that may
    raise Pending is idempotent, so calling it again is safe.
    """

    def __init__(
        self,
        change: Change,
        timeout_s: float,
        expired: str = "phase still open; call again",
        expired_kind: ErrorKind = ErrorKind.UNAVAILABLE,
    ) -> None:
        super().__init__(expired)
        self.change = change
        self.timeout_s = timeout_s
        self.expired = FederationError(expired_kind, expired)


class RoundCompleted(Exception):  # noqa: N818 - an outcome, not a failure
    """The round already completed with this device's masked update in its sum.

    A secure-aggregation call (GetUnmaskRequest, ConfirmSurvivors, Unmask) from a device
    whose update is in a round that closed successfully without needing its answer: the
    servicer tells the device so (round_completed, with the version), instead of "closed".
    """

    def __init__(self, version: int) -> None:
        super().__init__(f"the round already completed as version {version}")
        self.version = version


class WouldWait(Exception):  # noqa: N818 - a state, not a failure
    """A call made with `no_wait` found its first lock taken; nothing was changed.

    The transport runs cheap domain calls on its event loop, where waiting for a lock
    would stall every other call, and runs the call again in its thread pool instead.
    """


_no_wait: contextvars.ContextVar[bool] = contextvars.ContextVar("xeno_no_wait", default=False)


def call_without_waiting(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), whose first `hold` raises WouldWait instead of waiting for its lock."""

    def run() -> T:
        _no_wait.set(True)
        return fn(*args)

    return contextvars.copy_context().run(run)


class Lock(Protocol):
    """What `hold` needs of a lock (Lock, RLock, Condition)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


@contextlib.contextmanager
def hold(lock: Lock) -> Iterator[None]:
    """`with lock`, except in `call_without_waiting`: its first lock is only tried.

    Only the first: once a call holds a lock it may change state, so from then on
    it waits for locks like any other call (a WouldWait then would leave half a change).
    """
    if _no_wait.get():
        if not lock.acquire(blocking=False):
            raise WouldWait
        _no_wait.set(False)
    else:
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def hold_all(*locks: Lock) -> Iterator[None]:
    """`hold` for several locks, taken in this order (released in reverse).

    In `call_without_waiting` every one of them is only tried: when any is taken, those
    already acquired are released and WouldWait is raised, nothing having changed. For a
    call on the event loop that needs a second lock before it changes anything (an
    upload's session lock, then the coordinator's), so that a long holder of the second
    (the unmasking, a Forget waiting on the database) never stalls the loop.
    """
    taken: list[Lock] = []
    try:
        if _no_wait.get():
            for lock in locks:
                if not lock.acquire(blocking=False):
                    raise WouldWait
                taken.append(lock)
            _no_wait.set(False)
        else:
            for lock in locks:
                lock.acquire()
                taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()
