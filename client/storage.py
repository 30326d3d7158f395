"""The device's local store: credentials, identity key and pinned peers, kept across restarts.

Every file is sealed with AES-256-GCM under the device's data key (file name
bound as associated data) and written atomically (temp file + rename) with
owner-only permissions, so a device killed mid-write keeps its previous,
intact state, and a stolen state folder reveals nothing without the key.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from common.atrest import Sealer

MAX_ROUNDS_REMEMBERED = 10_000


@dataclass(frozen=True)
class Credentials:
    server: str
    device_id: str
    token: str
    enrollment_index: int = 0


class LocalStore:
    def __init__(self, state_dir: str | Path, sealer: Sealer) -> None:
        self.dir = Path(state_dir)
        self._sealer = sealer

    def remove_leftovers(self) -> list[str]:
        """Delete temporary files of writes that were killed midway; returns their names.

        Only the process that owns the store may call this (at start): another
        process's write in progress would lose its temporary file.
        """
        if not self.dir.is_dir():
            return []
        removed = []
        for leftover in self.dir.glob(".tmp-*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed.append(leftover.name)
        return removed

    def _read_bytes(self, path: Path) -> bytes:
        """Opened contents of path (FileNotFoundError if absent, DataKeyError if unopenable)."""
        return self._sealer.open(path.read_bytes(), path.name.encode())

    def _read_json(self, path: Path) -> Any:
        return json.loads(self._read_bytes(path))

    @property
    def credentials_path(self) -> Path:
        return self.dir / "credentials.json"

    def load_credentials(self, server: str) -> Credentials | None:
        """Saved credentials for this server, or None."""
        try:
            data = self._read_json(self.credentials_path)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(
                f"{self.credentials_path} is unreadable ({exc}); delete it or run with --reset"
            ) from exc
        if data.get("server") != server:
            return None
        return Credentials(
            data["server"], data["device_id"], data["token"], int(data.get("enrollment_index", 0))
        )

    def save_credentials(self, creds: Credentials) -> None:
        self._write_json(
            self.credentials_path,
            {
                "server": creds.server,
                "device_id": creds.device_id,
                "token": creds.token,
                "enrollment_index": creds.enrollment_index,
            },
        )

    def clear_credentials(self) -> None:
        self.credentials_path.unlink(missing_ok=True)

    def _write_json(self, path: Path, data: object) -> None:
        self._write_bytes(path, json.dumps(data).encode())

    def _write_bytes(self, path: Path, data: bytes) -> None:
        data = self._sealer.seal(data, path.name.encode())
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            # The rename itself must survive a power cut too: sync the directory entry.
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class IdentityStore:
    """The device's long-term Ed25519 identity key and the identity keys it has seen of peers.

    Peers' keys are pinned on first sight (trust on first use): if the server
    later presents another identity key for the same device, the device
    refuses the round instead of trusting substituted keys.
    """

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    @property
    def key_path(self) -> Path:
        return self._store.dir / "identity.key"

    @property
    def peers_path(self) -> Path:
        return self._store.dir / "peers.json"

    def load_or_create(self) -> Ed25519PrivateKey:
        try:
            raw = self._store._read_bytes(self.key_path)
        except FileNotFoundError:
            key = Ed25519PrivateKey.generate()
            raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            self._store._write_bytes(self.key_path, raw)
            return key
        return Ed25519PrivateKey.from_private_bytes(raw)

    def exists(self) -> bool:
        return self.key_path.exists()

    def pin(self, peers: dict[str, bytes]) -> list[str]:
        """Pin unseen peers; return the ids whose key differs from the pinned one."""
        try:
            pinned = self._store._read_json(self.peers_path)
        except FileNotFoundError:
            pinned = {}
        changed = [d for d, k in peers.items() if d in pinned and pinned[d] != k.hex()]
        new = {d: k.hex() for d, k in peers.items() if d not in pinned}
        if new and not changed:
            pinned.update(new)
            self._store._write_json(self.peers_path, pinned)
        return changed

    @property
    def rounds_path(self) -> Path:
        return self._store.dir / "secagg-rounds.json"

    def remember_round(self, round_id: str) -> bool:
        """Record that this device runs secure round `round_id`; False if it already did.

        A device never runs one round id twice (a replayed round could make it reveal
        shares of a second set of secrets under signatures bound to the first). The
        newest MAX_ROUNDS_REMEMBERED ids are kept.
        """
        try:
            seen: list[str] = self._store._read_json(self.rounds_path)
        except FileNotFoundError:
            seen = []
        if round_id in seen:
            return False
        seen = [*seen, round_id][-MAX_ROUNDS_REMEMBERED:]
        self._store._write_json(self.rounds_path, seen)
        return True

    def clear(self) -> None:
        # The rounds it ran stay remembered: a new identity must not rejoin them either.
        self.key_path.unlink(missing_ok=True)
        self.peers_path.unlink(missing_ok=True)
