"""Encryption at rest: model blobs and device stores are sealed; missing or wrong keys are clear."""

from __future__ import annotations

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
    with pytest.raises(DataKeyError, match=r"under data key id .* configured key is id"):
        Store(db_url, Sealer(bytes(32))).load_version("m", 1)
    with pytest.raises(DataKeyError, match="data key"):
        Store(db_url).load_version("m", 1)


def test_a_substituted_plaintext_blob_is_refused(db_url: str) -> None:
    """The attacker with database access swaps in their own weights, unencrypted (they do
    not have the key), under the blob's address: the server refuses to load them."""
    import hashlib

    from sqlalchemy import update

    from server.store.models import ModelVersionRow

    key = Sealer(bytes(range(32)))
    store = Store(db_url, key)
    store.create_schema()
    store.create_model(
        "m", ModelSpec(), Manifest((TensorInfo("w", (8,)),)), "fedavg", np.zeros(8, np.float32)
    )
    evil = to_wire(np.full(8, 1e6, dtype=np.float32))
    digest = hashlib.sha256(evil).hexdigest()
    # Under the version's own blob address: the version's MAC still holds, the blob is refused.
    with store.session() as s, s.begin():
        s.execute(update(BlobRow).values(data=evil))
    with pytest.raises(DataKeyError, match="stored unencrypted although a data key"):
        store.load_version("m", 1)
    # Under its own address, the version pointed at it: the version's MAC fails first.
    with store.session() as s, s.begin():
        s.add(BlobRow(sha256=digest, size=len(evil), data=evil))
        s.execute(update(ModelVersionRow).values(blob_sha256=digest))
    with pytest.raises(DataKeyError, match="fails its MAC"):
        store.load_version("m", 1)
    store.close()


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


def test_first_start_creates_the_data_key_and_a_readable_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dataclasses import replace

    from common.atrest import SecretFileError
    from server.app import XenoServer
    from tests.conftest import FAST_SERVER

    monkeypatch.delenv("XENO_DATA_KEY")
    config = replace(FAST_SERVER, db=f"sqlite:///{tmp_path}/db/x.db", eval_data="none")
    with caplog.at_level("WARNING", logger="xeno.server.security"):
        XenoServer(config).start().stop(grace=0.1)
    key = tmp_path / "db" / "xeno.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert f"created the data key {key}" in caplog.text and "back it up" in caplog.text
    assert key.read_text() not in caplog.text
    XenoServer(config).start().stop(grace=0.1)  # the same key opens the same store
    key.chmod(0o640)
    with pytest.raises(SecretFileError, match=f"run `chmod 600 {key}`"):
        XenoServer(config)
