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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from common.certs import CertKind, Role
from common.tls import peer_identity
from server import refusals as refused
from server.errors import ErrorKind, FederationError
from server.refusals import RefusalLog
from server.revocation import Revocations
from server.security import Principal, required_role
from server.services.guard import peer_host
from server.store.audit import set_actor

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

    Every attribute but `device_id` and `admin` is the real context's, so handlers
    use it as they would the context itself (sync or grpc.aio alike).
    """

    def __init__(
        self,
        context: Any,
        device_id: str,
        admin: Principal | None = None,
        on_abort: Callable[[grpc.StatusCode, str], None] | None = None,
    ) -> None:
        self._context = context
        self.device_id = device_id
        self.admin = admin
        self._on_abort = on_abort

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str) -> Any:
        # The handler refuses the call: the audit log counts some classes of refusal.
        if self._on_abort is not None:
            self._on_abort(code, details)
        return self._context.abort(code, details)


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


# Counts a refusal for the audit log: (status, actor or "" for the caller's address,
# the call's context, the reason).
NoteRefusal = Callable[[grpc.StatusCode, str, Any, str], None]


def _abort_handler(
    handler: Any, code: grpc.StatusCode, message: str, note: NoteRefusal | None = None
) -> Any:
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        if note is not None:
            note(code, "", context, message)
        await context.abort(code, message)

    return _replace_behavior(handler, deny)


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    # Who was refused, when verified (an admin principal); "": the caller's address.
    actor: str = ""


# A check made when the call runs (the peer's certificate is only known then): the
# call's admin principal (or None) to proceed, a Refusal to refuse it.
CallCheck = Callable[[Any], "Refusal | Principal | None"]


def with_identity(
    handler: Any, device_id: str, check: CallCheck | None = None, note: NoteRefusal | None = None
) -> Any:
    """The handler, called with an `AuthenticatedContext` carrying device_id.

    `check(context)`, run first, may refuse the call (a status and message) or name
    the admin principal. Works for plain functions, generators, coroutines and async
    generators, so the same mechanism serves the thread-pool server and grpc.aio handlers.
    """
    behavior = getattr(handler, _handler_kind(handler))

    def authenticated(context: Any) -> AuthenticatedContext | tuple[grpc.StatusCode, str]:
        verdict = check(context) if check is not None else None
        if isinstance(verdict, Refusal):
            if note is not None:
                note(verdict.code, verdict.actor, context, verdict.message)
            return verdict.code, verdict.message
        # What this call changes is recorded in the audit log as done by this actor.
        on_abort = None
        if verdict is not None:
            actor = f"admin {verdict.name} ({verdict.role.value})"
            set_actor(actor)
            if note is not None:

                def on_abort(code: grpc.StatusCode, details: str) -> None:
                    note(code, actor, context, details)

        elif device_id:
            set_actor(f"device {device_id}")
        return AuthenticatedContext(context, device_id, verdict, on_abort)

    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            ctx = authenticated(context)
            if isinstance(ctx, tuple):
                await context.abort(*ctx)
                return
            async for item in behavior(request, ctx):
                yield item

        return _replace_behavior(handler, agen)
    if inspect.iscoroutinefunction(behavior):

        async def coro(request: Any, context: Any) -> Any:
            ctx = authenticated(context)
            if isinstance(ctx, tuple):
                await context.abort(*ctx)
            return await behavior(request, ctx)

        return _replace_behavior(handler, coro)

    def call(request: Any, context: Any) -> Any | Iterator[Any]:
        ctx = authenticated(context)
        if isinstance(ctx, tuple):
            context.abort(*ctx)
        return behavior(request, ctx)

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
    """Checks credentials on every call of the protected services.

    Device calls need `x-xeno-device-id` and `authorization: Bearer <token>`,
    each exactly once (Register is open, guarded by the enrollment key or the
    client certificate); their handlers receive the verified id through
    `with_identity`. With mTLS (`device_cert_name` given) a device call must also
    come over a connection whose client certificate is the device certificate the
    device registered with: a stolen token alone does not do.

    Admin calls need an admin credential when any is configured: a bearer token
    of `admin_tokens` or, with mTLS, an admin certificate; either names a
    `Principal` with a role. Without any (loopback development) the admin API is
    open. Health and reflection are open.

    With `revocations`, every call that comes with a client certificate (Register
    included) is refused when the certificate was revoked (server/revocation.py).
    """

    def __init__(
        self,
        authenticate_device: Callable[[str, str], bool],
        admin_tokens: Mapping[str, Principal] | str = "",
        open_methods: frozenset[str] = frozenset({"/xeno.fl.v1.Federation/Register"}),
        device_cert_name: Callable[[str], str | None] | None = None,
        revocations: Revocations | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self._authenticate_device = authenticate_device
        self._revocations = revocations
        self._refusals = refusals
        if isinstance(admin_tokens, str):
            admin_tokens = {admin_tokens: Principal("admin", Role.ADMIN)} if admin_tokens else {}
        self._admin_tokens = dict(admin_tokens)
        self._open = open_methods
        self._device_cert_name = device_cert_name

    @property
    def mtls(self) -> bool:
        return self._device_cert_name is not None

    async def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if method in self._open:
            revoked = self._revocation_check(method, "")
            if revoked is None:
                return handler
            return with_identity(handler, "", revoked, self._note(method))
        creds = read_credentials(handler_call_details.invocation_metadata)
        if isinstance(creds, str):
            return self._deny(
                handler, method, "", creds, "send each credential header once", self._note(method)
            )
        if method.startswith("/xeno.fl.v1.Federation/"):
            device = creds.device_id
            if not device or not creds.token:
                return self._deny(
                    handler,
                    method,
                    device,
                    "missing device id or bearer token",
                    note=self._note(method),
                )
            if not self._authenticate_device(device, creds.token):
                return self._deny(
                    handler,
                    method,
                    device,
                    "unknown device or wrong token (or it expired)",
                    note=self._note(method),
                )
            return with_identity(
                handler,
                device,
                _then(
                    self._revocation_check(method, device),
                    self._device_certificate_check(method, device),
                ),
                self._note(method),
            )
        if method.startswith("/xeno.fl.v1.Admin/"):
            return self._admin(handler, method, creds.token)
        return handler

    def _device_certificate_check(self, method: str, device: str) -> CallCheck | None:
        bound_name = self._device_cert_name
        if bound_name is None:
            return None

        def check(context: Any) -> Refusal | None:
            peer = peer_identity(context)
            expected = bound_name(device)
            if peer is None or peer.kind is not CertKind.DEVICE or peer.name != expected:
                why = (
                    "the client certificate is not the device certificate this device "
                    "registered with"
                )
                _audit_unauthenticated(method, device, why)
                return Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{why}; connect with its own certificate, or register again "
                    "(xeno-fl client --reset)",
                )
            return None

        return check

    def _admin(self, handler: Any, method: str, token: str) -> Any:
        by_token = None
        for known, principal in self._admin_tokens.items():
            if token and hmac.compare_digest(token.encode(), known.encode()):
                by_token = principal
        if by_token is None and token:
            return self._deny(
                handler,
                method,
                "",
                "admin token wrong",
                "check --admin-token-file",
                self._note(method),
            )
        if not self._admin_tokens and not self.mtls:
            # Development on loopback: no admin credential configured, the API is open.
            local = Principal("local", Role.ADMIN)
            return with_identity(
                handler, "", lambda _ctx: authorize(local, method), self._note(method)
            )

        def check(context: Any) -> Refusal | Principal:
            principal = by_token
            if principal is None:
                peer = peer_identity(context) if self.mtls else None
                if peer is not None and peer.kind is CertKind.ADMIN and peer.role is not None:
                    principal = Principal(peer.name, peer.role)
            if principal is None:
                why = "admin credential missing"
                _audit_unauthenticated(method, "", why)
                return Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{why}; pass --token-file (an admin token) or, with mTLS, an admin "
                    "certificate (xeno-fl admin certs issue DIR --admin NAME --role ROLE)",
                )
            return authorize(principal, method)

        return with_identity(
            handler, "", _then(self._revocation_check(method, ""), check), self._note(method)
        )

    def _revocation_check(self, method: str, device: str) -> CallCheck | None:
        revocations = self._revocations
        if revocations is None or not self.mtls:
            return None

        def check(context: Any) -> Refusal | None:
            peer = peer_identity(context)
            revoked = revocations.revoked(peer) if peer is not None else None
            if peer is None or revoked is None:
                return None
            named = f"{peer.kind.value} {peer.name}, " if peer.kind is not None else ""
            why = f"the client certificate ({named}serial {peer.serial}) was revoked" + (
                f": {revoked.reason}" if revoked.reason else ""
            )
            _audit_unauthenticated(method, device, why)
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{why}; ask the operator for a new certificate (`xeno-fl admin certs issue "
                "DIR --device NAME` or `--admin NAME --role ROLE`)",
            )

        return check

    def _note(self, method: str) -> NoteRefusal | None:
        """Counts this method's refusals for the audit log (server/refusals.py)."""
        log = self._refusals
        if log is None:
            return None
        admin_rpc = method.startswith("/xeno.fl.v1.Admin/")

        def note(code: grpc.StatusCode, actor: str, context: Any, message: str) -> None:
            cls = _REFUSAL_CLASSES.get(code)
            if cls is None or (cls == refused.INVALID_ARGUMENT and not admin_rpc):
                return
            if not actor:
                actor = f"peer {peer_host(str(context.peer()))}"
            log.note(cls, actor, method, message)

        return note

    @staticmethod
    def _deny(
        handler: Any,
        method: str,
        device: str,
        why: str,
        hint: str = "register again (xeno-fl client --reset) if the credentials were lost",
        note: NoteRefusal | None = None,
    ) -> Any:
        _audit_unauthenticated(method, device, why)
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, f"{why}; {hint}", note)


_REFUSAL_CLASSES = {
    grpc.StatusCode.UNAUTHENTICATED: refused.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: refused.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: refused.RATE_LIMITED,
    grpc.StatusCode.INVALID_ARGUMENT: refused.INVALID_ARGUMENT,
}


def _then(first: CallCheck | None, second: CallCheck | None) -> CallCheck | None:
    """A check that runs first, then (unless first refused) second."""
    if first is None or second is None:
        return first or second

    def both(context: Any) -> Refusal | Principal | None:
        verdict = first(context)
        return verdict if isinstance(verdict, Refusal) else second(context)

    return both


def authorize(principal: Principal, method: str) -> Refusal | Principal:
    """The principal when its role may call method, else PERMISSION_DENIED."""
    needed = required_role(method)
    if needed is not None and principal.role.allows(needed):
        return principal
    rpc = method.rsplit("/", 1)[-1]
    why = (
        f"{rpc} needs the role {needed.value}; {principal.name} has {principal.role.value}"
        if needed is not None
        else f"{rpc} has no role entry (server.security.ADMIN_RPC_ROLES): refused to all"
    )
    audit.warning(
        "refused %s to admin %s (%s): PERMISSION_DENIED %s",
        method,
        principal.name,
        principal.role.value,
        why,
        extra={"status": "PERMISSION_DENIED"},
    )
    return Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        why,
        f"admin {principal.name} ({principal.role.value})",
    )


def _audit_unauthenticated(method: str, device: str, why: str) -> None:
    audit.warning(
        "refused %s from device %s: UNAUTHENTICATED %s",
        method,
        device or "-",
        why,
        extra={"device_id": device or None, "status": "UNAUTHENTICATED"},
    )
