"""Helpers shared by the servicers: metadata, error mapping, auth interceptor."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from server.errors import ErrorKind, FederationError

audit = logging.getLogger("xeno.audit")

DEVICE_ID_KEY = "x-xeno-device-id"
AUTHORIZATION_KEY = "authorization"

_CODES: dict[ErrorKind, grpc.StatusCode] = {
    kind: getattr(grpc.StatusCode, kind.value) for kind in ErrorKind
}


def status_of(kind: ErrorKind) -> grpc.StatusCode:
    return _CODES[kind]


def metadata_value(context: Any, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def bearer_token(value: str) -> str:
    prefix = "bearer "
    return value[len(prefix) :] if value.lower().startswith(prefix) else ""


def device_id_of(context: Any) -> str:
    """The device id the auth interceptor already verified."""
    return metadata_value(context, DEVICE_ID_KEY)


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


def _abort_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    """Checks bearer credentials on every call of the protected services.

    Device calls need `x-xeno-device-id` and `authorization: Bearer <token>`
    (Register is open, guarded by the enrollment key); admin calls need the
    admin token when one is configured. Health and reflection are open.
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
        metadata = dict(handler_call_details.invocation_metadata or ())
        token = bearer_token(str(metadata.get(AUTHORIZATION_KEY, "")))
        if method.startswith("/xeno.fl.v1.Federation/"):
            device = str(metadata.get(DEVICE_ID_KEY, ""))
            if not device or not token:
                return self._deny(handler, method, device, "missing device id or bearer token")
            if not self._authenticate_device(device, token):
                return self._deny(handler, method, device, "unknown device or wrong token")
        elif (
            method.startswith("/xeno.fl.v1.Admin/")
            and self._admin_token
            and not hmac.compare_digest(token.encode(), self._admin_token.encode())
        ):
            return self._deny(handler, method, "", "admin token missing or wrong")
        return handler

    @staticmethod
    def _deny(handler: Any, method: str, device: str, why: str) -> Any:
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
            f"{why}; register again (xeno-fl client --reset) if the credentials were lost",
        )
