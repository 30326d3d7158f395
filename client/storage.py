"""The device's local store: its credentials, kept across restarts.

Written atomically (temp file + rename) with owner-only permissions, so a
device killed mid-write keeps its previous, intact state.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    server: str
    device_id: str
    token: str


class LocalStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)

    @property
    def credentials_path(self) -> Path:
        return self.dir / "credentials.json"

    def load_credentials(self, server: str) -> Credentials | None:
        """Saved credentials for this server, or None."""
        try:
            data = json.loads(self.credentials_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(
                f"{self.credentials_path} is unreadable ({exc}); delete it or run with --reset"
            ) from exc
        if data.get("server") != server:
            return None
        return Credentials(data["server"], data["device_id"], data["token"])

    def save_credentials(self, creds: Credentials) -> None:
        self._write_json(
            self.credentials_path,
            {"server": creds.server, "device_id": creds.device_id, "token": creds.token},
        )

    def clear_credentials(self) -> None:
        self.credentials_path.unlink(missing_ok=True)

    def _write_json(self, path: Path, data: object) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
