"""TLS and mTLS over real gRPC on loopback: who gets in, who is refused, and that rounds,
secure aggregation and a SIGKILL recovery run with TLS on."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import certs
from common.certs import CertError, CertKind, Role
from common.pb import admin_pb2, admin_pb2_grpc, federation_pb2_grpc
from common.pb import federation_pb2 as pb
from common.tls import client_channel
from server.store import Store

XENO = [sys.executable, "-m", "xeno.cli"]


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write(self, stem: str, issued: certs.Issued) -> tuple[str, str]:
        cert, key = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        key.chmod(0o600)
        return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("pki"))
    ca = certs.make_ca()
    (p.dir / "ca.crt").write_bytes(ca.cert_pem)
    p.write("server", certs.issue(ca, CertKind.SERVER, "localhost,127.0.0.1"))
    p.write("elsewhere", certs.issue(ca, CertKind.SERVER, "fl.example.com"))
    p.write("device-a", certs.issue(ca, CertKind.DEVICE, "device-a"))
    p.write("device-b", certs.issue(ca, CertKind.DEVICE, "device-b"))
    p.write("viewer", certs.issue(ca, CertKind.ADMIN, "vera", role=Role.VIEWER))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    p.write("expired", certs.issue(ca, CertKind.DEVICE, "old", days=1, now=past))
    foreign = certs.make_ca()
    (p.dir / "foreign-ca.crt").write_bytes(foreign.cert_pem)
    p.write("foreign", certs.issue(foreign, CertKind.DEVICE, "device-a"))
    p.write("foreign-server", certs.issue(foreign, CertKind.SERVER, "localhost,127.0.0.1"))
    return p


def _tls(pki: Pki, mtls: bool = False, stem: str = "server") -> dict[str, str]:
    out = {"tls_cert": pki.path(f"{stem}.crt"), "tls_key": pki.path(f"{stem}.key")}
    if mtls:
        out["tls_client_ca"] = pki.path("ca.crt")
    return out


def _raw_channel(address: str, ca: str, cert: str = "", key: str = "") -> grpc.Channel:
    """A channel built without our own checks: the attacker's (or a careless client's)."""
    creds = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(),
        Path(key).read_bytes() if key else None,
        Path(cert).read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, creds)


def _register(channel: grpc.Channel) -> pb.RegisterResponse:
    stub = federation_pb2_grpc.FederationStub(channel)
    return stub.Register(pb.RegisterRequest(), timeout=10)


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _register(channel)
    return info.value.code()


def test_tls_good_client_connects_bad_ones_are_refused(server_factory, pki: Pki) -> None:
    server = server_factory(eval_data="none", **_tls(pki))
    port = server.port
    with client_channel(f"localhost:{port}", pki.path("ca.crt")) as ok:
        assert _register(ok).device_id.startswith("dev-")
    with client_channel(f"127.0.0.1:{port}", pki.path("ca.crt")) as ok_ip:
        assert _register(ok_ip).device_id.startswith("dev-")
    # a CA that did not sign the server's certificate
    with client_channel(f"localhost:{port}", pki.path("foreign-ca.crt")) as wrong_ca:
        assert _refused(wrong_ca) == grpc.StatusCode.UNAVAILABLE
    # plaintext to the TLS port fails cleanly, and the server keeps serving
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        started = time.monotonic()
        assert _refused(plain) == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 10
    with client_channel(f"localhost:{port}", pki.path("ca.crt")) as ok:
        assert _register(ok).device_id.startswith("dev-")


def test_a_certificate_for_another_host_is_refused(server_factory, pki: Pki) -> None:
    server = server_factory(eval_data="none", **_tls(pki, stem="elsewhere"))
    with client_channel(f"127.0.0.1:{server.port}", pki.path("ca.crt")) as wrong_host:
        assert _refused(wrong_host) == grpc.StatusCode.UNAVAILABLE
    # the operator can name the host the certificate was issued for
    with client_channel(
        f"127.0.0.1:{server.port}", pki.path("ca.crt"), server_name="fl.example.com"
    ) as named:
        assert _register(named).device_id.startswith("dev-")


def test_mtls_refuses_missing_foreign_and_expired_client_certificates(
    server_factory, pki: Pki
) -> None:
    server = server_factory(eval_data="none", **_tls(pki, mtls=True))
    address = f"localhost:{server.port}"
    ca = pki.path("ca.crt")
    with _raw_channel(address, ca) as none:
        assert _refused(none) == grpc.StatusCode.UNAVAILABLE
    with _raw_channel(address, ca, pki.path("foreign.crt"), pki.path("foreign.key")) as foreign:
        assert _refused(foreign) == grpc.StatusCode.UNAVAILABLE
    with _raw_channel(address, ca, pki.path("expired.crt"), pki.path("expired.key")) as expired:
        assert _refused(expired) == grpc.StatusCode.UNAVAILABLE
    # our own client refuses to even try with an expired or mismatched certificate
    with pytest.raises(CertError, match="expired"):
        client_channel(address, ca, pki.path("expired.crt"), pki.path("expired.key"))
    with pytest.raises(CertError, match="does not belong"):
        client_channel(address, ca, pki.path("device-a.crt"), pki.path("device-b.key"))
    with client_channel(address, ca, pki.path("device-a.crt"), pki.path("device-a.key")) as good:
        assert _register(good).device_id.startswith("dev-")


def test_mtls_binds_a_device_to_its_certificate(server_factory, pki: Pki) -> None:
    """A stolen token is useless without the device's certificate; an admin certificate is
    no device's, and a device certificate is no admin's."""
    server = server_factory(eval_data="none", **_tls(pki, mtls=True))
    address = f"localhost:{server.port}"
    ca = pki.path("ca.crt")
    with (
        client_channel(address, ca, pki.path("device-a.crt"), pki.path("device-a.key")) as a,
        client_channel(address, ca, pki.path("device-b.crt"), pki.path("device-b.key")) as b,
        client_channel(address, ca, pki.path("viewer.crt"), pki.path("viewer.key")) as viewer,
    ):
        creds = _register(a)
        md = (("x-xeno-device-id", creds.device_id), ("authorization", f"Bearer {creds.token}"))
        request = pb.CheckInRequest(max_wait_ms=0)
        federation_pb2_grpc.FederationStub(a).CheckIn(request, metadata=md, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            federation_pb2_grpc.FederationStub(b).CheckIn(request, metadata=md, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not the device certificate this device registered with" in info.value.details()
        assert _refused(viewer) == grpc.StatusCode.PERMISSION_DENIED  # not a device cert
        # admin calls: an admin certificate carries its role; a device certificate is refused
        models = admin_pb2_grpc.AdminStub(viewer).ListModels(admin_pb2.ListModelsRequest())
        assert [m.name for m in models.models] == ["digits-mlp"]
        with pytest.raises(grpc.RpcError) as info:  # the certificate's role is a viewer's
            admin_pb2_grpc.AdminStub(viewer).Rollback(
                admin_pb2.RollbackRequest(model_name="digits-mlp", target_version=1)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "Rollback needs the role operator; vera has viewer" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            admin_pb2_grpc.AdminStub(a).ListModels(admin_pb2.ListModelsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    store = Store(server.config.db)
    (record,) = store.device_records()
    store.close()
    assert record.cert_name == "device-a"


def test_revoked_certificates_are_refused(server_factory, tmp_path: Path) -> None:
    """Revocation by name (every certificate of a device issued until then), by serial
    through the database while the server runs, and of an admin certificate; a
    certificate issued after a name's revocation is accepted."""
    own = Pki(tmp_path)  # a CA of its own: this test issues a certificate mid-way
    project = certs.make_ca()
    (tmp_path / "ca.crt").write_bytes(project.cert_pem)
    own.write("server", certs.issue(project, CertKind.SERVER, "localhost,127.0.0.1"))
    own.write("device-a", certs.issue(project, CertKind.DEVICE, "device-a"))
    own.write("device-b", certs.issue(project, CertKind.DEVICE, "device-b"))
    own.write("root", certs.issue(project, CertKind.ADMIN, "root", role=Role.ADMIN))
    own.write("ops", certs.issue(project, CertKind.ADMIN, "olga", role=Role.OPERATOR))
    server = server_factory(eval_data="none", revocation_refresh=0.2, **_tls(own, mtls=True))
    address, cafile = f"localhost:{server.port}", own.path("ca.crt")

    def channel(stem: str) -> grpc.Channel:
        return client_channel(address, cafile, own.path(f"{stem}.crt"), own.path(f"{stem}.key"))

    def check_in(ch: grpc.Channel, creds: pb.RegisterResponse) -> None:
        md = (("x-xeno-device-id", creds.device_id), ("authorization", f"Bearer {creds.token}"))
        federation_pb2_grpc.FederationStub(ch).CheckIn(
            pb.CheckInRequest(max_wait_ms=0), metadata=md, timeout=10
        )

    with channel("device-a") as a, channel("device-b") as b, channel("root") as root:
        creds_a, creds_b = _register(a), _register(b)
        check_in(a, creds_a)
        admin = admin_pb2_grpc.AdminStub(root)
        with channel("ops") as ops:  # revocation needs the role admin
            with pytest.raises(grpc.RpcError) as info:
                admin_pb2_grpc.AdminStub(ops).RevokeCertificate(
                    admin_pb2.RevokeCertificateRequest(device_name="device-a")
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            admin.RevokeCertificate(
                admin_pb2.RevokeCertificateRequest(device_name="device-a", serial="ab")
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        revoked = admin.RevokeCertificate(
            admin_pb2.RevokeCertificateRequest(device_name="device-a", reason="phone lost")
        )
        assert (revoked.kind, revoked.name) == ("device", "device-a")
        with pytest.raises(grpc.RpcError) as info:  # at once, on the next call
            check_in(a, creds_a)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "device device-a" in info.value.details()
        assert "was revoked: phone lost" in info.value.details()
        assert _refused(a) == grpc.StatusCode.UNAUTHENTICATED  # nor can it register again
        check_in(b, creds_b)  # other devices are untouched
    # the device itself stops (it does not register again and again with the revoked certificate)
    from client.runtime import ClientConfig, DeviceClient

    device = DeviceClient(
        ClientConfig(
            server=address,
            state_dir=str(tmp_path / "revoked-device"),
            tls_ca=cafile,
            tls_cert=own.path("device-a.crt"),
            tls_key=own.path("device-a.key"),
            tls_server_name="localhost",
        ),
        None,
    )
    assert device.run() == 2
    # re-provisioned: a certificate issued for the name after the revocation is accepted
    # (certificate times have whole seconds: one issued in the revocation's second is not)
    time.sleep(1.1)
    own.write("device-a2", certs.issue(project, CertKind.DEVICE, "device-a"))
    with channel("device-a2") as a2:
        check_in(a2, _register(a2))
    # by serial, through the database while the server runs (--revocation-refresh 0.2 s)
    out = subprocess.run(
        [
            *XENO,
            "admin",
            "--db",
            server.config.db,
            "certs",
            "revoke",
            "--cert",
            own.path("device-b.crt"),
            "--reason",
            "key leaked",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    serial_b = certs.serial_hex(certs.load_certificate(Path(own.path("device-b.crt")).read_bytes()))
    assert f"revoked certificate serial {serial_b}" in out.stdout
    with channel("device-b") as b:
        deadline = time.monotonic() + 10
        while True:
            try:
                check_in(b, creds_b)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert f"serial {serial_b}) was revoked: key leaked" in (err.details() or "")
                break
            assert time.monotonic() < deadline, "the revocation was not picked up"
            time.sleep(0.1)
    # an admin certificate: revoked by serial over the API, then refused on the admin API
    root_serial = certs.serial_hex(certs.load_certificate(Path(own.path("root.crt")).read_bytes()))
    with channel("root") as root:
        admin = admin_pb2_grpc.AdminStub(root)
        listed = admin.ListRevokedCertificates(admin_pb2.ListRevokedCertificatesRequest())
        assert [(r.kind, r.name, r.serial) for r in listed.revoked] == [
            ("device", "device-a", ""),
            ("", "", serial_b),
        ]
        admin.RevokeCertificate(admin_pb2.RevokeCertificateRequest(serial=root_serial.upper()))
        with pytest.raises(grpc.RpcError) as info:
            admin.ListModels(admin_pb2.ListModelsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    store = Store(server.config.db)
    from server.store import audit_entries

    revocations = [e.target for e in audit_entries(store) if e.action == "certificate.revoked"]
    store.close()
    assert revocations == ["device device-a", f"serial {serial_b}", f"serial {root_serial}"]


def test_server_refuses_bad_certificate_files_before_writing_anything(
    tmp_path: Path, pki: Pki
) -> None:
    from dataclasses import replace

    from server.app import XenoServer
    from tests.conftest import FAST_SERVER

    db = tmp_path / "never.db"
    base = replace(FAST_SERVER, db=f"sqlite:///{db}")
    (tmp_path / "garbage.crt").write_text("not a certificate")
    open_key = tmp_path / "open.key"
    open_key.write_bytes(Path(pki.path("server.key")).read_bytes())
    open_key.chmod(0o644)
    cases = [
        (
            {"tls_cert": str(tmp_path / "missing.crt"), "tls_key": pki.path("server.key")},
            "does not exist; create the project CA with `xeno-fl admin certs init DIR`",
        ),
        (
            {"tls_cert": str(tmp_path / "garbage.crt"), "tls_key": pki.path("server.key")},
            "not a PEM certificate",
        ),
        (
            {"tls_cert": pki.path("server.crt"), "tls_key": pki.path("device-a.key")},
            "does not belong to",
        ),
        ({"tls_cert": pki.path("expired.crt"), "tls_key": pki.path("expired.key")}, "expired"),
        (
            {"tls_cert": pki.path("server.crt"), "tls_key": str(open_key)},
            f"run `chmod 600 {open_key}`",
        ),
        ({"tls_cert": pki.path("server.crt")}, "needs both --tls-cert and --tls-key"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError) as info:  # CertError, SecretFileError
            XenoServer(replace(base, **overrides))
        assert message in str(info.value)
    assert not db.exists()


def test_non_loopback_without_tls_is_refused_with_what_to_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [*XENO, "server", "--host", "0.0.0.0", "--port", "0", "--db", f"sqlite:///{tmp_path}/x.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without TLS" in out.stderr
    assert "xeno-fl admin certs init certs" in out.stderr and "--insecure" in out.stderr
    assert not (tmp_path / "x.db").exists()


def test_secure_aggregation_round_over_mtls(server_factory, device_threads, pki: Pki) -> None:
    server = server_factory(
        rounds=1,
        secagg=True,
        clients_per_round=3,
        min_clients=3,
        eval_data="none",
        **_tls(pki, mtls=True),
    )

    class _Named:  # devices dial the name on the server's certificate
        address = f"localhost:{server.port}"
        config = server.config

    started = [
        device_threads(
            _Named,
            1,
            num_partitions=3,
            tls_ca=pki.path("ca.crt"),
            tls_cert=pki.path(f"device-{n}.crt"),
            tls_key=pki.path(f"device-{n}.key"),
        )[0]
        for n in ("a", "b", "a")
    ]
    deadline = time.monotonic() + 90
    while not server.coordinator.finished and time.monotonic() < deadline:
        time.sleep(0.2)
    for d in started:
        d.halt()
    rounds = server.store.list_rounds("digits-mlp")
    assert [(r.status, r.participants) for r in rounds] == [("completed", 3)]
    assert server.coordinator.last_secagg_stats is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(address: str, ca: str, cert: str, key: str) -> bool:
    with client_channel(address, ca, cert, key) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                .status
            )
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_server_killed_mid_round_recovers_over_mtls(tmp_path: Path, pki: Pki) -> None:
    db = f"sqlite:///{tmp_path}/fl.db"
    port = _free_port()
    address = f"localhost:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XENO_LOG_LEVEL": "warning"}
    tls = [
        "--tls-cert",
        pki.path("server.crt"),
        "--tls-key",
        pki.path("server.key"),
        "--tls-client-ca",
        pki.path("ca.crt"),
    ]

    def server(rounds: int, crash: str | None) -> subprocess.Popen[str]:
        e = {k: v for k, v in env.items() if k != "XENO_CRASH_AT"}
        if crash:
            e["XENO_CRASH_AT"] = crash
        return subprocess.Popen(
            [
                *XENO,
                "server",
                "--port",
                str(port),
                "--db",
                db,
                "--rounds",
                str(rounds),
                "--clients-per-round",
                "3",
                "--min-clients",
                "3",
                "--local-epochs",
                "1",
                "--selection-window",
                "1",
                "--metrics-port",
                "-1",
                *tls,
            ],
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def device(i: int, name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                *XENO,
                "client",
                "--server",
                address,
                "--partition",
                str(i),
                "--num-partitions",
                "3",
                "--state-dir",
                str(tmp_path / f"dev{i}"),
                "--max-backoff",
                "1",
                "--tls-ca",
                pki.path("ca.crt"),
                "--tls-cert",
                pki.path(f"{name}.crt"),
                "--tls-key",
                pki.path(f"{name}.key"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = server(3, "unmask")
    clients = [device(i, n) for i, n in enumerate(("device-a", "device-b", "device-a"))]
    restarted = None
    try:
        out, _ = first.communicate(timeout=120)
        assert first.returncode == -signal.SIGKILL, out
        restarted = server(2, None)
        probe = (pki.path("ca.crt"), pki.path("device-a.crt"), pki.path("device-a.key"))
        while not _healthy(address, *probe):
            assert restarted.poll() is None, restarted.communicate()[0]
            time.sleep(0.2)
        for c in clients:
            c_out, _ = c.communicate(timeout=150)
            assert c.returncode == 0, c_out
        out, _ = restarted.communicate(timeout=60)
        assert restarted.returncode == 0, out
    finally:
        for p in [first, *clients, *([restarted] if restarted else [])]:
            p.kill()
    store = Store(db)
    rounds = store.list_rounds("digits-mlp")
    store.close()
    assert sum(r.status == "completed" for r in rounds) >= 2
    assert any("restarted" in r.failure_reason for r in rounds if r.status == "failed")
