"""Bounds on what callers can hold: concurrent calls, idle streams, call rates.

`GuardInterceptor` wraps every handler the server runs (after authentication,
so per-device limits count authenticated devices only):

* at most `max_concurrent_rpcs` calls in flight (health checks exempt, so a
  saturated server still answers its probe); the one over gets RESOURCE_EXHAUSTED;
* every client stream must send its first message within `first_message_s`
  and then never go `idle_s` without one, else the call ends with
  DEADLINE_EXCEEDED (an idle upload then frees its staging buffer);
* every response stream must take each message within `idle_s`: a client that
  stops reading (a zero flow-control window) would otherwise hold its call, and a
  slot of `max_concurrent_rpcs`, forever; such a call ends with DEADLINE_EXCEEDED;
* a unary call must answer within `call_s`: a handler stuck on something that never
  answers (a database connection that went silent) ends with DEADLINE_EXCEEDED
  and gives its slot back, instead of holding it until the server restarts;
* token buckets per device and per peer address on Register and CheckIn; a
  refusal is RESOURCE_EXHAUSTED with the wait in its message and in the
  trailing metadata `x-xeno-retry-after-ms`;
* a call that fails because the database is unreachable or full (any store call of
  any servicer) ends with UNAVAILABLE and a retry hint in the same trailing metadata,
  not as UNKNOWN with the driver's exception: devices back off and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from server.limits import CallLimit, Refusal, TokenBuckets
from server.refusals import RATE_LIMITED, RefusalLog
from server.store import describe_error, store_unavailable

audit = logging.getLogger("xeno.audit")
log = logging.getLogger("xeno.server.guard")

RETRY_AFTER_KEY = "x-xeno-retry-after-ms"
REGISTER = "/xeno.fl.v1.Federation/Register"
CHECK_IN = "/xeno.fl.v1.Federation/CheckIn"
UNLIMITED = frozenset({"/grpc.health.v1.Health/Check"})
ABORT_WAIT_S = 1.0
STORE_RETRY_AFTER_MS = 2000  # a restarting database is usually back within seconds


@dataclass(frozen=True)
class GuardConfig:
    max_concurrent_rpcs: int = 4096
    first_message_s: float = 10.0
    idle_s: float = 30.0
    # Longer than any legitimate wait of a one-response call: a long poll (10 s) or a
    # secure-aggregation phase call (the phase timeout + 5 s).
    call_s: float = 120.0
    device_checkin_rate: float = 5.0
    device_checkin_burst: float = 20.0
    peer_checkin_rate: float = 500.0
    peer_checkin_burst: float = 2000.0
    device_register_rate: float = 0.2
    device_register_burst: float = 5.0
    peer_register_rate: float = 50.0
    peer_register_burst: float = 500.0

    def __post_init__(self) -> None:
        for name in ("first_message_s", "idle_s", "call_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")


class StreamIdle(Exception):  # noqa: N818 - an outcome of the caller's behaviour
    """A client stream sent nothing, or took no response, for too long."""


class TimedWrites:
    """A call's context whose `write` ends the call when the client stops reading."""

    def __init__(self, context: Any, idle_s: float) -> None:
        self._context = context
        self._idle_s = idle_s

    async def write(self, message: Any) -> None:
        try:
            async with asyncio.timeout(self._idle_s):
                await self._context.write(message)
        except TimeoutError:
            raise StreamIdle(
                f"the client took no response message within {self._idle_s:g} s: the server "
                "closed the stream (--stream-idle-timeout)"
            ) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class TimedRequests:
    """A call's request stream that ends the call when the client stops sending."""

    def __init__(self, requests: Any, first_s: float, idle_s: float, method: str) -> None:
        self._it = requests.__aiter__()
        self._timeout = first_s
        self._idle_s = idle_s
        self._first = True
        self._method = method

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            # asyncio.timeout reschedules one timer; wait_for would wrap every message
            # of an upload in a fresh Task.
            async with asyncio.timeout(self._timeout):
                message = await self._it.__anext__()
        except TimeoutError:
            what = "first message" if self._first else "next message"
            raise StreamIdle(
                f"no {what} within {self._timeout:g} s: the server closed the idle stream "
                f"(--stream-{'first-message' if self._first else 'idle'}-timeout)"
            ) from None
        self._first = False
        self._timeout = self._idle_s
        return message


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> 'ipv4:1.2.3.4'; the port changes with every connection."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    def __init__(self, config: GuardConfig, refusals: RefusalLog | None = None) -> None:
        self.config = config
        # Rate-limit refusals are counted in the audit log (server/refusals.py).
        self.refusals = refusals
        self.calls = CallLimit(config.max_concurrent_rpcs)
        c = config
        self._device = {
            CHECK_IN: TokenBuckets(
                c.device_checkin_rate, c.device_checkin_burst, "check-ins from this device"
            ),
            REGISTER: TokenBuckets(
                c.device_register_rate,
                c.device_register_burst,
                "registrations with this identity key",
            ),
        }
        self._peer = {
            CHECK_IN: TokenBuckets(
                c.peer_checkin_rate, c.peer_checkin_burst, "check-ins from this address"
            ),
            REGISTER: TokenBuckets(
                c.peer_register_rate, c.peer_register_burst, "registrations from this address"
            ),
        }

    def _admit(self, method: str, request: Any, context: Any) -> Refusal | None:
        if method in self._peer:
            refusal = self._peer[method].take(peer_host(str(context.peer())))
            if refusal is not None:
                return refusal
            if method == REGISTER:
                key = request.identity_public_key.hex() if request is not None else ""
            else:
                key = getattr(context, "device_id", "")  # set by the auth interceptor
            if key:
                return self._device[method].take(str(key))
        return None

    async def _refuse(self, method: str, context: Any, refusal: Refusal) -> None:
        audit.info(
            "refused %s from %s: RESOURCE_EXHAUSTED %s", method, context.peer(), refusal.message
        )
        if self.refusals is not None:
            device = getattr(context, "device_id", "")
            actor = f"device {device}" if device else f"peer {peer_host(str(context.peer()))}"
            self.refusals.note(RATE_LIMITED, actor, method, refusal.message)
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(refusal.retry_after_ms)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message)

    async def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: Any, method: str) -> Any:
        guard = self
        limited = method not in UNLIMITED
        cfg = self.config

        async def enter(request: Any, context: Any) -> bool:
            refusal = guard._admit(method, request, context)
            if refusal is None and limited:
                refusal = guard.calls.enter()
                if refusal is None:
                    return True
            if refusal is not None:
                await guard._refuse(method, context, refusal)
            return False

        def timed(requests: Any) -> TimedRequests:
            return TimedRequests(requests, cfg.first_message_s, cfg.idle_s, method)

        async def idle(context: Any, exc: StreamIdle) -> None:
            audit.info("closed %s from %s: %s", method, context.peer(), exc)
            # The status goes out behind any response message the client has not taken,
            # so for a client that stopped reading it may never complete: stop waiting
            # and free the call's slot anyway (the transport delivers the status if the
            # client reads again, and drops the stream with its connection).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ABORT_WAIT_S):
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))

        async def unavailable(context: Any, exc: Exception) -> None:
            log.warning("%s failed: database unavailable (%s)", method, describe_error(exc))
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(STORE_RETRY_AFTER_MS)),))
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server's database is unavailable; retry in {STORE_RETRY_AFTER_MS} ms",
            )

        if handler.request_streaming:
            behavior = handler.stream_stream or handler.stream_unary
        else:
            behavior = handler.unary_stream or handler.unary_unary
        streaming_in = handler.request_streaming

        if handler.response_streaming:
            generator = inspect.isasyncgenfunction(behavior)

            async def respond(request: Any, context: Any) -> None:
                # Written here rather than yielded, so that each write is timed: a handler
                # suspended at `yield` cannot see how long the transport takes its message.
                entered = await enter(None if streaming_in else request, context)
                try:
                    arg = timed(request) if streaming_in else request
                    writer = TimedWrites(context, cfg.idle_s)
                    if generator:
                        async for response in behavior(arg, context):
                            await writer.write(response)
                    else:  # the handler writes through its context itself
                        await behavior(arg, writer)
                except StreamIdle as exc:
                    await idle(context, exc)
                except Exception as exc:
                    if not store_unavailable(exc):
                        raise
                    await unavailable(context, exc)
                finally:
                    if entered:
                        guard.calls.exit()

            wrapped: Any = respond
        else:

            async def call(request: Any, context: Any) -> Any:
                entered = await enter(None if streaming_in else request, context)
                deadline = asyncio.timeout(cfg.call_s)
                try:
                    if streaming_in:  # an upload: timed per message (its size sets its length)
                        return await behavior(timed(request), context)
                    async with deadline:
                        return await behavior(request, context)
                except StreamIdle as exc:
                    await idle(context, exc)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    message = (
                        f"no answer within {cfg.call_s:g} s: the server gave up on the call "
                        "(--call-timeout); retry"
                    )
                    audit.warning("gave up on %s from %s: %s", method, context.peer(), message)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
                except Exception as exc:
                    if not store_unavailable(exc):
                        raise
                    await unavailable(context, exc)
                finally:
                    if entered:
                        guard.calls.exit()

            wrapped = call

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        return kinds[(handler.request_streaming, handler.response_streaming)](
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
