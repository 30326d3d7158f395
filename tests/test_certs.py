"""common/certs.py: the project CA and the certificates it signs, checked by cryptography's
own verifier (an independent reference: x509.verification's path building)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given
from hypothesis import strategies as st

from common import certs
from common.certs import CertError, CertKind, Role

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.make_ca(now=NOW)


def _verify_server(ca: certs.Issued, leaf: certs.Issued, host: str, at: dt.datetime) -> None:
    store = Store([x509.load_pem_x509_certificate(ca.cert_pem)])
    verifier = PolicyBuilder().store(store).time(at).build_server_verifier(x509.DNSName(host))
    verifier.verify(x509.load_pem_x509_certificate(leaf.cert_pem), [])


def test_server_certificate_verifies_for_its_hosts_only(ca: certs.Issued) -> None:
    leaf = certs.issue(ca, CertKind.SERVER, "fl.example.com,10.0.0.7", now=NOW)
    _verify_server(ca, leaf, "fl.example.com", NOW + dt.timedelta(days=1))
    with pytest.raises(VerificationError):
        _verify_server(ca, leaf, "other.example.com", NOW + dt.timedelta(days=1))
    with pytest.raises(VerificationError):  # expired
        _verify_server(ca, leaf, "fl.example.com", NOW + dt.timedelta(days=400))
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.com"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_a_foreign_ca_does_not_verify(ca: certs.Issued) -> None:
    leaf = certs.issue(ca, CertKind.SERVER, "fl.example.com", now=NOW)
    with pytest.raises(VerificationError):
        _verify_server(certs.make_ca(now=NOW), leaf, "fl.example.com", NOW)


def test_device_and_admin_certificates_are_client_only_and_name_themselves(
    ca: certs.Issued,
) -> None:
    device = certs.issue(ca, CertKind.DEVICE, "phone-17", now=NOW)
    admin = certs.issue(ca, CertKind.ADMIN, "alice", role=Role.OPERATOR, now=NOW)
    for leaf in (device, admin):
        cert = x509.load_pem_x509_certificate(leaf.cert_pem)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        certs.check_pair(leaf.cert_pem, leaf.key_pem, ca.cert_pem, now=NOW)
    seen = certs.identity(device.cert_pem)
    serial = x509.load_pem_x509_certificate(device.cert_pem).serial_number
    assert seen == certs.Identity(
        CertKind.DEVICE, "phone-17", None, format(serial, "x"), NOW.replace(microsecond=0)
    )
    seen = certs.identity(admin.cert_pem)
    assert (seen.kind, seen.name, seen.role) == (CertKind.ADMIN, "alice", Role.OPERATOR)


def test_expiry_is_capped_by_the_ca_and_checked(ca: certs.Issued) -> None:
    leaf = certs.issue(ca, CertKind.DEVICE, "d", days=100_000, now=NOW)
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc
    short = certs.issue(ca, CertKind.DEVICE, "d", days=1, now=NOW)
    with pytest.raises(CertError, match=r"expired on .*certs issue"):
        certs.check_pair(short.cert_pem, short.key_pem, now=NOW + dt.timedelta(days=2))


def test_bad_input_gets_a_clear_error(ca: certs.Issued) -> None:
    leaf = certs.issue(ca, CertKind.DEVICE, "d", now=NOW)
    other = certs.issue(ca, CertKind.DEVICE, "e", now=NOW)
    with pytest.raises(CertError, match="does not belong to"):
        certs.check_pair(leaf.cert_pem, other.key_pem, now=NOW)
    with pytest.raises(CertError, match="not a PEM certificate"):
        certs.check_pair(b"garbage", leaf.key_pem, now=NOW)
    with pytest.raises(CertError, match="not an unencrypted PEM private key"):
        certs.check_pair(leaf.cert_pem, b"-----BEGIN PRIVATE KEY-----\nxx\n", now=NOW)
    with pytest.raises(CertError, match="not signed by this CA"):
        certs.check_pair(leaf.cert_pem, leaf.key_pem, certs.make_ca(now=NOW).cert_pem, now=NOW)
    with pytest.raises(CertError, match="needs --role"):
        certs.issue(ca, CertKind.ADMIN, "alice", now=NOW)
    with pytest.raises(CertError, match="needs --role"):
        certs.issue(ca, CertKind.DEVICE, "d", role=Role.ADMIN, now=NOW)
    with pytest.raises(CertError, match="not a host name"):
        certs.issue(ca, CertKind.SERVER, "bad host!", now=NOW)
    with pytest.raises(CertError, match="device name"):
        certs.issue(ca, CertKind.DEVICE, "../etc/passwd", now=NOW)
    with pytest.raises(ValueError, match="unknown role 'root'; roles are viewer, operator, admin"):
        certs.parse_role("root")
    with pytest.raises(CertError, match="CA has expired"):
        certs.issue(ca, CertKind.DEVICE, "d", now=NOW + dt.timedelta(days=4000))


@given(st.sampled_from(list(Role)), st.sampled_from(list(Role)))
def test_role_order_is_viewer_operator_admin(have: Role, need: Role) -> None:
    order = ["viewer", "operator", "admin"]
    assert have.allows(need) == (order.index(have.value) >= order.index(need.value))


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True))
def test_any_valid_device_name_round_trips(name: str) -> None:
    ca = _CA
    leaf = certs.issue(ca, CertKind.DEVICE, name, now=NOW)
    assert certs.identity(leaf.cert_pem).name == name


_CA = certs.make_ca(now=NOW)
