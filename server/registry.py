"""Device enrollment and authentication.

A device registers once and receives an id plus a random bearer token;
the store keeps only the token's SHA-256, and checks compare digests in
constant time. Tokens are never logged. A device may enroll an Ed25519
identity key, with which it signs its secure-aggregation round keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.errors import ErrorKind, FederationError
from server.store import Store


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DeviceRegistry:
    """Registered devices, their token digests and identity keys (cached in memory)."""

    def __init__(self, store: Store, enrollment_key: str = "") -> None:
        self._store = store
        self._enrollment_key = enrollment_key
        self._lock = threading.Lock()
        self._devices = store.device_credentials()

    def register(
        self, enrollment_key: str, labels: dict[str, str], identity_public_key: bytes = b""
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
        with self._lock:
            self._store.add_device(device_id, digest, dict(labels), identity)
            self._devices[device_id] = (digest, identity)
            index = len(self._devices) - 1
        return device_id, token, index

    def authenticate(self, device_id: str, token: str) -> bool:
        with self._lock:
            entry = self._devices.get(device_id)
        return entry is not None and hmac.compare_digest(entry[0], token_digest(token))

    def identity_key(self, device_id: str) -> bytes | None:
        with self._lock:
            entry = self._devices.get(device_id)
        return None if entry is None else entry[1]

    def forget(self, device_id: str) -> tuple[int, int]:
        """Erase the device in the store and here: its token stops working at once."""
        with self._lock:
            counts = self._store.forget_device(device_id)
            self._devices.pop(device_id, None)
        return counts

    def __len__(self) -> int:
        return len(self._devices)
