"""Encryption at rest, finished: version MACs, sealed per-device rows, key ids and rotation.

Tampering is done the way an attacker with database access would: SQL on the tables,
behind the server's back (SQLite and PostgreSQL). The rotation is killed with SIGKILL
midway (a crash point in the real `xeno-fl admin rotate-key` process) and then finished.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select, text

from common.atrest import DataKeyError, Sealer, parse_key, sealed_key_id, write_new_key
from common.models import ModelSpec
from common.tensors import Manifest, TensorInfo
from server.lifecycle.abtests import AbTests
from server.store import ParticipantRecord, Store, audit_entries, audit_head
from server.store.audit import verify
from server.store.lock import DatabaseInUseError, DatabaseLock
from server.store.models import BlobRow, DataKeyRow, ModelVersionRow, RoundParticipantRow
from server.store.rotation import rotate
from server.store.sealing import RecordTamperedError
from xeno.model_versioning import ABTestingManager

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
MANIFEST = Manifest((TensorInfo("w", (4,)),))


def _federation(url: str, key: bytes, rounds: int = 3) -> Store:
    store = Store(url, Sealer(key))
    store.create_schema()
    store.create_model("m", ModelSpec(), MANIFEST, "fedavg", np.zeros(4, np.float32))
    store.add_device("dev-a", "a" * 64, {})
    store.add_device("dev-b", "b" * 64, {})
    for number in range(1, rounds + 1):
        store.start_round("m", f"r{number}", number, number, 2)
        store.complete_round(
            "m",
            f"r{number}",
            np.full(4, number, np.float32),
            {"accuracy": 0.5 + number / 10},
            1.0,
            [
                ParticipantRecord("dev-a", "reported", 10 * number, metrics={"loss": 0.25}),
                ParticipantRecord("dev-b", "declined", note="plaintext task refused"),
            ],
        )
    return store


def _raw(url: str, sql: str) -> list[tuple[object, ...]]:
    store = Store(url)
    try:
        with store.engine.begin() as conn:
            result = conn.execute(text(sql))
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        store.close()


def test_substituted_weights_are_detected_by_the_version_mac(db_url: str) -> None:
    """The attacker points version 2 at version 4's (validly sealed) weights."""
    store = _federation(db_url, OLD)
    np.testing.assert_array_equal(store.load_version("m", 2), np.full(4, 1, np.float32))
    [(blob4,)] = _raw(db_url, "SELECT blob_sha256 FROM model_versions WHERE version = 4")
    _raw(db_url, f"UPDATE model_versions SET blob_sha256 = '{blob4}' WHERE version = 2")
    with pytest.raises(RecordTamperedError, match="version 2 of model id 1 fails its MAC"):
        store.load_version("m", 2)
    np.testing.assert_array_equal(store.load_version("m", 3), np.full(4, 2, np.float32))
    store.close()


def test_edited_metrics_and_a_removed_mac_are_detected(db_url: str) -> None:
    store = _federation(db_url, OLD)
    assert store.list_versions("m")[2].metrics["accuracy"] == pytest.approx(0.7)
    [(metrics,)] = _raw(db_url, "SELECT metrics FROM model_versions WHERE version = 3")
    original = metrics if isinstance(metrics, str) else json.dumps(metrics)
    edited = json.loads(original)
    edited["accuracy"] = 0.99
    _raw(
        db_url,
        f"UPDATE model_versions SET metrics = '{json.dumps(edited)}' WHERE version = 3",
    )
    with pytest.raises(RecordTamperedError, match=r"version 3 .* fails its MAC.*metrics"):
        store.list_versions("m")
    _raw(db_url, f"UPDATE model_versions SET metrics = '{original}' WHERE version = 3")
    assert store.list_versions("m")[2].metrics["accuracy"] == pytest.approx(0.7)
    _raw(db_url, "UPDATE model_versions SET mac = NULL WHERE version = 1")
    with pytest.raises(RecordTamperedError, match=r"version 1 .* has no MAC"):
        store.load_version("m", 1)
    store.close()


def test_per_device_rows_are_sealed(db_url: str) -> None:
    store = _federation(db_url, OLD, rounds=1)
    rows = _raw(db_url, "SELECT num_examples, metrics, note, sealed FROM round_participants")
    for num_examples, metrics, note, sealed in rows:
        assert num_examples == 0 and note == "" and sealed is not None
        assert json.loads(metrics) == {} if isinstance(metrics, str) else metrics == {}
        assert b"plaintext task refused" not in bytes(sealed)  # type: ignore[arg-type]
        assert sealed_key_id(bytes(sealed)) == Sealer(OLD).key_id  # type: ignore[arg-type]
    opened = {r.device_id: r for r in store.round_participants("r1")}
    assert opened["dev-a"].num_examples == 10 and opened["dev-a"].metrics == {"loss": 0.25}
    assert opened["dev-b"].note == "plaintext task refused"
    assert store.contributions("m") == [("r1", "dev-a", {"loss": 0.25})]
    store.close()
    with pytest.raises(DataKeyError, match="per-device rows of this database are sealed"):
        Store(db_url).round_participants("r1")
    # A row moved to another device does not open (the seal binds round and device).
    swapped = _raw(db_url, "SELECT sealed FROM round_participants WHERE device_id = 'dev-a'")
    _raw(db_url, "DELETE FROM round_participants WHERE device_id = 'dev-b'")
    store = Store(db_url, Sealer(OLD))
    with store.session() as s, s.begin():
        s.execute(
            RoundParticipantRow.__table__.insert().values(
                round_id="r1",
                device_id="dev-b",
                status="reported",
                num_examples=0,
                bytes_in=0,
                bytes_out=0,
                metrics={},
                note="",
                sealed=swapped[0][0],
            )
        )
    with pytest.raises(DataKeyError, match="does not open"):
        store.round_participants("r1")
    store.close()


def _key_ids(url: str) -> tuple[set[str | None], set[str], set[str | None]]:
    store = Store(url)
    try:
        with store.session() as s:
            blobs = {sealed_key_id(bytes(d)) for d in s.scalars(select(BlobRow.data))}
            macs = {str(m).partition(":")[0] for m in s.scalars(select(ModelVersionRow.mac))}
            parts = {sealed_key_id(bytes(d)) for d in s.scalars(select(RoundParticipantRow.sealed))}
        return blobs, macs, parts
    finally:
        store.close()


def _assert_under_new_key_only(url: str) -> None:
    new_id = Sealer(NEW).key_id
    assert _key_ids(url) == ({new_id}, {new_id}, {new_id})
    store = Store(url, Sealer(NEW))
    store.create_schema()  # the key check passes
    for v in range(1, 5):
        np.testing.assert_array_equal(
            store.load_version("m", v), np.full(4, max(v - 1, 0), np.float32)
        )
    assert store.contributions("m")[0] == ("r1", "dev-a", {"loss": 0.25})
    assert [r.note for r in store.round_participants("r2") if r.device_id == "dev-b"] == [
        "plaintext task refused"
    ]
    entries = audit_entries(store)
    assert [e.action for e in entries][-1] == "key.rotated"
    assert verify(entries, audit_head(store)).ok
    store.close()
    old = Store(url, Sealer(OLD))
    with pytest.raises(DataKeyError, match="is not this database's key"):
        old.create_schema()
    with pytest.raises(DataKeyError, match="data key id"):
        old.load_version("m", 1)
    with pytest.raises(DataKeyError, match="data key id"):
        old.round_participants("r1")
    old.close()


def test_rotation_moves_everything_to_the_new_key(db_url: str) -> None:
    _federation(db_url, OLD).close()
    old_id = Sealer(OLD).key_id
    assert _key_ids(db_url) == ({old_id}, {old_id}, {old_id})
    report = rotate(db_url, OLD, NEW, batch=2)
    assert (report.blobs, report.versions, report.participants) == (4, 4, 6)
    _assert_under_new_key_only(db_url)
    again = rotate(db_url, OLD, NEW)
    assert again.already_done
    with pytest.raises(DataKeyError, match="not this database's key"):
        rotate(db_url, bytes(32), NEW[::-1])


def test_rotation_refuses_while_a_server_holds_the_database(db_url: str) -> None:
    store = _federation(db_url, OLD, rounds=1)
    server_lock = DatabaseLock(store.engine)  # what `xeno-fl server` holds while it runs
    assert server_lock.acquire(exclusive=False)
    try:
        with pytest.raises(DatabaseInUseError, match="stop the server"):
            rotate(db_url, OLD, NEW)
    finally:
        server_lock.release()
    assert _key_ids(db_url)[0] == {Sealer(OLD).key_id}  # nothing moved
    rotation_lock = DatabaseLock(store.engine)
    assert rotation_lock.acquire(exclusive=True)
    assert not DatabaseLock(store.engine).acquire(exclusive=False)  # a server refuses to start
    rotation_lock.release()
    store.close()


def _cli(url: str, *args: str, crash: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENO_")}
    if crash:
        env["XENO_CRASH_AT"] = crash  # server/faults.py: SIGKILL there
    return subprocess.run(
        [sys.executable, "-m", "xeno.cli", "admin", "--db", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_rotation_killed_midway_is_finished_by_running_it_again(
    db_url: str, tmp_path: Path
) -> None:
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    for path, key in ((old_file, OLD), (new_file, NEW)):
        path.write_text(key.hex() + "\n")
        path.chmod(0o600)
    assert parse_key(new_file.read_text()) == NEW
    _federation(db_url, OLD).close()
    args = ("rotate-key", "--key-file", str(old_file), "--new-key-file", str(new_file))
    killed = _cli(db_url, *args, "--batch", "1", crash="rotate-key")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    blobs, _macs, _parts = _key_ids(db_url)
    assert blobs == {Sealer(OLD).key_id, Sealer(NEW).key_id}  # midway: some moved, some not
    [(rotating_to,)] = _raw(db_url, "SELECT rotating_to FROM data_keys")
    assert rotating_to == Sealer(NEW).key_id
    for key in (OLD, NEW):  # a server refuses to start on a half-rotated database
        with pytest.raises(DataKeyError, match="was interrupted: finish it"):
            Store(db_url, Sealer(key)).create_schema()
    done = _cli(db_url, *args, "--batch", "1")
    assert done.returncode == 0, done.stderr
    assert "finished the interrupted rotation" in done.stdout
    assert f"--data-key-file {new_file}" in done.stdout
    _assert_under_new_key_only(db_url)
    store = Store(db_url, Sealer(NEW))
    with store.session() as s:
        row = s.get(DataKeyRow, 1)
        assert row is not None and row.rotating_to is None and row.rows_done == 14
    store.close()


def _key_files(tmp_path: Path) -> tuple[str, ...]:
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    for path, key in ((old_file, OLD), (new_file, NEW)):
        path.write_text(key.hex() + "\n")
        path.chmod(0o600)
    return ("rotate-key", "--key-file", str(old_file), "--new-key-file", str(new_file))


def test_rotation_killed_while_it_renames_pseudonyms_is_finished_by_running_it_again(
    tmp_path: Path,
) -> None:
    """SIGKILL inside the last phase (A/B results' device pseudonyms), then the same command.

    SQLite only: the phase's code is the same SQL on PostgreSQL (the kill test above
    runs on both), and each run is a new process.
    """
    url = f"sqlite:///{tmp_path}/store.db"
    store = _federation(url, OLD)
    ABTestingManager(store=store).create_test("t", "m:1", "m:2", 0.5, ["accuracy"])
    tests = AbTests(store)
    for i in range(6):
        device, arm = ("dev-a", "variant_a") if i % 2 else ("dev-b", "variant_b")
        tests.record("t", arm, {"accuracy": 0.6 + i / 100}, device_id=device)
    [(test_id,)] = _raw(url, "SELECT id FROM ab_tests")
    _raw(  # a row from before migration 0012: the device id in the clear
        url,
        "INSERT INTO ab_results (test_id, variant, metric, value, device_ref, recorded_at) "
        f"VALUES ({test_id}, 'variant_b', 'accuracy', 0.7, 'dev-b', CURRENT_TIMESTAMP)",
    )
    before = tests.analyze("t")
    store.close()
    refs_sql = "SELECT device_ref FROM ab_results ORDER BY id"
    args = _key_files(tmp_path)

    killed = _cli(url, *args, "--batch", "1", crash="rotate-key-pseudonyms")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "crash point rotate-key-pseudonyms" in killed.stderr
    new_id = Sealer(NEW).key_id
    assert _key_ids(url) == ({new_id}, {new_id}, {new_id})  # the earlier phases are done
    refs = [str(r) for (r,) in _raw(url, refs_sql)]
    # Killed after the first batch of one: that pseudonym is renamed, the others are not.
    assert refs[0] == _pseudonym(NEW, "dev-b")
    assert refs[1:6] == [_pseudonym(OLD, "dev-a" if i % 2 else "dev-b") for i in range(1, 6)]
    assert refs[6] == "dev-b"
    [(rotating_to,)] = _raw(url, "SELECT rotating_to FROM data_keys")
    assert rotating_to == new_id
    for key in (OLD, NEW):  # a server refuses to start on a half-rotated database
        with pytest.raises(DataKeyError, match="was interrupted: finish it"):
            Store(url, Sealer(key)).create_schema()

    done = _cli(url, *args, "--batch", "1")
    assert done.returncode == 0, done.stderr
    assert "finished the interrupted rotation" in done.stdout
    _assert_under_new_key_only(url)
    refs = [str(r) for (r,) in _raw(url, refs_sql)]
    assert refs == [_pseudonym(NEW, "dev-a" if i % 2 else "dev-b") for i in range(6)] + [
        _pseudonym(NEW, "dev-b")
    ]
    store = Store(url, Sealer(NEW))
    try:
        assert _close(AbTests(store).analyze("t"), before)
        with store.session() as s:
            row = s.get(DataKeyRow, 1)
            # Every row moved exactly once: 14 sealed or MACed rows and 7 pseudonyms.
            assert row is not None and row.rotating_to is None and row.rows_done == 14 + 7
        # The pseudonyms are the new key's: forgetting a device finds all its results.
        assert store.forget_device("dev-b")[1] == 4
        assert store.forget_device("dev-a")[1] == 3
    finally:
        store.close()


@pytest.mark.slow
def test_rotate_key_bad_input(db_url: str, tmp_path: Path) -> None:
    _federation(db_url, OLD, rounds=1).close()
    key_file = tmp_path / "old.key"
    key_file.write_text(OLD.hex())
    key_file.chmod(0o600)
    write_new_key(tmp_path / "new.key")
    same = _cli(db_url, "rotate-key", "--key-file", str(key_file), "--new-key-file", str(key_file))
    assert same.returncode == 2 and "the new key is the current key" in same.stderr
    missing = _cli(
        db_url, "rotate-key", "--key-file", str(key_file), "--new-key-file", str(tmp_path / "x")
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "new.key").chmod(0o644)
    loose = _cli(
        db_url,
        "rotate-key",
        "--key-file",
        str(key_file),
        "--new-key-file",
        str(tmp_path / "new.key"),
    )
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    assert _key_ids(db_url)[0] == {Sealer(OLD).key_id}  # nothing moved


def test_a_running_server_and_a_rotation_exclude_each_other(server_factory, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/served.db"
    server_factory(db=url, eval_data="none")
    with pytest.raises(DatabaseInUseError, match="stop the server, then run rotate-key again"):
        rotate(url, OLD, NEW)
    other = f"sqlite:///{tmp_path}/rotating.db"
    _federation(other, OLD, rounds=1).close()
    store = Store(other)
    rotation = DatabaseLock(store.engine)  # what rotate-key holds while it runs
    assert rotation.acquire(exclusive=True)
    try:
        with pytest.raises(DatabaseInUseError, match=r"a data key rotation .* is running"):
            server_factory(db=other, eval_data="none")
    finally:
        rotation.release()
        store.close()


def _pseudonym(key: bytes, device_id: str) -> str:
    """Independent reference: KEYID:HMAC-SHA256(HKDF(key, own label), device id)."""
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"xeno-fl/v1 device pseudonym"
    ).derive(key)
    digest = hmac.new(derived, device_id.encode(), hashlib.sha256).hexdigest()
    return f"{Sealer(key).key_id}:{digest}"


def test_ab_results_name_devices_by_a_keyed_pseudonym_through_forget_and_rotation(
    db_url: str,
) -> None:
    store = _federation(db_url, OLD)
    store.add_device("dev-c", "c" * 64, {})
    ABTestingManager(store=store).create_test("t", "m:1", "m:2", 0.5, ["accuracy"])
    tests = AbTests(store)
    values = np.random.default_rng(0).normal(0.7, 0.05, 40)
    for i, value in enumerate(values):
        device, arm = ("dev-a", "variant_a") if i % 2 else ("dev-b", "variant_b")
        tests.record("t", arm, {"accuracy": float(value)}, device_id=device)
    tests.record("t", "variant_a", {"accuracy": 0.5}, device_id="dev-c")
    tests.record_many("t", "variant_b", "accuracy", [0.6, 0.65])  # imports: no device
    [(test_id,)] = _raw(db_url, "SELECT id FROM ab_tests")
    # A row from before migration 0012: the device id in the clear.
    _raw(
        db_url,
        "INSERT INTO ab_results (test_id, variant, metric, value, device_ref, recorded_at) "
        f"VALUES ({test_id}, 'variant_b', 'accuracy', 0.71, 'dev-b', CURRENT_TIMESTAMP)",
    )
    refs = [str(r) for (r,) in _raw(db_url, "SELECT device_ref FROM ab_results ORDER BY id")]
    assert not any(d in r for r in refs[:-1] for d in ("dev-a", "dev-b", "dev-c"))
    assert refs.count(_pseudonym(OLD, "dev-a")) == 20
    assert refs.count(_pseudonym(OLD, "dev-b")) == 20 and refs.count("") == 2
    assert store.forget_device("dev-c")[1] == 1
    before = tests.analyze("t")
    values_sql = "SELECT variant, metric, value FROM ab_results ORDER BY variant, value"
    values_before = _raw(db_url, values_sql)
    store.close()

    report = rotate(db_url, OLD, NEW)
    assert report.ab_results == 41  # 40 pseudonyms re-derived, the clear one replaced
    store = Store(db_url, Sealer(NEW))
    tests = AbTests(store)
    assert _raw(db_url, values_sql) == values_before  # the very same values
    # PostgreSQL may sum the updated rows in another order: the last bits may move.
    assert _close(tests.analyze("t"), before)
    refs = [str(r) for (r,) in _raw(db_url, "SELECT device_ref FROM ab_results")]
    assert refs.count(_pseudonym(NEW, "dev-a")) == 20
    assert refs.count(_pseudonym(NEW, "dev-b")) == 21 and refs.count("") == 2
    assert store.forget_device("dev-b")[1] == 21
    assert store.forget_device("dev-a")[1] == 20
    assert [r for (r,) in _raw(db_url, "SELECT device_ref FROM ab_results")] == ["", ""]
    store.close()


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b
