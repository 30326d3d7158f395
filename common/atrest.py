"""Encryption at rest: AES-256-GCM with a 32-byte data key from an env var or a key file.

Sealed data is MAGIC || nonce (12 bytes) || ciphertext || tag; the caller's
context (a blob's SHA-256 address, a file's name) is bound as associated
data, so a sealed value moved to another place does not open. A missing,
malformed or wrong key is a clear DataKeyError, never silent garbage.
"""

from __future__ import annotations

import binascii
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"XFL-AEAD1\x00"
NONCE_BYTES = 12
KEY_BYTES = 32


class DataKeyError(RuntimeError):
    """The data key is missing, malformed, or does not open the stored data."""


class SecretFileError(ValueError):
    """A secret file (key, token, certificate key) is missing, empty, or others may read it."""


def check_private_file(path: str | Path, what: str) -> None:
    """Refuse a secret file that others than its owner may read, saying the chmod to run."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )


def read_secret(value: str, path: str, what: str) -> str:
    """The secret from its file (owner-only), else the value given; '' when neither."""
    if not path:
        return value.strip()
    try:
        check_private_file(path, what)
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} does not exist") from None
    if not text:
        raise SecretFileError(f"{what} {path} is empty")
    return text


def resolve_key(
    key_file: str, default_path: str | Path, env_var: str, log: logging.Logger, what: str
) -> bytes:
    """The key: the env var, the configured file, or the file at default_path.

    The default file is created (owner-only) on first start, with a log line saying
    where and that it must be backed up. A key file others may read is refused.
    """
    if os.environ.get(env_var):
        return load_key("", env_var)
    path = Path(key_file or default_path)
    if not key_file and not path.exists():
        write_new_key(path)
        log.warning(
            "created the %s %s (owner-only): back it up, what is sealed with it cannot be "
            "read without it",
            what,
            path.resolve(),
        )
    if path.exists():
        check_private_file(path, f"{what} file")
    return load_key(str(path), env_var)


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
