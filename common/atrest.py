"""Encryption at rest: AES-256-GCM with a 32-byte data key from an env var or a key file.

Sealed data is MAGIC || nonce (12 bytes) || ciphertext || tag; the caller's
context (a blob's SHA-256 address, a file's name) is bound as associated
data, so a sealed value moved to another place does not open. A missing,
malformed or wrong key is a clear DataKeyError, never silent garbage.
"""

from __future__ import annotations

import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"XFL-AEAD1\x00"
NONCE_BYTES = 12
KEY_BYTES = 32


class DataKeyError(RuntimeError):
    """The data key is missing, malformed, or does not open the stored data."""


def parse_key(text: str) -> bytes:
    """A 32-byte key written as 64 hexadecimal characters."""
    try:
        key = binascii.unhexlify(text.strip())
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise DataKeyError(
            "a data key is 64 hexadecimal characters (32 bytes); "
            "generate one with `xeno-fl admin keygen PATH`"
        )
    return key


def load_key(key_file: str, env_var: str) -> bytes:
    """The key from the environment variable, else from key_file; DataKeyError if neither."""
    value = os.environ.get(env_var, "")
    if value:
        return parse_key(value)
    if key_file:
        try:
            return parse_key(Path(key_file).read_text())
        except FileNotFoundError:
            raise DataKeyError(
                f"data key file {key_file} does not exist; create it with "
                f"`xeno-fl admin keygen {key_file}`"
            ) from None
    raise DataKeyError(
        f"no data key: set {env_var} (64 hex characters) or give a key file; "
        "generate one with `xeno-fl admin keygen PATH`"
    )


def write_new_key(path: str | Path) -> None:
    """Create a key file (owner-only) unless it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise DataKeyError("a data key is 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        if not is_sealed(sealed):
            raise DataKeyError("the stored value is not sealed with a data key")
        body = sealed[len(MAGIC) :]
        try:
            return self._aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], context)
        except InvalidTag:
            raise DataKeyError(
                "stored data does not open with this data key: the key is wrong, or the data "
                "was tampered with"
            ) from None


def is_sealed(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC
