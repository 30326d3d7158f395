"""Helpers shared by the servicers: the auth interceptor, the caller's identity, error mapping.

Identity is established once, by `AuthInterceptor`, from the call's metadata;
the interceptor then hands the handler a context that carries the verified
device id (`AuthenticatedContext`). Handlers read it with `device_id_of` and
never look at the metadata again: reading the metadata twice, in two places,
is how a device once authenticated as itself and acted as another (the
interceptor took the last `x-xeno-device-id`, the servicers the first). A call
that carries either credential header more than once is refused outright.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from server.errors import ErrorKind, FederationError

audit = logging.getLogger("xeno.audit")

DEVICE_ID_KEY = "x-xeno-device-id"
AUTHORIZATION_KEY = "authorization"
CREDENTIAL_KEYS = (DEVICE_ID_KEY, AUTHORIZATION_KEY)

_CODES: dict[ErrorKind, grpc.StatusCode] = {
    kind: getattr(grpc.StatusCode, kind.value) for kind in ErrorKind
}


def status_of(kind: ErrorKind) -> grpc.StatusCode:
    return _CODES[kind]


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    """The gRPC status a domain refusal of this kind maps to."""
    code: grpc.StatusCode = _CODES[kind]
    return code


def bearer_token(value: str) -> str:
    prefix = "bearer "
    return value[len(prefix) :] if value.lower().startswith(prefix) else ""


class AuthenticatedContext:
    """The servicer context of a call, plus the identity the interceptor verified.

    Every attribute but `device_id` is the real context's, so handlers use it as
    they would the context itself (sync or grpc.aio alike).
    """

    def __init__(self, context: Any, device_id: str) -> None:
        self._context = context
        self.device_id = device_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def device_id_of(context: Any) -> str:
    """The device id the auth interceptor verified for this call.

    A handler reached without the interceptor has no identity: the call is refused.
    """
    if isinstance(context, AuthenticatedContext) and context.device_id:
        return context.device_id
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "call has no authenticated device identity")
    raise AssertionError("unreachable: context.abort raises")


# Refusals that are ordinary protocol races (a round closed, a phase moved on) are logged
# at INFO; refusals of bad input at WARNING.
_ROUTINE = {ErrorKind.FAILED_PRECONDITION, ErrorKind.NOT_FOUND, ErrorKind.UNAVAILABLE}


def _audit_refusal(error: FederationError, rpc: str, device: str) -> None:
    audit.log(
        logging.INFO if error.kind in _ROUTINE else logging.WARNING,
        "refused %s from device %s: %s %s",
        rpc,
        device or "-",
        error.kind.value,
        error.message,
        extra={"device_id": device or None, "status": error.kind.value},
    )


def abort(context: grpc.ServicerContext, error: FederationError, rpc: str, device: str) -> NoReturn:
    _audit_refusal(error, rpc, device)
    context.abort(_CODES[error.kind], error.message)
    raise AssertionError("unreachable: context.abort raises")


async def abort_async(
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    error: FederationError,
    rpc: str,
    device: str,
) -> NoReturn:
    _audit_refusal(error, rpc, device)
    await context.abort(_CODES[error.kind], error.message)
    raise AssertionError("unreachable: context.abort raises")


def _handler_kind(handler: Any) -> str:
    return ("stream" if handler.request_streaming else "unary") + (
        "_stream" if handler.response_streaming else "_unary"
    )


def _replace_behavior(handler: Any, behavior: Callable[..., Any]) -> Any:
    """The handler with its behavior replaced, serializers and streaming kind kept."""
    make = getattr(grpc, f"{_handler_kind(handler)}_rpc_method_handler")
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _abort_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        await context.abort(code, message)

    return _replace_behavior(handler, deny)


def with_identity(handler: Any, device_id: str) -> Any:
    """The handler, called with an `AuthenticatedContext` carrying device_id.

    Works for plain functions, generators, coroutines and async generators, so the
    same mechanism serves the thread-pool server and grpc.aio handlers.
    """
    behavior = getattr(handler, _handler_kind(handler))
    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            async for item in behavior(request, AuthenticatedContext(context, device_id)):
                yield item

        return _replace_behavior(handler, agen)
    if inspect.iscoroutinefunction(behavior):

        async def coro(request: Any, context: Any) -> Any:
            return await behavior(request, AuthenticatedContext(context, device_id))

        return _replace_behavior(handler, coro)

    def call(request: Any, context: Any) -> Any | Iterator[Any]:
        return behavior(request, AuthenticatedContext(context, device_id))

    return _replace_behavior(handler, call)


@dataclass(frozen=True)
class Credentials:
    """The credential headers of one call, each present at most once."""

    device_id: str
    token: str


def read_credentials(metadata: Sequence[tuple[str, str | bytes]] | None) -> Credentials | str:
    """The call's credentials, or why they are refused (a header given twice).

    Every occurrence is counted: gRPC delivers repeated keys as separate entries,
    and any reading that picks one of several values is ambiguous.
    """
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in CREDENTIAL_KEYS:
            if key in found:
                return f"metadata {key!r} given more than once"
            found[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return Credentials(found.get(DEVICE_ID_KEY, ""), bearer_token(found.get(AUTHORIZATION_KEY, "")))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    """Checks bearer credentials on every call of the protected services.

    Device calls need `x-xeno-device-id` and `authorization: Bearer <token>`,
    each exactly once (Register is open, guarded by the enrollment key); their
    handlers receive the verified id through `with_identity`. Admin calls need
    the admin token when one is configured. Health and reflection are open.
    """

    def __init__(
        self,
        authenticate_device: Callable[[str, str], bool],
        admin_token: str = "",
        open_methods: frozenset[str] = frozenset({"/xeno.fl.v1.Federation/Register"}),
    ) -> None:
        self._authenticate_device = authenticate_device
        self._admin_token = admin_token
        self._open = open_methods

    async def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in self._open:
            return handler
        creds = read_credentials(handler_call_details.invocation_metadata)
        if isinstance(creds, str):
            return self._deny(handler, method, "", creds, "send each credential header once")
        if method.startswith("/xeno.fl.v1.Federation/"):
            device = creds.device_id
            if not device or not creds.token:
                return self._deny(handler, method, device, "missing device id or bearer token")
            if not self._authenticate_device(device, creds.token):
                return self._deny(handler, method, device, "unknown device or wrong token")
            return with_identity(handler, device)
        if (
            method.startswith("/xeno.fl.v1.Admin/")
            and self._admin_token
            and not hmac.compare_digest(creds.token.encode(), self._admin_token.encode())
        ):
            return self._deny(handler, method, "", "admin token missing or wrong")
        return handler

    @staticmethod
    def _deny(
        handler: Any,
        method: str,
        device: str,
        why: str,
        hint: str = "register again (xeno-fl client --reset) if the credentials were lost",
    ) -> Any:
        audit.warning(
            "refused %s from device %s: UNAUTHENTICATED %s",
            method,
            device or "-",
            why,
            extra={"device_id": device or None, "status": "UNAUTHENTICATED"},
        )
        return _abort_handler(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{why}; {hint}",
        )
