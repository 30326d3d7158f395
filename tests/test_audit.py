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


def test_a_flood_of_refusals_adds_a_bounded_number_of_counted_rows(db_url: str) -> None:
    """10,000 refusals from 1,000 addresses in one window (500 per class): one row per class
    and actor, at most max_actors + 1 per class, every refusal counted, the chain intact."""
    from server.refusals import CLASSES, RefusalLog

    store = Store(db_url)
    store.create_schema()
    now = [1_000_020.0]  # 20 s into a 60-s window
    log = RefusalLog(store.append_audit, window_s=60.0, max_actors=100, clock=lambda: now[0])
    log.note("permission_denied", "admin vera (viewer)", "/xeno.fl.v1.Admin/Rollback", "no")
    for i in range(10_000):
        log.note(CLASSES[i % 2], f"peer ipv4:10.0.{i % 1000 // 250}.{i % 250}", "CheckIn", "x")
    assert log.flush() == 0  # the window is still open
    now[0] += 60
    log.note("unauthenticated", "peer ipv4:10.9.9.9", "CheckIn", "next window")
    rows = log.flush()
    entries = audit_entries(store)
    assert rows == len(entries) == 2 * 101  # per class: 100 actors of their own + "others"
    by_class: dict[str, int] = {}
    for e in entries:
        by_class[e.action] = by_class.get(e.action, 0) + e.details["count"]
        assert set(e.details) >= {"count", "window_start", "rpcs", "first_reason"}
    assert by_class == {
        "refused.unauthenticated": 5000,
        "refused.permission_denied": 5001,
    }
    others = [e for e in entries if e.actor == "others"]
    assert [e.details["actors"] for e in others] == [400, 401]
    vera = next(e for e in entries if e.actor == "admin vera (viewer)")
    assert vera.target == "Rollback" and vera.details["rpcs"] == {"Rollback": 1}
    assert log.flush(everything=True) == 1  # the open window, when the log is read
    assert verify(audit_entries(store), audit_head(store)).ok
    store.close()


def test_refused_requests_are_in_the_chain_and_the_log_is_read_over_the_admin_api(
    server_factory, tmp_path
) -> None:
    """Each refused request class over real gRPC, then `audit list|verify --server`."""
    import grpc

    from common.certs import Role
    from common.pb import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
    from server.security import add_admin_token

    tokens = tmp_path / "admin.tokens"
    viewer = add_admin_token(tokens, "vera", Role.VIEWER)
    admin = add_admin_token(tokens, "root", Role.ADMIN)
    server = server_factory(
        admin_token_file=str(tokens), eval_data="none", checkin_burst=1.0, checkin_rate=0.01
    )
    with grpc.insecure_channel(server.address) as channel:
        fed = federation_pb2_grpc.FederationStub(channel)
        adm = admin_pb2_grpc.AdminStub(channel)

        def code(call, *args, **kwargs) -> grpc.StatusCode:
            try:
                call(*args, timeout=10, **kwargs)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        bad = (("x-xeno-device-id", "dev-nobody"), ("authorization", "Bearer wrong"))
        for _ in range(5):
            assert code(fed.CheckIn, federation_pb2.CheckInRequest(), metadata=bad) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        as_viewer = (("authorization", f"Bearer {viewer}"),)
        as_admin = (("authorization", f"Bearer {admin}"),)
        rollback = admin_pb2.RollbackRequest(model_name="digits-mlp", target_version=1)
        for _ in range(3):
            assert code(adm.Rollback, rollback, metadata=as_viewer) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
        for _ in range(2):
            assert code(
                adm.ListAuditLog, admin_pb2.ListAuditLogRequest(limit=-1), metadata=as_admin
            ) == (grpc.StatusCode.INVALID_ARGUMENT)
        reg = fed.Register(federation_pb2.RegisterRequest(), timeout=10)
        md = (("x-xeno-device-id", reg.device_id), ("authorization", f"Bearer {reg.token}"))
        limited = [
            code(fed.CheckIn, federation_pb2.CheckInRequest(max_wait_ms=0), metadata=md)
            for _ in range(3)
        ]
        assert limited.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2
        assert code(adm.ListAuditLog, admin_pb2.ListAuditLogRequest(), metadata=as_viewer) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        listed = adm.ListAuditLog(admin_pb2.ListAuditLogRequest(), metadata=as_admin, timeout=10)
    refusals = {
        (e.action, e.actor, e.target): json.loads(e.details_json)["count"]
        for e in listed.entries
        if e.action.startswith("refused.")
    }
    assert refusals[("refused.unauthenticated", "peer ipv4:127.0.0.1", "CheckIn")] == 5
    # one row per class and actor: vera's refused Rollbacks and ListAuditLog together
    assert refusals[("refused.permission_denied", "admin vera (viewer)", "Rollback")] == 4
    vera = next(e for e in listed.entries if e.actor == "admin vera (viewer)")
    assert json.loads(vera.details_json)["rpcs"] == {"ListAuditLog": 1, "Rollback": 3}
    assert refusals[("refused.invalid_argument", "admin root (admin)", "ListAuditLog")] == 2
    assert refusals[("refused.rate_limited", f"device {reg.device_id}", "CheckIn")] == (
        limited.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    )
    token_file = tmp_path / "root.token"
    token_file.write_text(admin + "\n")
    token_file.chmod(0o600)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "xeno.cli",
                "admin",
                "--server",
                server.address,
                "--token-file",
                str(token_file),
                "--json",
                "audit",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed_cli = cli("list")
    assert listed_cli.returncode == 0, listed_cli.stderr
    actions = [r["action"] for r in json.loads(listed_cli.stdout)]
    assert "refused.permission_denied" in actions and "device.enrolled" in actions
    verified = cli("verify", "--head", listed.head_hash)
    assert verified.returncode == 0, verified.stderr
    assert "audit log intact" in verified.stdout
