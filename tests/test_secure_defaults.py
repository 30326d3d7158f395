"""Secure defaults: exposure checks, secrets from files, token expiry and revocation,
keys created on first start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from common.atrest import SecretFileError
from common.certs import Role
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc
from server import registry as registry_module
from server.registry import DeviceRegistry
from server.security import Exposure, Principal, add_admin_token, check_exposure, parse_admin_tokens
from server.store import Store

XENO = [sys.executable, "-m", "xeno.cli"]

SAFE = Exposure(
    host="0.0.0.0",
    tls=True,
    mtls=False,
    insecure=False,
    enrollment_key=True,
    admin_credential=True,
    metrics_host="127.0.0.1",
    metrics_on=True,
)


def test_exposure_rules() -> None:
    from dataclasses import replace

    check_exposure(SAFE)
    # loopback stays zero-configuration
    check_exposure(
        replace(SAFE, host="127.0.0.1", tls=False, enrollment_key=False, admin_credential=False)
    )
    check_exposure(replace(SAFE, host="::1", tls=False, admin_credential=False))
    with pytest.raises(ValueError, match=r"(?s)without TLS.*xeno-fl admin certs init"):
        check_exposure(replace(SAFE, tls=False))
    check_exposure(replace(SAFE, tls=False, insecure=True))  # a proxy terminates TLS
    with pytest.raises(ValueError, match=r"open enrollment.*--enrollment-key-file"):
        check_exposure(replace(SAFE, enrollment_key=False))
    with pytest.raises(ValueError, match=r"open admin API.*xeno-fl admin token add"):
        check_exposure(replace(SAFE, admin_credential=False))
    # mTLS: the certificate is the enrollment and the admin credential
    check_exposure(replace(SAFE, mtls=True, enrollment_key=False, admin_credential=False))


def test_admin_token_file_lines_and_bad_lines(tmp_path: Path) -> None:
    tokens = parse_admin_tokens(
        "# operators\nalice operator " + "a" * 20 + "\n" + "b" * 20 + "\n\nvic viewer " + "c" * 20
    )
    assert tokens == {
        "a" * 20: Principal("alice", Role.OPERATOR),
        "b" * 20: Principal("admin", Role.ADMIN),
        "c" * 20: Principal("vic", Role.VIEWER),
    }
    with pytest.raises(ValueError, match="line 1: unknown role 'root'; roles are viewer"):
        parse_admin_tokens("bob root " + "d" * 20)
    with pytest.raises(ValueError, match="line 1: a token needs at least 16 characters"):
        parse_admin_tokens("short")
    with pytest.raises(ValueError, match="line 2: expected TOKEN or NAME ROLE TOKEN"):
        parse_admin_tokens("e" * 20 + "\na b c d")
    path = tmp_path / "admin.tokens"
    token = add_admin_token(path, "alice", Role.OPERATOR)
    assert path.stat().st_mode & 0o777 == 0o600
    assert parse_admin_tokens(path.read_text()) == {token: Principal("alice", Role.OPERATOR)}
    with pytest.raises(ValueError, match="already has a credential named 'alice'"):
        add_admin_token(path, "alice", Role.ADMIN)


def test_secrets_come_from_owner_only_files(server_factory, tmp_path: Path) -> None:
    key_file = tmp_path / "enroll.key"
    key_file.write_text("letmein-from-a-file\n")
    key_file.chmod(0o600)
    server = server_factory(enrollment_key_file=str(key_file), eval_data="none")
    with grpc.insecure_channel(server.address) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(pb.RegisterRequest(enrollment_key="guess"), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.Register(pb.RegisterRequest(enrollment_key="letmein-from-a-file"), timeout=10)
    key_file.chmod(0o644)
    with pytest.raises(SecretFileError, match=f"run `chmod 600 {key_file}`"):
        server_factory(enrollment_key_file=str(key_file))
    with pytest.raises(SecretFileError, match="does not exist"):
        server_factory(admin_token_file=str(tmp_path / "missing"))


def test_secret_flags_warn_that_they_show_in_process_listings(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *XENO,
            "server",
            "--host",
            "0.0.0.0",
            "--admin-token",
            "x" * 20,
            "--db",
            f"sqlite:///{tmp_path}/x.db",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--admin-token shows in process listings" in out.stderr
    assert "x" * 20 not in out.stderr + out.stdout
    assert out.returncode == 2 and "without TLS" in out.stderr


def _identity() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_tokens_expire_unless_used_and_renewals_are_stored(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(registry_module.time, "time", lambda: now[0])
    store = Store(db_url)
    store.create_schema()
    registry = DeviceRegistry(store, token_ttl_s=100.0)
    idle, idle_token, _ = registry.register("", {})
    busy, busy_token, _ = registry.register("", {})
    for _ in range(6):  # busy checks in every 30 s for 180 s: renewed, still valid
        now[0] += 30
        assert registry.authenticate(busy, busy_token)
    assert not registry.authenticate(idle, idle_token)  # 180 s unused > 100 s
    registry.close()  # the renewal writes are done
    restarted = DeviceRegistry(store, token_ttl_s=100.0)
    assert restarted.authenticate(busy, busy_token)  # the renewal survived a restart
    assert not restarted.authenticate(idle, idle_token)
    restarted.close()
    store.close()


def test_registering_again_revokes_the_old_token(server_factory) -> None:
    server = server_factory(eval_data="none")
    identity = _identity()
    with grpc.insecure_channel(server.address) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        old = stub.Register(pb.RegisterRequest(identity_public_key=identity), timeout=10)
        other = stub.Register(pb.RegisterRequest(identity_public_key=_identity()), timeout=10)
        new = stub.Register(pb.RegisterRequest(identity_public_key=identity), timeout=10)

        def check_in(r: pb.RegisterResponse) -> grpc.StatusCode:
            md = (("x-xeno-device-id", r.device_id), ("authorization", f"Bearer {r.token}"))
            try:
                stub.CheckIn(pb.CheckInRequest(max_wait_ms=0), metadata=md, timeout=10)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert check_in(old) == grpc.StatusCode.UNAUTHENTICATED
        assert check_in(new) == grpc.StatusCode.OK
        assert check_in(other) == grpc.StatusCode.OK  # another device is untouched
    revoked = {r.device_id for r in server.store.device_records() if r.revoked_at}
    assert revoked == {old.device_id}
    restarted = DeviceRegistry(server.store)
    assert not restarted.authenticate(old.device_id, old.token)
    restarted.close()


def test_a_device_creates_its_key_in_its_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.runtime import ClientConfig, DeviceClient

    monkeypatch.delenv("XENO_DEVICE_KEY")
    state = tmp_path / "device"
    client = DeviceClient(ClientConfig(server="127.0.0.1:1", state_dir=str(state)), None)
    client.close()
    key = state / "device.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o604)
    with pytest.raises(SecretFileError, match="chmod 600"):
        DeviceClient(ClientConfig(server="127.0.0.1:1", state_dir=str(state)), None)


@pytest.mark.slow
def test_bad_security_input_says_what_to_run_next_and_writes_nothing(tmp_path: Path) -> None:
    """Certificate files missing, malformed or not matching their key (device and admin
    command), a role that does not exist, an audit chain broken at its first row."""
    from common import certs
    from common.certs import CertKind

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*XENO, *args], capture_output=True, text=True, timeout=180, cwd=tmp_path
        )
        assert out.returncode != 0, out
        return out

    ca = certs.make_ca()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    for stem, name in (("admin", "alice"), ("other", "bob")):
        issued = certs.issue(ca, CertKind.ADMIN, name, role=Role.VIEWER)
        (tmp_path / f"{stem}.crt").write_bytes(issued.cert_pem)
        (tmp_path / f"{stem}.key").write_bytes(issued.key_pem)
        (tmp_path / f"{stem}.key").chmod(0o600)
    before = sorted(p.name for p in tmp_path.iterdir())

    # a device with a missing CA file stops before it creates its key or state folder
    device = run(
        "client",
        "--server",
        "127.0.0.1:1",
        "--tls-ca",
        "missing.crt",
        "--state-dir",
        "dev",
        "--partition",
        "0",
        "--num-partitions",
        "2",
    )
    assert "CA certificate missing.crt does not exist" in device.stderr
    assert "xeno-fl admin certs init DIR" in device.stderr
    admin = ["admin", "--server", "127.0.0.1:1", "--tls-ca"]
    malformed = run(*admin, "garbage.crt", "models")
    assert "garbage.crt is not a PEM certificate; issue one with" in malformed.stderr
    mismatched = run(
        *admin, "ca.crt", "--tls-cert", "admin.crt", "--tls-key", "other.key", "models"
    )
    assert "does not belong to" in mismatched.stderr
    assert "issue both again with `xeno-fl admin certs issue`" in mismatched.stderr
    # a role that does not exist
    token = run("admin", "token", "add", "admin.tokens", "bob", "--role", "root")
    init = subprocess.run(
        [*XENO, "admin", "certs", "init", "pki"], capture_output=True, timeout=120, cwd=tmp_path
    )
    assert init.returncode == 0
    before = sorted([*before, "pki"])
    issue = run("admin", "certs", "issue", "pki", "--admin", "bob", "--role", "root")
    for out in (token, issue):
        assert "unknown role 'root'; roles are viewer, operator, admin" in out.stderr
        assert "run the command again with one of them (e.g. --role viewer)" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no token file, no dev/
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == ["ca.crt", "ca.key"]
    # an audit chain broken at its first row
    url = f"sqlite:///{tmp_path}/a.db"
    store = Store(url)
    store.create_schema()
    store.add_device("dev-a", "a" * 64, {})
    store.add_device("dev-b", "b" * 64, {})
    from sqlalchemy import text

    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 1"))
    store.close()
    broken = run("admin", "--db", url, "audit", "verify")
    assert broken.returncode == 1
    assert "audit log BROKEN at row 1: row 1 is missing (deleted)" in broken.stderr
    assert "Nothing was changed. Next: inspect the rows around it with" in broken.stderr
