"""Encryption at rest: model blobs and device stores are sealed; missing or wrong keys are clear."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from client.storage import Credentials, IdentityStore, LocalStore
from common.atrest import DataKeyError, Sealer, load_key, write_new_key
from common.models import ModelSpec
from common.tensors import Manifest, TensorInfo, to_wire
from server.store import Store
from server.store.models import BlobRow


def test_model_blobs_are_sealed_and_need_the_right_key(db_url: str) -> None:
    weights = np.arange(8, dtype=np.float32)
    store = Store(db_url, Sealer(bytes(range(32))))
    store.create_schema()
    store.create_model("m", ModelSpec(), Manifest((TensorInfo("w", (8,)),)), "fedavg", weights)
    with store.session() as s:
        [raw] = s.scalars(select(BlobRow.data)).all()
    assert to_wire(weights) not in bytes(raw)  # not in the clear
    np.testing.assert_array_equal(store.load_version("m", 1), weights)
    store.close()
    with pytest.raises(DataKeyError, match="wrong"):
        Store(db_url, Sealer(bytes(32))).load_version("m", 1)
    with pytest.raises(DataKeyError, match="data key"):
        Store(db_url).load_version("m", 1)


def test_device_store_is_sealed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "dev", Sealer(bytes(range(32))))
    store.save_credentials(Credentials("srv:1", "dev-1", "tok-secret", 3))
    identity = IdentityStore(store)
    identity.load_or_create()
    for name in ("credentials.json", "identity.key"):
        assert b"tok-secret" not in (tmp_path / "dev" / name).read_bytes()
    assert store.load_credentials("srv:1") == Credentials("srv:1", "dev-1", "tok-secret", 3)
    wrong = LocalStore(tmp_path / "dev", Sealer(bytes(32)))
    with pytest.raises(DataKeyError, match="wrong"):
        wrong.load_credentials("srv:1")


def test_keys_from_env_or_file_with_clear_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("XENO_TEST_KEY", raising=False)
    with pytest.raises(DataKeyError, match="keygen"):
        load_key("", "XENO_TEST_KEY")
    with pytest.raises(DataKeyError, match="does not exist"):
        load_key(str(tmp_path / "missing.key"), "XENO_TEST_KEY")
    path = tmp_path / "k.key"
    write_new_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600 and len(
        load_key(str(path), "XENO_TEST_KEY")
    ) == 32
    monkeypatch.setenv("XENO_TEST_KEY", "not-hex")
    with pytest.raises(DataKeyError, match="64 hexadecimal"):
        load_key(str(path), "XENO_TEST_KEY")


def test_server_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "XENO_DATA_KEY"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xeno.cli",
            "server",
            "--port",
            "0",
            "--db",
            f"sqlite:///{tmp_path}/x.db",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    assert "no data key" in out.stderr and "keygen" in out.stderr
