"""The asyncio transport under the servicers: no call holds a thread while it waits.

The server is a `grpc.aio` server. Servicer methods written as plain functions
(most of them: Register, the secure-aggregation phase calls, the Admin API) run
in a bounded thread pool, one short piece of domain work at a time, and see a
`SyncContext` whose `abort` works as in the synchronous API. When the domain
layer raises `Pending` (a phase still open, no free staging buffer), the call
gives its thread back and waits as a coroutine until the coordinator announces
the awaited `Change`, then runs again (every such domain call is idempotent).
So a cohort of 1,000 devices waiting in a phase costs 1,000 coroutines, not
1,000 threads. Any new unary method gets this for free: raise `Pending` in the
domain call and register the servicer with `register_servicer`.

Methods marked `@on_loop` (the short secure-aggregation phase calls) skip the
pool: they run on the event loop itself, unless the coordinator's lock is taken
(`hold` raises `WouldWait` before anything changed), and only then in the pool.
The hop to a worker thread and back cost more server CPU than such a call's own
work: ~100 us of futex wake-ups, self-pipe writes and GIL hand-offs per call,
for ~1,300 calls in a secure round of 100 devices. A masked upload's buffer wait,
first chunk and commit run there the same way (`hold_all` over the session's and
the coordinator's locks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from server.errors import Change, FederationError, Pending, WouldWait, call_without_waiting
from server.services.common import AuthenticatedContext, status_of

log = logging.getLogger("xeno.server.aio")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_ON_LOOP = "__xeno_on_loop__"


def on_loop(method: F) -> F:
    """Mark a plain servicer method as cheap and non-blocking: run it on the event loop.

    Its domain calls must take their first lock with `hold` and do no I/O: they run
    between two events of every other call (see the module docstring).
    """
    setattr(method, _ON_LOOP, True)
    return method


# A safety net only: every change a waiting call needs is announced (the round driver
# announces phases that close at their deadline), and asking 100 waiting devices again
# every second cost a quarter of a second of server CPU per secure round.
RECHECK_S = {Change.ROUND: 5.0, Change.PHASE: 5.0, Change.STAGING: 5.0}


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` seconds have passed.

    `asyncio.timeout` rather than `wait_for`, which wraps the wait in a new Task (with
    its own futures and callbacks) for each of the ~500 phase waits of a secure round.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()


class Changes:
    """The coordinator's `Change` announcements (from any thread), awaited by coroutines.

    ROUND and PHASE wake every waiter: each happens a few times per round. STAGING
    (a buffer came back) wakes one waiter, the oldest: waking all n uploads queued
    for a buffer on each of n releases would cost O(n^2) retries.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events = {change: asyncio.Event() for change in Change}
        self._released = 0  # staging buffers returned so far
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    def announce(self, change: Change) -> None:
        """Thread-safe; wakes the coroutines waiting for `change`."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._fire, change)

    def _fire(self, change: Change) -> None:
        if change is Change.STAGING:
            self._released += 1
            self._wake_one()
            return
        event, self._events[change] = self._events[change], asyncio.Event()
        event.set()
        if change is Change.ROUND:  # a closed round: its uploads waiting for a buffer end
            while self._queue:
                waiter = self._queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    def _wake_one(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def marks(self) -> dict[Change, object]:
        """Where each change stands now.

        Taken *before* asking the domain layer, so that an announcement between its
        answer and the wait is not missed.
        """
        marks: dict[Change, object] = dict(self._events)
        marks[Change.STAGING] = self._released
        return marks

    async def wait(self, change: Change, mark: object, timeout: float) -> None:
        """Until `change` is announced after `mark` was taken, or `timeout` seconds pass."""
        if change is not Change.STAGING:
            assert isinstance(mark, asyncio.Event)
            await wait_event(mark, timeout)
            return
        if self._released != mark:
            return  # a buffer came back meanwhile: try again at once
        waiter = self._loop.create_future()
        self._queue.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, timeout))
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, then cancelled: pass the wake-up on
            raise


class Runner:
    """Runs domain calls in the bounded pool; waits out `Pending` as a coroutine."""

    def __init__(self, pool: ThreadPoolExecutor, changes: Changes) -> None:
        self.pool = pool
        self.changes = changes

    async def run(self, fn: Callable[..., T], *args: Any, on_loop: bool = False) -> T:
        """fn(*args) in the pool (with the caller's context variables), once.

        With on_loop, on the event loop itself, unless its first lock is taken
        (WouldWait: nothing changed), and then in the pool.
        """
        if on_loop:
            with contextlib.suppress(WouldWait):
                return call_without_waiting(fn, *args)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self.pool, functools.partial(ctx.run, fn, *args))

    async def call(self, fn: Callable[..., T], *args: Any, on_loop: bool = False) -> T:
        """fn(*args), called again on each announced change while it raises Pending.

        Raises the Pending's `expired` FederationError once its timeout has passed.
        """
        loop = asyncio.get_running_loop()
        give_up: float | None = None
        while True:
            marks = self.changes.marks()
            try:
                return await self.run(fn, *args, on_loop=on_loop)
            except Pending as pending:
                now = loop.time()
                if give_up is None:
                    give_up = now + pending.timeout_s
                if now >= give_up:
                    raise pending.expired from None
                # Buffer waits are woken one by one as buffers come back (and all at once
                # when a round closes); the others on every announcement of their change.
                change = pending.change
                recheck = min(give_up - now, RECHECK_S[change])
                await self.changes.wait(change, marks[change], recheck)


class AbortRpc(Exception):  # noqa: N818 - control flow, like grpc's own abort
    """Raised by `SyncContext.abort` in the pool; the coroutine aborts the call with it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SyncContext:
    """What a plain-function servicer method sees of an asyncio call."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        self._context = context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return str(self._context.peer())

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AbortRpc(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def sync_view(context: Any) -> Any:
    """The context a plain-function method gets, keeping the identity auth attached."""
    if isinstance(context, AuthenticatedContext):
        return AuthenticatedContext(SyncContext(context._context), context.device_id, context.admin)
    return SyncContext(context)


async def abort_with(context: grpc.aio.ServicerContext, error: FederationError) -> None:  # type: ignore[type-arg]
    await context.abort(status_of(error.kind), error.message)


def _unary(behavior: Callable[..., Any], runner: Runner) -> Callable[..., Any]:
    inline = bool(getattr(behavior, _ON_LOOP, False))

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        try:
            return await runner.call(behavior, request, sync_view(context), on_loop=inline)
        except AbortRpc as abort:
            await context.abort(abort.code, abort.details)
        except FederationError as err:  # a Pending that expired
            await abort_with(context, err)

    return handle


def adapt(handler: Any, runner: Runner) -> Any:
    """An asyncio handler for `handler`: plain unary functions go through the runner."""
    if handler.request_streaming or handler.response_streaming:
        behavior = handler.stream_stream or handler.stream_unary or handler.unary_stream
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            raise TypeError(f"streaming method {behavior!r} must be async: it would hold a thread")
        return handler
    if inspect.iscoroutinefunction(handler.unary_unary):
        return handler
    return grpc.unary_unary_rpc_method_handler(
        _unary(handler.unary_unary, runner),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def capture_handlers(add_to_server: Callable[[Any, Any], None], servicer: Any) -> dict[str, Any]:
    """The method handlers a generated `add_XServicer_to_server` would register."""
    captured: dict[str, Any] = {}

    class _Capture:
        def add_generic_rpc_handlers(self, _handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, _service: str, handlers: Any) -> None:
            captured.update(handlers)

    add_to_server(servicer, _Capture())
    return captured


def register_servicer(
    server: grpc.aio.Server,
    service: str,
    handlers: dict[str, Any],
    runner: Runner,
) -> None:
    adapted = {name: adapt(h, runner) for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, adapted),))
    server.add_registered_method_handlers(service, adapted)  # type: ignore[attr-defined]
