"""The assistant's encrypted per-user store: keys, atomicity, strict opening, migrations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from client.assistant import store as store_mod
from client.assistant.keys import KeyCreatedWarning, StoreKeyError, UserPaths, load_device_key
from client.assistant.store import (
    SchemaTooNewError,
    StoreCorruptError,
    StoreLimitError,
    UserStore,
    delete_user_store,
)

KEY = "ab" * 32


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XENO_HOME", str(tmp_path))
    monkeypatch.setenv("XENO_DEVICE_KEY", KEY)
    monkeypatch.delenv("XENO_DEVICE_KEY_FILE", raising=False)
    return tmp_path


def put(store: UserStore, text: str) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO episodes (event_type, description, context, ts) VALUES (?, ?, '{}', ?)",
            ("note", text, time.time()),
        )


def descriptions(store: UserStore) -> list[str]:
    return [r[0] for r in store.query("SELECT description FROM episodes ORDER BY id")]


def test_data_is_encrypted_on_disk(home: Path) -> None:
    with UserStore("alice") as s:
        put(s, "my very secret diary entry")
    raw = b"".join(p.read_bytes() for p in UserPaths(home, "alice").database_files() if p.exists())
    assert b"secret diary" not in raw
    assert b"SQLite format 3" not in raw
    with UserStore("alice") as s:
        assert descriptions(s) == ["my very secret diary entry"]
    mode = UserPaths(home, "alice").database.stat().st_mode & 0o777
    assert mode == 0o600


def test_key_file_is_created_with_a_warning_when_no_other_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENO_HOME", str(tmp_path))
    monkeypatch.delenv("XENO_DEVICE_KEY", raising=False)
    monkeypatch.delenv("XENO_DEVICE_KEY_FILE", raising=False)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    with pytest.warns(KeyCreatedWarning, match=str(tmp_path / "device.key")):
        s = UserStore("bob")
    s.close()
    key_file = tmp_path / "device.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    # The next open takes the same key from the file, with no new warning.
    assert load_device_key(tmp_path).source == f"file:{key_file}"
    with UserStore("bob") as s:
        assert s.schema_version() == store_mod.SCHEMA_VERSION


def test_wrong_device_key_is_a_clear_error_and_changes_nothing(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with UserStore("carol") as s:
        put(s, "kept")
    paths = UserPaths(home, "carol")
    before = {p: p.read_bytes() for p in [paths.database, paths.wrapped_key]}
    monkeypatch.setenv("XENO_DEVICE_KEY", "cd" * 32)
    with pytest.raises(StoreKeyError, match="does not open"):
        UserStore("carol")
    assert {p: p.read_bytes() for p in before} == before
    monkeypatch.setenv("XENO_DEVICE_KEY", KEY)
    with UserStore("carol") as s:
        assert descriptions(s) == ["kept"]


def test_missing_store_key_never_resets_the_store(home: Path) -> None:
    with UserStore("dan") as s:
        put(s, "kept")
    paths = UserPaths(home, "dan")
    hidden = paths.wrapped_key.read_bytes()
    paths.wrapped_key.unlink()
    with pytest.raises(StoreKeyError, match="missing"):
        UserStore("dan")
    paths.wrapped_key.write_bytes(hidden)
    with UserStore("dan") as s:
        assert descriptions(s) == ["kept"]


@pytest.mark.parametrize("where", ["header", "middle"])
def test_corrupted_file_is_a_clear_error_and_left_untouched(home: Path, where: str) -> None:
    with UserStore("erin") as s:
        for i in range(300):
            put(s, f"entry {i} " + "x" * 200)
    path = UserPaths(home, "erin").database
    data = bytearray(path.read_bytes())
    at = 100 if where == "header" else len(data) // 2
    data[at : at + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="corrupted"):
        UserStore("erin")
    assert path.read_bytes() == bytes(data)


def test_newer_schema_is_refused(home: Path) -> None:
    with UserStore("fay") as s, s.transaction() as db:
        db.execute(f"PRAGMA user_version = {store_mod.SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNewError, match="knows up to"):
        UserStore("fay")


def test_migrations_run_in_order_and_only_once(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with UserStore("gus") as s:
        put(s, "old")
    calls: list[int] = []

    def v2(db: object) -> None:
        calls.append(2)
        db.execute("ALTER TABLE episodes ADD COLUMN mood TEXT DEFAULT 'ok'")  # type: ignore[attr-defined]

    n = store_mod.SCHEMA_VERSION
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, v2])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", n + 1)
    with UserStore("gus") as s:
        assert s.schema_version() == n + 1
        assert s.query("SELECT description, mood FROM episodes") == [("old", "ok")]
    with UserStore("gus") as s:
        assert s.schema_version() == n + 1
    assert calls == [2]


def test_a_version_1_store_is_migrated_keeping_its_rows(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 1)
    with UserStore("vic") as s, s.transaction() as db:
        db.execute(
            "INSERT INTO interactions (ts, query, response, context, feedback) "
            "VALUES (1e9, 'q', 'r', '{}', 4)"
        )
    monkeypatch.undo()
    monkeypatch.setenv("XENO_HOME", str(home))
    monkeypatch.setenv("XENO_DEVICE_KEY", KEY)
    with UserStore("vic", limits=store_mod.Limits(retention_days=36500)) as s:
        assert s.schema_version() == store_mod.SCHEMA_VERSION
        assert s.query("SELECT query, feedback, observed FROM interactions") == [("q", 4, "{}")]


def test_a_failing_migration_leaves_the_old_schema(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with UserStore("hal") as s:
        put(s, "old")

    def broken(db: object) -> None:
        db.execute("ALTER TABLE episodes ADD COLUMN mood TEXT")  # type: ignore[attr-defined]
        raise RuntimeError("disk on fire")

    n = store_mod.SCHEMA_VERSION
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, broken])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", n + 1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        UserStore("hal")
    monkeypatch.undo()
    monkeypatch.setenv("XENO_HOME", str(home))
    monkeypatch.setenv("XENO_DEVICE_KEY", KEY)
    with UserStore("hal") as s:
        assert s.schema_version() == n
        assert descriptions(s) == ["old"]


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "x" * 200, 7])
def test_bad_user_ids_are_refused(home: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="user_id"):
        UserStore(bad)  # type: ignore[arg-type]


def test_limits_are_clear_errors(home: Path) -> None:
    with UserStore("ivy", limits=store_mod.Limits(max_text_chars=10, max_json_bytes=20)) as s:
        with pytest.raises(StoreLimitError, match="11 characters; the limit is 10"):
            s.check_text("query", "x" * 11)
        with pytest.raises(ValueError, match="query is empty"):
            s.check_text("query", "   ")
        with pytest.raises(StoreLimitError, match="bytes as JSON"):
            s.to_json("context", {"k": "v" * 50})
        with pytest.raises(ValueError, match="JSON-serializable"):
            s.to_json("context", {"k": object()})


def test_delete_shreds_the_key_and_files(home: Path) -> None:
    with UserStore("jo") as s:
        put(s, "bye")
    paths = UserPaths(home, "jo")
    copy = paths.database.read_bytes()
    assert delete_user_store("jo")
    assert not paths.dir.exists()
    # A surviving copy of the database no longer opens: its key is gone for good.
    paths.dir.mkdir(parents=True)
    paths.database.write_bytes(copy)
    with pytest.raises(StoreKeyError, match="missing"):
        UserStore("jo")


WRITER = textwrap.dedent(
    """
    import sys, time
    from client.assistant.store import UserStore
    s = UserStore("kim")
    i = 0
    while True:
        with s.transaction() as db:
            for j in range(20):
                db.execute(
                    "INSERT INTO episodes (event_type, description, context, ts) "
                    "VALUES ('batch', ?, '{}', ?)", (f"{i}:{j}:" + "y" * 500, time.time()))
        i += 1
        print(i, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.4, 0.9])
def test_sigkill_mid_write_keeps_every_committed_batch_whole(home: Path, delay: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    committed = 0
    deadline = time.monotonic() + 60
    started: float | None = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed = int(line)
        started = started or time.monotonic()
        if time.monotonic() - started > delay:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed > 0, "the writer never committed"
    with UserStore("kim") as s:
        rows = s.query("SELECT description FROM episodes")
        batches: dict[int, int] = {}
        for (d,) in rows:
            b = int(d.split(":")[0])
            batches[b] = batches.get(b, 0) + 1
        # Every batch the writer reported as committed is there, and no batch is torn.
        assert set(range(committed)) <= set(batches)
        assert set(batches.values()) == {20}
        assert s.query("PRAGMA integrity_check") == [("ok",)]
