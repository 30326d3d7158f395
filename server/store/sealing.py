"""Records under the server's data key: version MACs and sealed per-device rows.

`RecordSealer` hooks into every session of a `Store` that has a data key:

* before each flush, every new or changed `model_versions` row gets
  `mac = KEYID:HMAC` over what a reader relies on (its blob address, optimizer
  state, metrics, lineage), and every `round_participants` row has what it says
  about a person (example count, local metrics, decline note) sealed into
  `sealed` with the plaintext columns left empty;
* when a row of either is loaded, the MAC is checked (a mismatch is a
  `RecordTamperedError` naming the row) and the sealed fields are opened.

The hooks are ORM events, so every module that writes versions through a
`Store` session (the coordinator, the lifecycle, an embedding app) is covered
without calling anything. A write that bypasses the ORM (raw SQL) is exactly
what the MAC detects.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, attributes

from common.atrest import DataKeyError, Sealer
from server.store.models import ModelVersionRow, RoundParticipantRow

SESSION_KEY = "xeno_record_sealer"


class RecordTamperedError(DataKeyError):
    """A stored record fails its MAC, or is unsealed although a data key is configured."""


def version_message(row: ModelVersionRow) -> bytes:
    """The canonical bytes a version's MAC covers."""
    body = [
        "xeno-fl model version v1",
        row.model_id,
        row.version,
        row.parent_version,
        row.blob_sha256,
        row.optimizer_state_sha256,
        row.optimizer_state,
        row.metrics or {},
        row.round_id,
        row.rollback_of,
    ]
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def participant_context(round_id: str, device_id: str) -> bytes:
    return f"round_participants:{round_id}:{device_id}".encode()


class KeylessRecords:
    """A store without a data key: sealed rows are refused, never read as their empty columns."""

    def loaded(self, obj: object) -> None:
        if isinstance(obj, RoundParticipantRow) and obj.sealed is not None:
            raise DataKeyError(
                "per-device rows of this database are sealed: give the server's data key "
                "(XENO_DATA_KEY, or its key file: --data-key-file / XENO_DATA_KEY_FILE)"
            )


class RecordSealer:
    """The hooks of one store's sessions (see the module docstring)."""

    def __init__(self, sealer: Sealer, allow_unauthenticated: bool = False) -> None:
        self.sealer = sealer
        # Only for a key rotation: rows written before migration 0009 get their MAC / seal.
        self.allow_unauthenticated = allow_unauthenticated

    def before_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        restore: list[tuple[RoundParticipantRow, dict[str, Any]]] = []
        for obj in list(session.new) + list(session.dirty):
            if isinstance(obj, ModelVersionRow):
                obj.mac = self.sealer.mac(version_message(obj))
            elif isinstance(obj, RoundParticipantRow):
                fields = {
                    "num_examples": int(obj.num_examples or 0),
                    "metrics": dict(obj.metrics or {}),
                    "note": obj.note or "",
                }
                payload = json.dumps(fields, sort_keys=True).encode()
                obj.sealed = self.sealer.seal(
                    payload, participant_context(obj.round_id, obj.device_id)
                )
                obj.num_examples, obj.metrics, obj.note = 0, {}, ""
                restore.append((obj, fields))
        if restore:
            session.info.setdefault("xeno_restore", []).extend(restore)

    @staticmethod
    def after_flush(session: Session, _context: Any) -> None:
        # The objects keep their real values in memory; only the database holds blanks.
        for obj, fields in session.info.pop("xeno_restore", []):
            for key, value in fields.items():
                attributes.set_committed_value(obj, key, value)

    def loaded(self, obj: object) -> None:
        if isinstance(obj, ModelVersionRow):
            self._check_version(obj)
        elif isinstance(obj, RoundParticipantRow):
            self._open_participant(obj)

    def _check_version(self, row: ModelVersionRow) -> None:
        where = f"version {row.version} of model id {row.model_id}"
        if row.mac is None:
            if self.allow_unauthenticated:
                return
            raise RecordTamperedError(
                f"{where} has no MAC although a data key is configured: it was written "
                "before migration 0009 (run `xeno-fl admin rotate-key` once to authenticate "
                "older rows) or inserted behind the server's back"
            )
        if not self.sealer.check_mac(version_message(row), row.mac):
            kid = row.mac.partition(":")[0]
            if kid not in self.sealer.key_ids:
                raise DataKeyError(
                    f"{where} is authenticated under data key id {kid}, but the configured "
                    f"key is id {self.sealer.key_id}: give the key it was written with"
                )
            raise RecordTamperedError(
                f"{where} fails its MAC: its weights (blob), optimizer state or metrics were "
                "changed in the database behind the server's back; restore the database from "
                "a backup (`xeno-fl admin audit verify` checks the audit log too)"
            )

    def _open_participant(self, row: RoundParticipantRow) -> None:
        if row.sealed is None:
            if self.allow_unauthenticated:
                return
            raise RecordTamperedError(
                f"participant row of device {row.device_id} in round {row.round_id} is stored "
                "unsealed although a data key is configured: it was written before migration "
                "0009 (run `xeno-fl admin rotate-key` once to seal older rows) or behind the "
                "server's back"
            )
        fields = json.loads(
            self.sealer.open(bytes(row.sealed), participant_context(row.round_id, row.device_id))
        )
        attributes.set_committed_value(row, "num_examples", int(fields["num_examples"]))
        attributes.set_committed_value(row, "metrics", dict(fields["metrics"]))
        attributes.set_committed_value(row, "note", str(fields["note"]))


def install(session_factory: Any, records: RecordSealer | KeylessRecords) -> None:
    """Hook records into every session the factory makes."""
    session_factory.kw.setdefault("info", {})[SESSION_KEY] = records
    if isinstance(records, KeylessRecords):
        return
    event.listen(session_factory, "before_flush", records.before_flush)
    event.listen(session_factory, "after_flush", records.after_flush)


def _on_load(target: object, context: Any) -> None:
    session = getattr(context, "session", None)
    records = session.info.get(SESSION_KEY) if session is not None else None
    if records is not None:
        records.loaded(target)


event.listen(ModelVersionRow, "load", _on_load)
event.listen(RoundParticipantRow, "load", _on_load)
event.listen(ModelVersionRow, "refresh", lambda target, context, _attrs: _on_load(target, context))
event.listen(
    RoundParticipantRow, "refresh", lambda target, context, _attrs: _on_load(target, context)
)
