"""The audit log: state changes are chained in their own transaction, and editing,
deleting, reordering or truncating rows in the database is detected (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import text

from common.models import ModelSpec
from common.tensors import Manifest, TensorInfo
from server.lifecycle.versions import VersionControl
from server.store import ParticipantRecord, Store, audit_entries, audit_head
from server.store.audit import acting_as, verify

MANIFEST = Manifest((TensorInfo("w", (4,)),))


def _history(store: Store) -> None:
    store.create_schema()
    store.create_model("m", ModelSpec(), MANIFEST, "fedavg", np.zeros(4, np.float32))
    store.add_device("dev-a", "a" * 64, {})
    store.add_device("dev-b", "b" * 64, {}, revoke=("dev-a",))
    for number in (1, 2):
        store.start_round("m", f"r{number}", number, number, 1)
        store.complete_round(
            "m",
            f"r{number}",
            np.full(4, number, np.float32),
            {},
            1.0,
            [ParticipantRecord("dev-b", "uploaded", 1)],
        )
    store.start_round("m", "r3", 3, 3, 1)
    store.fail_round("r3", "too few updates", 1.0, [])
    versions = VersionControl(store)
    with acting_as("admin alice (operator)"):
        versions.rollback("m", 1, "alice", "bad round")
        versions.tag("m", None, "production", "alice")


def test_changes_are_recorded_with_their_actor_and_the_chain_verifies(db_url: str) -> None:
    store = Store(db_url)
    _history(store)
    entries = audit_entries(store)
    actions = [e.action for e in entries]
    assert actions[:3] == ["model.created", "version.created", "device.enrolled"]
    assert "device.revoked" in actions and actions.count("round.completed") == 2
    assert "round.failed" in actions and "version.rolled_back" in actions
    assert "tag.set" in actions
    rollback = next(e for e in entries if e.action == "version.rolled_back")
    assert rollback.actor == "admin alice (operator)"
    assert next(e for e in entries if e.action == "round.failed").details["reason"] == (
        "too few updates"
    )
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    verdict = verify(entries, audit_head(store))
    assert verdict.ok and verdict.head == entries[-1].hash
    assert verify(entries, audit_head(store), anchor=entries[3].hash).ok
    store.close()


def test_a_failed_transaction_leaves_no_audit_entry(db_url: str) -> None:
    store = Store(db_url)
    store.create_schema()
    store.add_device("dev-a", "a" * 64, {})
    before = audit_entries(store)
    with pytest.raises(Exception):  # noqa: B017 - the duplicate key, whatever the driver says
        store.add_device("dev-a", "c" * 64, {})
    assert audit_entries(store) == before
    store.close()


TAMPERING = {
    "edit": ("UPDATE audit_log SET details = '{}' WHERE seq = 4", 4, "edited"),
    "edit-actor": (
        "UPDATE audit_log SET actor = 'admin mallory (admin)' WHERE seq = 2",
        2,
        "edited",
    ),
    "delete": ("DELETE FROM audit_log WHERE seq = 3", 3, "missing"),
    "reorder": (
        "UPDATE audit_log SET seq = CASE seq WHEN 2 THEN 3 WHEN 3 THEN 2 END WHERE seq IN (2, 3)",
        2,
        "",
    ),
    "first-row": ("UPDATE audit_log SET target = 'x' WHERE seq = 1", 1, "edited"),
    "truncate": ("DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)", None, "end"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampering_is_detected_with_the_first_bad_row(db_url: str, how: str) -> None:
    store = Store(db_url)
    _history(store)
    rows = len(audit_entries(store))
    sql, first_bad, words = TAMPERING[how]
    with store.engine.begin() as conn:
        if how == "reorder":  # a unique key forbids the swap in one step on some databases
            conn.execute(text("UPDATE audit_log SET seq = -2 WHERE seq = 2"))
            conn.execute(text("UPDATE audit_log SET seq = 2 WHERE seq = 3"))
            conn.execute(text("UPDATE audit_log SET seq = 3 WHERE seq = -2"))
        else:
            conn.execute(text(sql))
    verdict = verify(audit_entries(store), audit_head(store))
    assert not verdict.ok
    assert verdict.first_bad == (rows if first_bad is None else first_bad), verdict
    assert words in verdict.problem
    store.close()


def test_a_rewritten_log_is_caught_by_the_saved_head(db_url: str) -> None:
    """Someone who rewrites the whole chain consistently (and the head) is caught by the
    head the operator saved elsewhere."""
    store = Store(db_url)
    _history(store)
    saved = audit_head(store)
    assert saved is not None
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
        conn.execute(text("DELETE FROM audit_head"))
    store.add_device("dev-z", "z" * 64, {})  # a fresh, self-consistent chain
    entries = audit_entries(store)
    assert verify(entries, audit_head(store)).ok
    verdict = verify(entries, audit_head(store), anchor=saved[1])
    assert not verdict.ok and "not in the chain" in verdict.problem
    store.close()


def test_cli_list_and_verify(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    store = Store(url)
    _history(store)
    head = audit_head(store)
    store.close()
    assert head is not None

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "xeno.cli", "admin", "--db", url, "--json", "audit", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = cli("verify", "--head", head[1])
    assert ok.returncode == 0 and f"head {head[1]}" in ok.stdout
    listed = cli("list")
    assert listed.returncode == 0
    listed_rows = json.loads(listed.stdout)
    assert [r["seq"] for r in listed_rows] == list(range(1, len(listed_rows) + 1))
    assert "version.rolled_back" in {r["action"] for r in listed_rows}
    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET action = 'nothing' WHERE seq = 1"))
    store.close()
    broken = cli("verify")
    assert broken.returncode == 1
    assert "audit log BROKEN at row 1: row 1 was edited" in broken.stderr
    assert "audit list" in broken.stderr
