"""Where the assistant keeps a user's data, and the keys that open it.

Two levels of keys, so that one user's data can be destroyed alone
(crypto-shredding) while the device has one secret to protect:

- The device key (key-encryption key, 32 bytes) comes, in this order, from
  the environment variable `XENO_DEVICE_KEY` (64 hex characters), from a key
  file (`XENO_DEVICE_KEY_FILE`, default `$XENO_HOME/device.key`) when it
  exists, from the OS keyring through `keyring` when a real backend is
  available, or else it is created on first use as that key file (mode 0600),
  with a warning saying where: a key on the same disk as the data protects a
  copied store folder, not a stolen disk.
- Each user's store key (32 random bytes) is sealed under the device key with
  AES-256-GCM, the user id bound as associated data, in
  `$XENO_HOME/users/<user_id>/store.key`. Deleting that file destroys the
  user's data even where a copy of the encrypted database survives.

`XENO_HOME` defaults to `./data`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from common.atrest import KEY_BYTES, DataKeyError, Sealer, parse_key

__all__ = [
    "HOME_ENV",
    "KEYRING_SERVICE",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "DeviceKey",
    "KeyCreatedWarning",
    "StoreError",
    "StoreKeyError",
    "UserPaths",
    "atomic_write",
    "load_device_key",
    "validate_user_id",
    "xeno_home",
]

log = logging.getLogger("xeno.assistant")

HOME_ENV = "XENO_HOME"
KEY_ENV = "XENO_DEVICE_KEY"
KEY_FILE_ENV = "XENO_DEVICE_KEY_FILE"
KEYRING_SERVICE = "xeno-assistant"
KEYRING_USER = "device-key"
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")


class StoreError(RuntimeError):
    """The user's store cannot be used as asked; nothing stored was changed."""


class StoreKeyError(StoreError):
    """A key needed to open a user's store is missing or wrong; nothing was changed."""


class KeyCreatedWarning(UserWarning):
    """A new device key was written to disk because no other source had one."""


def xeno_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "./data")


def validate_user_id(user_id: object) -> str:
    """The user id, if it is a safe single path component; ValueError naming the rule otherwise."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise ValueError(
            f"user_id {user_id!r} is not valid: 1-128 characters, letters, digits and _ . @ + -,"
            " starting with a letter or digit"
        )
    return user_id


@dataclass(frozen=True)
class UserPaths:
    home: Path
    user_id: str

    @property
    def dir(self) -> Path:
        return self.home / "users" / self.user_id

    @property
    def database(self) -> Path:
        return self.dir / "assistant.db"

    @property
    def wrapped_key(self) -> Path:
        return self.dir / "store.key"

    def database_files(self) -> list[Path]:
        db = self.database
        return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


@dataclass(frozen=True)
class DeviceKey:
    key: bytes
    source: str  # "env", "file:<path>", "keyring", "created:<path>"


def _keyring_usable() -> object | None:
    """The keyring module when a real (not fail/null) backend is available, else None."""
    try:
        import keyring
        from keyring.backends import fail, null
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # a broken backend configuration means: no keyring
        return None
    if isinstance(backend, fail.Keyring | null.Keyring) or backend.priority <= 0:
        return None
    return keyring


def load_device_key(home: Path | None = None) -> DeviceKey:
    """The device key from the environment, the key file, the OS keyring, or a new key file."""
    home = xeno_home() if home is None else home
    value = os.environ.get(KEY_ENV, "")
    if value:
        return DeviceKey(parse_key(value), "env")
    key_file = Path(os.environ.get(KEY_FILE_ENV) or home / "device.key")
    if key_file.exists():
        try:
            return DeviceKey(parse_key(key_file.read_text()), f"file:{key_file}")
        except DataKeyError as exc:
            raise StoreKeyError(f"device key file {key_file}: {exc}") from None
    ring = _keyring_usable()
    if ring is not None:
        try:
            stored = ring.get_password(KEYRING_SERVICE, KEYRING_USER)  # type: ignore[attr-defined]
            if stored is None:
                stored = secrets.token_hex(KEY_BYTES)
                ring.set_password(KEYRING_SERVICE, KEYRING_USER, stored)  # type: ignore[attr-defined]
            return DeviceKey(parse_key(stored), "keyring")
        except DataKeyError as exc:
            raise StoreKeyError(f"the OS keyring's xeno device key: {exc}") from None
        except Exception as exc:  # the keyring refused (locked, no session bus): use a file
            log.warning("OS keyring unavailable (%s); using a key file", type(exc).__name__)
    key = secrets.token_bytes(KEY_BYTES)
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return DeviceKey(parse_key(key_file.read_text()), f"file:{key_file}")
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    message = (
        f"no device key in {KEY_ENV}, in a key file or in an OS keyring: created {key_file} "
        "(mode 0600). Anyone who can read it can read the assistant's data; keep it off "
        f"backups of {home} or set {KEY_ENV}."
    )
    warnings.warn(message, KeyCreatedWarning, stacklevel=3)
    return DeviceKey(key, f"created:{key_file}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path atomically (temp file, fsync, rename, fsync of the folder), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _context(user_id: str) -> bytes:
    return b"xeno-assistant-store-key|" + user_id.encode()


def unwrap_user_key(paths: UserPaths, device: DeviceKey) -> bytes:
    sealed = paths.wrapped_key.read_bytes()
    try:
        key = Sealer(device.key).open(sealed, _context(paths.user_id))
    except DataKeyError:
        raise StoreKeyError(
            f"the device key ({device.source}) does not open {paths.wrapped_key}: wrong "
            f"{KEY_ENV} / key file / keyring entry, or the key file was tampered with. "
            "Nothing was changed."
        ) from None
    if len(key) != KEY_BYTES:
        raise StoreKeyError(f"{paths.wrapped_key} holds no valid store key")
    return key


def create_user_key(paths: UserPaths, device: DeviceKey) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    atomic_write(paths.wrapped_key, Sealer(device.key).seal(key, _context(paths.user_id)))
    return key


def shred_user_key(paths: UserPaths) -> None:
    """Overwrite the sealed store key with random bytes, sync, and remove it."""
    path = paths.wrapped_key
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(secrets.token_bytes(size))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
