"""Data key rotation: every sealed value and every version MAC moved to a new key, resumably.

Offline: it runs with the server stopped (it takes the database lock
exclusively, server/store/lock.py, and refuses while a server holds it), which
keeps it simple and honest: no reader ever sees a half-rotated database with
only one key. `data_keys.rotating_to` records the rotation before the first
row moves; until it is cleared, a server refuses to start and says to finish
the rotation. Each row carries the id of the key it is under (in the sealed
value, or before the MAC), so the work is idempotent per row: a rotation killed
at any point is finished by running the same command again, which skips the
rows already under the new key. Rows are moved in small transactions
(`batch`), each also counting `rows_done`.

The same pass authenticates rows written before migration 0009 (versions
without a MAC, participant rows in the clear) and pseudonymises A/B results
written before 0012 (device id in the clear): run it once after upgrading. A/B
results' device pseudonyms (an HMAC, common/atrest.py) carry their key id too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from common.atrest import DataKeyError, Sealer, is_sealed, sealed_key_id
from server.faults import crash_point
from server.store import Store, _head_revision, audit, utcnow
from server.store.lock import DatabaseInUseError, DatabaseLock
from server.store.models import (
    AbResultRow,
    BlobRow,
    DataKeyRow,
    DeviceRow,
    ModelVersionRow,
    RoundParticipantRow,
)

ACTOR = "admin rotate-key (offline)"


@dataclass(frozen=True)
class RotationReport:
    old_key_id: str
    new_key_id: str
    blobs: int
    versions: int
    participants: int
    resumed: bool
    already_done: bool = False
    ab_results: int = 0


def rotate(
    url: str,
    old_key: bytes,
    new_key: bytes,
    batch: int = 100,
    progress: Callable[[str, int], None] | None = None,
) -> RotationReport:
    """Re-seal and re-MAC everything in the database at url under new_key (see module doc)."""
    old, new = Sealer(old_key), Sealer(new_key)
    if old.key_id == new.key_id:
        raise ValueError("the new key is the current key; make one with `xeno-fl admin keygen F`")
    if batch < 1:
        raise ValueError("--batch must be at least 1")
    store = Store(url, Sealer(new_key, old_key), allow_unauthenticated=True)
    lock = DatabaseLock(store.engine)
    try:
        if not lock.acquire(exclusive=True):
            raise DatabaseInUseError(
                "a server (or another rotation) is using this database: stop the server, "
                "then run rotate-key again (rotation runs offline)"
            )
        if store._stored_revision() != _head_revision():
            store.migrate("head")
        resumed = _begin(store, old.key_id, new.key_id)
        if resumed is None:
            return RotationReport(old.key_id, new.key_id, 0, 0, 0, False, already_done=True)
        note = progress or (lambda _what, _n: None)
        blobs = _rotate_blobs(store, new, batch, note)
        versions = _rotate_rows(
            store, ModelVersionRow, (ModelVersionRow.id,), "mac", new.key_id, batch, note
        )
        participants = _rotate_rows(
            store,
            RoundParticipantRow,
            (RoundParticipantRow.round_id, RoundParticipantRow.device_id),
            "sealed",
            new.key_id,
            batch,
            note,
        )
        ab_results = _rotate_pseudonyms(store, old, new, batch, note)
        _finish(store, old.key_id, new.key_id, blobs + versions + participants + ab_results)
        return RotationReport(
            old.key_id, new.key_id, blobs, versions, participants, resumed, ab_results=ab_results
        )
    finally:
        lock.release()
        store.close()


def _begin(store: Store, old_id: str, new_id: str) -> bool | None:
    """Record the rotation; whether it resumes one (None: already finished)."""
    with store.session() as s, s.begin():
        row = s.get(DataKeyRow, 1)
        if row is None:  # a database from before key ids: trust the old key given
            row = DataKeyRow(id=1, key_id=old_id, rows_done=0, updated_at=utcnow())
            s.add(row)
        if row.rotating_to is None and row.key_id == new_id:
            return None
        if row.rotating_to is not None and row.rotating_to != new_id:
            raise DataKeyError(
                f"an interrupted rotation to key id {row.rotating_to} must be finished first: "
                "run rotate-key again with that key as --new-key-file"
            )
        if row.key_id != old_id:
            raise DataKeyError(
                f"the current key given (id {old_id}) is not this database's key "
                f"(id {row.key_id}): give the data key the server runs with"
            )
        resumed = row.rotating_to is not None
        if not resumed:
            row.rotating_to, row.rows_done, row.updated_at = new_id, 0, utcnow()
            audit.append(s, ACTOR, [("key.rotation_started", f"key {old_id}", {"to": new_id})])
        return resumed


def _count(s: Session, n: int) -> None:
    row = s.get(DataKeyRow, 1)
    assert row is not None
    row.rows_done += n
    row.updated_at = utcnow()


def _rotate_blobs(store: Store, new: Sealer, batch: int, note: Callable[[str, int], None]) -> int:
    assert store.sealer is not None
    moved, last = 0, ""
    while True:
        with store.session() as s, s.begin():
            rows = s.scalars(
                select(BlobRow).where(BlobRow.sha256 > last).order_by(BlobRow.sha256).limit(batch)
            ).all()
            if not rows:
                return moved
            n = 0
            for row in rows:
                last = row.sha256
                data = bytes(row.data)
                if sealed_key_id(data) == new.key_id:
                    continue
                if not is_sealed(data):
                    raise DataKeyError(
                        f"blob {row.sha256} is stored unencrypted although the database has a "
                        "data key: it was not written by the server; restore it from a backup"
                    )
                plain = store.sealer.open(data, row.sha256.encode())
                row.data = new.seal(plain, row.sha256.encode())
                n += 1
            _count(s, n)
        moved += n
        note("blobs", moved)
        crash_point("rotate-key")


def _rotate_rows(
    store: Store,
    table: Any,
    key_columns: tuple[Any, ...],
    column: str,
    new_id: str,
    batch: int,
    note: Callable[[str, int], None],
) -> int:
    """Mark changed every row whose `column` is not under new_id; returns how many.

    The session hooks (sealing.RecordSealer) check such a row under the old key on
    load and redo it under the new one on flush.
    """
    moved = 0
    after: tuple[Any, ...] | None = None
    while True:
        with store.session() as s, s.begin():
            q = select(table).order_by(*key_columns).limit(batch)
            if after is not None:
                q = q.where(tuple_(*key_columns) > tuple_(*after))
            rows = s.scalars(q).all()
            if not rows:
                return moved
            n = 0
            for row in rows:
                after = tuple(getattr(row, c.key) for c in key_columns)
                value = getattr(row, column)
                if value is not None and _key_id_of(value) == new_id:
                    continue
                flag_modified(row, column)
                n += 1
            _count(s, n)
        moved += n
        note(table.__tablename__, moved)
        crash_point("rotate-key")


def _rotate_pseudonyms(
    store: Store, old: Sealer, new: Sealer, batch: int, note: Callable[[str, int], None]
) -> int:
    """Re-derive the device pseudonyms of A/B results under the new key; returns how many.

    A pseudonym cannot be inverted, so each is mapped through the devices it can
    stand for (registered devices and round participants). One whose device is gone
    (no longer registered: nothing can ask to erase it) becomes "", unlinkable under
    any key. A device id in the clear (written before migration 0012) is replaced.
    """
    with store.session() as s:
        ids = set(s.scalars(select(DeviceRow.id))) | set(
            s.scalars(select(RoundParticipantRow.device_id).distinct())
        )
    renamed = {old.pseudonym(d): new.pseudonym(d) for d in ids}
    prefix, moved, last = new.key_id + ":", 0, 0
    while True:
        with store.session() as s, s.begin():
            rows = s.scalars(
                select(AbResultRow)
                .where(AbResultRow.id > last, AbResultRow.device_ref != "")
                .order_by(AbResultRow.id)
                .limit(batch)
            ).all()
            if not rows:
                return moved
            n = 0
            for row in rows:
                last = row.id
                ref = row.device_ref
                if ref.startswith(prefix):
                    continue
                if ref in renamed:
                    row.device_ref = renamed[ref]
                elif _is_pseudonym(ref):
                    row.device_ref = ""
                else:
                    row.device_ref = new.pseudonym(ref)
                n += 1
            _count(s, n)
        moved += n
        note(AbResultRow.__tablename__, moved)
        crash_point("rotate-key")
        crash_point("rotate-key-pseudonyms")  # the tests' kill inside this last phase


def _is_pseudonym(ref: str) -> bool:
    kid, sep, digest = ref.partition(":")
    return bool(sep) and len(kid) == 16 and len(digest) == 64


def _key_id_of(value: str | bytes) -> str | None:
    if isinstance(value, str):
        return value.partition(":")[0]
    return sealed_key_id(bytes(value))


def _finish(store: Store, old_id: str, new_id: str, rows: int) -> None:
    with store.session() as s, s.begin():
        row = s.get(DataKeyRow, 1)
        assert row is not None
        row.key_id, row.rotating_to, row.updated_at = new_id, None, utcnow()
        audit.append(
            s,
            ACTOR,
            [("key.rotated", f"key {old_id}", {"to": new_id, "rows": int(row.rows_done)})],
        )
