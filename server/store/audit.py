"""Tamper-evident audit log: an append-only, SHA-256 hash-chained `audit_log` table.

Entries are derived from the ORM changes of each flush (`record_changes`, an
`after_flush` hook on every session of a `Store`), so they are written in the
same transaction as the change they record, whichever module made it: a device
enrolled or revoked, a model created, defined, paused, resumed or deleted (its
definition only), a version created (or rolled back) or deleted, a round completed
or failed, a tag or an A/B test changed. The actor is whoever the call runs for
(`acting_as`: a device id, an admin name and role, or "system").

Row n stores hash_n = SHA-256(hash_{n-1} || canonical JSON of (n, time, actor,
action, target, details)); `audit_head` holds the newest (n, hash) and is
locked (FOR UPDATE) while a row is appended, so concurrent transactions
serialize. `verify` recomputes the chain and names the first row that was
edited, deleted or moved, and a truncated tail (the head disagrees); `--head
HASH` checks against a head the operator saved elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, inspect, select, update
from sqlalchemy.orm import Session

from server.store.models import (
    AbTestRow,
    AuditHeadRow,
    AuditRow,
    DeviceRow,
    ModelDefinitionRow,
    ModelRow,
    ModelTagRow,
    ModelVersionRow,
    RevokedCertificateRow,
    RoundRow,
)

GENESIS = "0" * 64

_actor: contextvars.ContextVar[str] = contextvars.ContextVar("xeno_audit_actor", default="system")


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Record changes made inside as done by actor ("device dev-..", "admin alice (operator)")."""
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def set_actor(actor: str) -> None:
    """Set the actor for the rest of this context (a gRPC call's task or thread)."""
    _actor.set(actor)


@dataclass(frozen=True)
class Entry:
    seq: int
    created_at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


def entry_hash(
    prev_hash: str,
    seq: int,
    created_at: datetime,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any],
) -> str:
    body = json.dumps(
        [seq, iso(created_at), actor, action, target, details],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()


def iso(moment: datetime) -> str:
    """The entry time as its hash covers it (UTC, microseconds)."""
    if moment.tzinfo is None:  # SQLite hands back naive datetimes, written in UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _changes(session: Session) -> list[tuple[str, str, dict[str, Any]]]:
    """(action, target, details) of the auditable changes pending in this flush."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for obj in list(session.new):
        if isinstance(obj, DeviceRow):
            out.append(("device.enrolled", obj.id, {"certificate": obj.cert_name or ""}))
        elif isinstance(obj, ModelRow):
            out.append(("model.created", obj.name, {"strategy": obj.strategy}))
        elif isinstance(obj, ModelVersionRow):
            action = "version.rolled_back" if obj.rollback_of else "version.created"
            out.append(
                (
                    action,
                    f"model {obj.model_id} version {obj.version}",
                    {
                        "blob_sha256": obj.blob_sha256,
                        "created_by": obj.created_by,
                        "rollback_of": obj.rollback_of or 0,
                        "round_id": obj.round_id or "",
                    },
                )
            )
        elif isinstance(obj, ModelTagRow):
            out.append(("tag.set", f"model {obj.model_id} tag {obj.tag}", {"version": obj.version}))
        elif isinstance(obj, AbTestRow):
            out.append(("abtest.created", obj.name, {"status": obj.status}))
        elif isinstance(obj, RevokedCertificateRow):
            target = f"serial {obj.serial}" if obj.serial else f"{obj.kind} {obj.name}"
            out.append(("certificate.revoked", target, {"reason": obj.reason}))
        elif isinstance(obj, ModelDefinitionRow):
            out.append(
                (
                    "model.defined",
                    f"model {obj.model_id}",
                    {"task": obj.task, "source": obj.source, "paused": bool(obj.paused)},
                )
            )
    for obj in list(session.dirty):
        state = inspect(obj)
        changed = {a.key for a in state.attrs if a.history.has_changes()}
        if isinstance(obj, DeviceRow) and "revoked_at" in changed and obj.revoked_at is not None:
            out.append(("device.revoked", obj.id, {}))
        elif isinstance(obj, RoundRow) and "status" in changed and obj.status != "running":
            out.append(
                (
                    f"round.{obj.status}",
                    obj.id,
                    {
                        "number": obj.number,
                        "result_version": obj.result_version or 0,
                        "reason": obj.failure_reason or "",
                    },
                )
            )
        elif isinstance(obj, ModelRow) and "current_version" in changed:
            out.append(("model.head_moved", obj.name, {"version": obj.current_version}))
        elif isinstance(obj, ModelTagRow) and "version" in changed:
            out.append(("tag.set", f"model {obj.model_id} tag {obj.tag}", {"version": obj.version}))
        elif isinstance(obj, AbTestRow) and "status" in changed:
            out.append((f"abtest.{obj.status}", obj.name, {"winner": obj.winner}))
        elif isinstance(obj, ModelDefinitionRow):
            if "paused" in changed:
                action = "model.paused" if obj.paused else "model.resumed"
                out.append((action, f"model {obj.model_id}", {}))
            if changed & {"settings", "task", "source"}:
                out.append(
                    (
                        "model.redefined",
                        f"model {obj.model_id}",
                        {"task": obj.task, "source": obj.source},
                    )
                )
    for obj in list(session.deleted):
        if isinstance(obj, ModelVersionRow):
            out.append(("data.deleted", f"model {obj.model_id} version {obj.version}", {}))
        elif isinstance(obj, ModelTagRow):
            out.append(("tag.removed", f"model {obj.model_id} tag {obj.tag}", {}))
        elif isinstance(obj, DeviceRow):
            out.append(("data.deleted", f"device {obj.id}", {}))
        elif isinstance(obj, ModelDefinitionRow):
            out.append(
                (
                    "model.deleted",
                    f"model {obj.model_id}",
                    {"task": obj.task, "source": obj.source},
                )
            )
    return out


def record_changes(session: Session, _flush_context: Any = None) -> None:
    """after_flush hook: append the flush's auditable changes to the chain."""
    changes = _changes(session)
    if changes:
        append(session, _actor.get(), changes)


def append(session: Session, actor: str, changes: Sequence[tuple[str, str, dict[str, Any]]]) -> str:
    """Append entries inside the session's transaction; the new head hash."""
    conn = session.connection()
    head = conn.execute(
        select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1).with_for_update()
    ).first()
    seq, prev = (head[0], head[1]) if head is not None else (0, GENESIS)
    now = datetime.now(UTC)
    rows = []
    for action, target, details in changes:
        seq += 1
        digest = entry_hash(prev, seq, now, actor, action, target, details)
        rows.append(
            {
                "seq": seq,
                "created_at": now,
                "actor": actor,
                "action": action,
                "target": target,
                "details": details,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    conn.execute(insert(AuditRow), rows)
    if head is None:
        conn.execute(insert(AuditHeadRow).values(id=1, seq=seq, hash=prev))
    else:
        conn.execute(update(AuditHeadRow).where(AuditHeadRow.id == 1).values(seq=seq, hash=prev))
    return prev


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    head: str
    first_bad: int | None = None
    problem: str = ""


def verify(
    entries: Sequence[Entry], stored_head: tuple[int, str] | None, anchor: str = ""
) -> Verdict:
    """Recompute the chain over entries (in seq order as stored); name the first bad row."""
    prev = GENESIS
    for expected, e in enumerate(entries, 1):
        if e.seq != expected:
            what = "missing (deleted)" if e.seq > expected else "out of order"
            return Verdict(False, len(entries), prev, expected, f"row {expected} is {what}")
        if e.prev_hash != prev:
            return Verdict(
                False,
                len(entries),
                prev,
                e.seq,
                f"row {e.seq} does not follow row {e.seq - 1} (its previous hash differs)",
            )
        digest = entry_hash(prev, e.seq, e.created_at, e.actor, e.action, e.target, e.details)
        if digest != e.hash:
            return Verdict(
                False, len(entries), prev, e.seq, f"row {e.seq} was edited (its hash differs)"
            )
        prev = digest
    last = len(entries)
    if stored_head is not None and (stored_head[0] != last or stored_head[1] != prev):
        return Verdict(
            False,
            last,
            prev,
            min(last + 1, stored_head[0]),
            f"the chain ends at row {last} but the head says row {stored_head[0]}: rows at "
            "the end were deleted",
        )
    if anchor:
        known = {e.hash for e in entries}
        if anchor not in known:
            return Verdict(
                False,
                last,
                prev,
                None,
                f"the saved head {anchor[:16]}... is not in the chain: the log was rewritten "
                "or truncated before it",
            )
    return Verdict(True, last, prev)
