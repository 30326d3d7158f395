"""The seed's personalization API (`src.ai.model_finetuning` there), as a thin facade.

    from xeno.model_finetuning import PersonalizationEngine, CustomModelTrainer, ContextualMemory

Each class takes only `user_id`: the user's encrypted store lives under
`$XENO_HOME` (default `./data`) and its key comes from the device key
(`XENO_DEVICE_KEY`, a key file, the OS keyring, or a key file created on
first use); see `client.assistant.keys`. The logic lives in
`client/assistant/` (no Qt, no gRPC); this module adds what needs the
application layer: GDPR export and deletion across the user's store and the
device's privacy ledgers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from client.assistant.consent import Scope, consent_history
from client.assistant.intents import MiniBatch
from client.assistant.keys import UserPaths, atomic_write, validate_user_id, xeno_home
from client.assistant.memory import ContextualMemory
from client.assistant.personalization import PersonalizationEngine
from client.assistant.store import UserStore, delete_user_store
from client.assistant.templates import ResponseTemplates
from client.assistant.trainer import CustomModelTrainer

__all__ = [
    "ContextualMemory",
    "CustomModelTrainer",
    "MiniBatch",
    "PersonalizationEngine",
    "ResponseTemplates",
    "Scope",
    "delete_user_data",
    "export_user_data",
]

EXPORT_FORMAT = "xeno-user-export"
EXPORT_VERSION = 1


def _device_state_dir(home: str | Path | None) -> Path:
    return Path(os.environ.get("XENO_STATE_DIR") or Path(home or xeno_home()) / "device")


def _privacy_ledger(state_dir: Path) -> list[dict[str, Any]]:
    """The device's privacy ledger entries (what its data has spent), or [] if it has none."""
    from dataclasses import asdict

    from client.ledger import PrivacyLedger
    from client.storage import LocalStore
    from common.atrest import Sealer, load_key

    if not (state_dir / PrivacyLedger.FILE).exists():
        return []
    key = load_key(os.environ.get("XENO_DEVICE_KEY_FILE", ""), "XENO_DEVICE_KEY")
    return [asdict(e) for e in PrivacyLedger(LocalStore(state_dir, Sealer(key))).entries]


def export_user_data(
    user_id: str,
    path: str | Path | None = None,
    device_state_dir: str | Path | None = None,
    home: str | Path | None = None,
) -> dict[str, Any]:
    """One machine-readable archive of everything kept for the user (GDPR art. 15 and 20).

    Preferences, interactions, memory (facts with history, episodes,
    workflows), training examples, personal model versions (weights as hex
    `.npz`), response templates, consent records and the device's privacy
    ledger. Written to `path` as JSON (0600, atomically) when given.
    """
    paths = UserPaths(Path(home) if home is not None else xeno_home(), validate_user_id(user_id))
    if not paths.database.exists() and not paths.wrapped_key.exists():
        # Opening would create an empty store (and a key) for someone we know nothing of.
        raise ValueError(f"no data is kept for user {user_id!r} under {paths.home}")
    with UserStore(user_id, home=home) as store:
        archive: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "user_id": store.user_id,
            "exported_at": time.time(),
            "store": store.export(),
            "consent": consent_history(store),
        }
    state = Path(device_state_dir) if device_state_dir is not None else _device_state_dir(home)
    archive["privacy_ledger"] = _privacy_ledger(state)
    if path is not None:
        atomic_write(Path(path), json.dumps(archive, indent=1, ensure_ascii=False).encode())
    return archive


def forget_on_server(server: str, state_dir: str | Path) -> dict[str, Any]:
    """Ask the server to erase this device's records (Federation.Forget); then forget it here.

    Uses the device's saved credentials for `server`; without any, there is
    nothing on that server to erase. On success the device's credentials and
    identity key are removed, so it would register anew.
    """
    import grpc

    from client.storage import IdentityStore, LocalStore
    from common.atrest import Sealer, load_key
    from common.pb import federation_pb2 as pb
    from common.pb import federation_pb2_grpc

    key = load_key(os.environ.get("XENO_DEVICE_KEY_FILE", ""), "XENO_DEVICE_KEY")
    local = LocalStore(state_dir, Sealer(key))
    creds = local.load_credentials(server)
    if creds is None:
        return {"server": server, "registered": False}
    metadata = (("x-xeno-device-id", creds.device_id), ("authorization", f"Bearer {creds.token}"))
    with grpc.insecure_channel(server) as channel:
        try:
            resp = federation_pb2_grpc.FederationStub(channel).Forget(
                pb.ForgetRequest(), metadata=metadata, timeout=30
            )
        except grpc.RpcError as err:
            return {
                "server": server,
                "registered": True,
                "error": f"{err.code().name}: {err.details()}",
            }
    local.clear_credentials()
    IdentityStore(local).clear()
    return {
        "server": server,
        "registered": True,
        "device_id": creds.device_id,
        "participations_deleted": resp.participations_deleted,
        "ab_results_deleted": resp.ab_results_deleted,
    }


def delete_user_data(
    user_id: str,
    home: str | Path | None = None,
    server: str | None = None,
    device_state_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Erase the user's data (GDPR art. 17): on the server when given, then on the device.

    With `server`, the device first asks it to erase the device's records
    (`forget_on_server`; its outcome, error included, is under "server": a
    failed request does not stop the local erasure, and can be retried while
    the device still holds its credentials). Then the user's store is
    crypto-shredded: its key is overwritten and removed first, then the
    database files, so a copy of the database that survives elsewhere (a
    backup) can no longer be decrypted.
    """
    user_id = validate_user_id(user_id)
    out: dict[str, Any] = {"user_id": user_id}
    if server is not None:
        state = Path(device_state_dir) if device_state_dir is not None else _device_state_dir(home)
        out["server"] = forget_on_server(server, state)
    out["store_deleted"] = delete_user_store(user_id, home)
    return out
