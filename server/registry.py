"""Device enrollment and authentication.

A device registers once and receives an id plus a random bearer token;
the store keeps only the token's SHA-256, and checks compare digests in
constant time. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from server.errors import ErrorKind, FederationError
from server.store import Store


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DeviceRegistry:
    """Registered devices and their token digests (cached in memory)."""

    def __init__(self, store: Store, enrollment_key: str = "") -> None:
        self._store = store
        self._enrollment_key = enrollment_key
        self._lock = threading.Lock()
        self._digests = store.device_token_hashes()

    def register(self, enrollment_key: str, labels: dict[str, str]) -> tuple[str, str]:
        if self._enrollment_key and not hmac.compare_digest(
            enrollment_key.encode(), self._enrollment_key.encode()
        ):
            raise FederationError(
                ErrorKind.PERMISSION_DENIED,
                "wrong enrollment key; ask the operator for the server's enrollment key",
            )
        if len(labels) > 32 or any(len(k) > 64 or len(v) > 256 for k, v in labels.items()):
            raise FederationError(ErrorKind.INVALID_ARGUMENT, "too many or too long labels")
        device_id = "dev-" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        digest = token_digest(token)
        self._store.add_device(device_id, digest, dict(labels))
        with self._lock:
            self._digests[device_id] = digest
        return device_id, token

    def authenticate(self, device_id: str, token: str) -> bool:
        with self._lock:
            expected = self._digests.get(device_id)
        return expected is not None and hmac.compare_digest(expected, token_digest(token))

    def __len__(self) -> int:
        return len(self._digests)
