"""Device enrollment and authentication.

A device registers once and receives an id plus a random bearer token;
the store keeps only the token's SHA-256, and checks compare digests in
constant time. Tokens are never logged. A device may enroll an Ed25519
identity key, with which it signs its secure-aggregation round keys.

Tokens expire `token_ttl_s` after their last use (0: never); a use renews
them, and the renewal is written to the store only once half the lifetime
has passed, so a device checking in every few seconds costs no writes. A
device that registers again with the same identity key gets a new id and
token, and its old token is revoked in the same transaction. With mTLS the
common name of the device certificate it registered over is bound to the id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.errors import ErrorKind, FederationError
from server.store import Store

log = logging.getLogger("xeno.server.registry")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Device:
    digest: str
    identity: bytes | None
    cert_name: str | None
    expires: float | None  # unix seconds; None: never
    revoked: bool
    index: int | None = None


class DeviceRegistry:
    """Registered devices, their token digests and identity keys (cached in memory)."""

    def __init__(
        self,
        store: Store,
        enrollment_key: str = "",
        token_ttl_s: float = 0.0,
    ) -> None:
        self._store = store
        self._enrollment_key = enrollment_key
        self._ttl = token_ttl_s
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {
            r.device_id: _Device(
                r.token_sha256,
                r.identity_public_key,
                r.cert_name,
                r.token_expires_at.timestamp() if r.token_expires_at else None,
                r.revoked_at is not None,
                r.enrollment_index,
            )
            for r in store.device_records()
        }
        self._count = len(self._devices)
        # Renewals are written off the event loop that authenticates calls.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="token-renewal")

    def register(
        self,
        enrollment_key: str,
        labels: dict[str, str],
        identity_public_key: bytes = b"",
        cert_name: str | None = None,
    ) -> tuple[str, str, int]:
        if self._enrollment_key and not hmac.compare_digest(
            enrollment_key.encode(), self._enrollment_key.encode()
        ):
            raise FederationError(
                ErrorKind.PERMISSION_DENIED,
                "wrong enrollment key; ask the operator for the server's enrollment key",
            )
        if len(labels) > 32 or any(len(k) > 64 or len(v) > 256 for k, v in labels.items()):
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "too many or too long labels")
        if identity_public_key:
            try:
                Ed25519PublicKey.from_public_bytes(identity_public_key)
            except ValueError:
                raise FederationError(
                    ErrorKind.INVALID_ARGUMENT, "identity_public_key must be a raw Ed25519 key"
                ) from None
        device_id = "dev-" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        digest = token_digest(token)
        identity = identity_public_key or None
        expires = time.time() + self._ttl if self._ttl > 0 else None
        with self._lock:
            # The same device (its identity key) registering again: its old tokens die.
            old = tuple(
                d
                for d, e in self._devices.items()
                if identity is not None and e.identity == identity and not e.revoked
            )
            index = self._free_index(old)
            self._store.add_device(
                device_id,
                digest,
                dict(labels),
                identity,
                cert_name=cert_name,
                token_expires_at=datetime.fromtimestamp(expires, UTC) if expires else None,
                revoke=old,
                enrollment_index=index,
            )
            for d in old:
                self._devices[d].revoked = True
            self._devices[device_id] = _Device(digest, identity, cert_name, expires, False, index)
            self._count += 1
        if old:
            log.info("device re-registered as %s; revoked %s", device_id, ", ".join(old))
        return device_id, token, index

    def _free_index(self, replaced: tuple[str, ...]) -> int:
        """The index of a registering device; call under _lock.

        A device registering again keeps the one it held; a new one gets the smallest
        that no live device holds (so a forgotten device's index is handed out again).
        """
        own = [self._devices[d].index for d in replaced if self._devices[d].index is not None]
        if own:
            return min(i for i in own if i is not None)
        taken = {e.index for e in self._devices.values() if not e.revoked}
        return next(i for i in range(len(taken) + 1) if i not in taken)

    def authenticate(self, device_id: str, token: str) -> bool:
        with self._lock:
            entry = self._devices.get(device_id)
            if entry is None or entry.revoked:
                return False
            if not hmac.compare_digest(entry.digest, token_digest(token)):
                return False
            if entry.expires is None:
                return True
            now = time.time()
            if now >= entry.expires:
                return False
            renew = entry.expires - now < self._ttl / 2
            if renew:
                entry.expires = now + self._ttl
                expires = entry.expires
        if renew:
            self._writer.submit(self._persist_renewal, device_id, expires)
        return True

    def _persist_renewal(self, device_id: str, expires: float) -> None:
        try:
            self._store.renew_token(device_id, datetime.fromtimestamp(expires, UTC))
        except Exception:  # the in-memory renewal holds; a restart may expire it early
            log.warning("could not store the renewed token expiry of %s", device_id)

    def identity_key(self, device_id: str) -> bytes | None:
        with self._lock:
            entry = self._devices.get(device_id)
        return None if entry is None else entry.identity

    def cert_name(self, device_id: str) -> str | None:
        with self._lock:
            entry = self._devices.get(device_id)
        return None if entry is None else entry.cert_name

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def forget(self, device_id: str) -> tuple[int, int]:
        """Erase the device in the store and here: its token stops working at once."""
        with self._lock:
            counts = self._store.forget_device(device_id)
            self._devices.pop(device_id, None)
        return counts

    def __len__(self) -> int:
        return self._count
