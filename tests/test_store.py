"""Storage on SQLite and PostgreSQL: migrations, the ORM in sync with them, concurrent writers."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from common.models import ModelSpec
from common.tensors import Manifest, TensorInfo
from server.store import Store

MANIFEST = Manifest((TensorInfo("w", (4,)),))


def test_upgrade_from_the_first_migration_keeps_the_data(db_url: str) -> None:
    store = Store(db_url)
    store.migrate("0001")
    assert store.schema_revision() == "0001"
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (id, token_sha256, labels, created_at) "
                "VALUES ('dev-old', :digest, '{}', :now)"
            ),
            {"digest": "a" * 64, "now": now},
        )
    store.create_schema()  # what `xeno-fl server` does on start
    assert store.schema_revision() == _head()
    assert store.device_credentials() == {"dev-old": ("a" * 64, None)}
    # Devices from before stored indices get theirs: their order of registration.
    assert [r.enrollment_index for r in store.device_records()] == [0]
    assert store.privacy_ledger("any") == []  # the ledger table exists, empty
    # the new column works
    store.add_device("dev-new", "b" * 64, {}, identity_public_key=b"k" * 32)
    assert store.device_credentials()["dev-new"] == ("b" * 64, b"k" * 32)
    store.close()


def test_orm_models_match_the_migrations(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from server.store.models import Base

    store = Store(db_url)
    store.create_schema()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    store.close()
    assert diff == [], f"ORM models and migrations differ; add a migration: {diff}"


def _store_with_round(db_url: str) -> tuple[Store, str]:
    store = Store(db_url)
    store.create_schema()
    store.create_model("m", ModelSpec("mlp", {}), MANIFEST, "fedavg", np.zeros(4, np.float32))
    store.start_round("m", "round-1", 1, 1, 2)
    return store, "round-1"


def test_two_workers_completing_one_round_create_one_version(db_url: str) -> None:
    """On PostgreSQL the row lock serializes them; the loser is refused, nothing is doubled."""
    first, round_id = _store_with_round(db_url)
    second = Store(db_url)
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def complete(store: Store, value: float) -> None:
        barrier.wait()
        try:
            outcomes.append(
                store.complete_round("m", round_id, np.full(4, value, np.float32), {}, 1.0, [])
            )
        except Exception as exc:
            outcomes.append(exc)

    threads = [
        threading.Thread(target=complete, args=(s, v)) for s, v in ((first, 1.0), (second, 2.0))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    versions = [o for o in outcomes if isinstance(o, int)]
    assert versions == [2], outcomes
    assert [v.version for v in first.list_versions("m")] == [1, 2]
    assert first.get_model("m").current_version == 2
    [rnd] = first.list_rounds("m")
    assert rnd.status == "completed" and rnd.result_version == 2
    first.close()
    second.close()


def test_blob_round_trip_and_versions(db_url: str) -> None:
    store, round_id = _store_with_round(db_url)
    weights = np.arange(4, dtype=np.float32)
    assert store.complete_round("m", round_id, weights, {"accuracy": 0.5}, 1.0, []) == 2
    np.testing.assert_array_equal(store.load_version("m", 2), weights)
    assert store.list_versions("m")[1].metrics["accuracy"] == 0.5
    with pytest.raises(KeyError):
        store.load_version("m", 7)
    store.close()


@pytest.mark.slow
def test_simulate_runs_on_this_database(db_url: str, tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    if db_url.startswith("sqlite"):
        pytest.skip("the SQLite simulation is covered in tests/test_cli.py")
    report = tmp_path / "r.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xeno.cli",
            "simulate",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--db",
            db_url,
            "--report",
            str(report),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = json.loads(report.read_text())["rounds"]
    assert [r["version"] for r in rounds] == [2, 3]
    store = Store(db_url)
    assert store.schema_revision() == _head()
    assert [r.status for r in store.list_rounds("digits-mlp")] == ["completed", "completed"]
    store.close()


def test_head_revision_read_from_the_files_is_alembics_head() -> None:
    """create_schema skips Alembic (0.8 s of a restart) when the database is at this head."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from server.store import _head_revision

    config = Config()
    config.set_main_option(
        "script_location", str(Path(__file__).resolve().parent.parent / "server/store/migrations")
    )
    assert _head_revision() == ScriptDirectory.from_config(config).get_current_head()


def test_the_server_imports_without_torch(tmp_path: Path) -> None:
    """Torch (2-9 s of a restart) loads after the port is up, for evaluation only.

    Also a restart on an existing database (a new model needs torch for its first
    weights): defining the models once imported torch to size an MLP, a second of CPU
    before SERVING.
    """
    import subprocess
    import sys

    start = (
        "import os, sys; os.environ['XENO_DATA_KEY'] = '11' * 32; "
        "from server.app import ServerConfig, XenoServer; "
        f"cfg = ServerConfig(port=0, db='sqlite:///{tmp_path}/s.db', metrics_port=-1, "
        "eval_data='none', params=50000); XenoServer(cfg).start().stop(0.1); "
    )
    subprocess.run([sys.executable, "-c", start], check=True, timeout=120)  # creates it
    code = (
        "import sys; import server.app; import xeno.cli; xeno.cli.build_parser('server'); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        + start
        + "assert 'torch' not in sys.modules, 'torch imported by the restart'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _head() -> str:
    """The newest migration (exactly one head)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import server.store

    config = Config()
    config.set_main_option(
        "script_location", str(Path(server.store.__file__).parent / "migrations")
    )
    (head,) = ScriptDirectory.from_config(config).get_heads()
    return str(head)
