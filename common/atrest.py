"""Encryption at rest: AES-256-GCM with a 32-byte data key from an env var or a key file.

Sealed data is MAGIC || key id (8 bytes) || nonce (12 bytes) || ciphertext || tag;
the caller's context (a blob's SHA-256 address, a file's name) is bound as
associated data, so a sealed value moved to another place does not open. The
key id names the key that sealed the value, so a key rotation knows what is
still to re-seal, and a value sealed under a key that is not configured says
so instead of "wrong key". Values of the first format (MAGIC1, no key id) are
still opened with the primary key. A missing, malformed or wrong key is a
clear DataKeyError, never silent garbage.

Each key also gives a MAC key, derived with HKDF-SHA256 under its own info
label (never the sealing key itself), for records that are stored in the
clear but must not be changed behind the server's back (a version's blob and
metrics), and a pseudonym key (own label too) for device ids in rows kept in
the clear (A/B results, whose values the database aggregates).
"""

from __future__ import annotations

import binascii
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC1 = b"XFL-AEAD1\x00"
MAGIC = b"XFL-AEAD2\x00"
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ID_BYTES = 8
# HKDF info labels: each derived key has its own, so no two uses share a key.
_KEY_ID_INFO = b"xeno-fl/v1 key id"
_MAC_INFO = b"xeno-fl/v1 record mac"
_PSEUDONYM_INFO = b"xeno-fl/v1 device pseudonym"


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


def _derive(key: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def key_id(key: bytes) -> str:
    """A key's public id (16 hex characters): derived from it, reveals nothing of it."""
    return _derive(key, _KEY_ID_INFO, KEY_ID_BYTES).hex()


class _Key:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise DataKeyError("a data key is 32 bytes")
        self.id = key_id(key)
        self.raw_id = bytes.fromhex(self.id)
        self.aead = AESGCM(key)
        self.mac_key = _derive(key, _MAC_INFO, 32)
        self.pseudonym_key = _derive(key, _PSEUDONYM_INFO, 32)


class Sealer:
    """Seals under the primary key; opens values sealed under it or any of `older`.

    `older` keys are only for a key rotation in progress (values not yet re-sealed).
    """

    def __init__(self, key: bytes, *older: bytes) -> None:
        self._primary = _Key(key)
        self._keys = {k.id: k for k in (_Key(o) for o in older)}
        self._keys[self._primary.id] = self._primary

    @property
    def key_id(self) -> str:
        return self._primary.id

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        head = MAGIC + self._primary.raw_id
        return head + nonce + self._primary.aead.encrypt(nonce, plaintext, head + context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        if sealed[: len(MAGIC1)] == MAGIC1:
            key, head, body = self._primary, b"", sealed[len(MAGIC1) :]
        elif sealed[: len(MAGIC)] == MAGIC:
            head = sealed[: len(MAGIC) + KEY_ID_BYTES]
            found = self._keys.get(head[len(MAGIC) :].hex())
            if found is None:
                raise DataKeyError(
                    f"stored data is sealed under data key id {head[len(MAGIC) :].hex()}, "
                    f"not the configured key (id {self.key_id}): the key is wrong; configure "
                    "the key it was sealed with (after a key rotation, the new key)"
                )
            key, body = found, sealed[len(head) :]
        else:
            raise DataKeyError("the stored value is not sealed with a data key")
        try:
            return key.aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], head + context)
        except InvalidTag:
            raise DataKeyError(
                "stored data does not open with this data key: the key is wrong, or the data "
                "was tampered with"
            ) from None

    def mac(self, message: bytes) -> str:
        """`KEYID:HEX`: HMAC-SHA256 of message under the primary key's MAC key."""
        return f"{self._primary.id}:{_hmac(self._primary.mac_key, message).hex()}"

    def pseudonym(self, name: str) -> str:
        """`KEYID:HEX`: HMAC-SHA256 of name under the primary key's pseudonym key.

        Stands for a device id in rows kept in the clear (A/B results): equal ids give
        equal pseudonyms, so the server can still find a device's rows, but nobody
        without the data key can link a row to a device.
        """
        return f"{self._primary.id}:{_hmac(self._primary.pseudonym_key, name.encode()).hex()}"

    def check_mac(self, message: bytes, tag: str) -> bool:
        """Whether tag (from `mac`, under any configured key) authenticates message."""
        kid, _, hexmac = tag.partition(":")
        key = self._keys.get(kid)
        if key is None:
            return False
        h = crypto_hmac.HMAC(key.mac_key, hashes.SHA256())
        h.update(message)
        try:
            h.verify(bytes.fromhex(hexmac))
        except Exception:
            return False
        return True


def _hmac(key: bytes, message: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


def sealed_key_id(data: bytes) -> str | None:
    """The id of the key a sealed value was sealed under; None for the first format."""
    if data[: len(MAGIC)] == MAGIC:
        return data[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()
    return None


def is_sealed(data: bytes) -> bool:
    return data[: len(MAGIC)] in (MAGIC, MAGIC1)
