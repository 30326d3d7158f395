"""Project certificates: a CA and the server, device and admin certificates it signs.

Pure functions over PEM bytes (no files, no clock unless asked): `make_ca`
creates a self-signed project CA; `issue` signs a participant's certificate;
`check_pair` and `load_certificate` turn a missing, malformed, expired or
mismatched certificate into a `CertError` that says what to run instead;
`identity` reads back who a certificate names. The files and their modes are
the application layer's (xeno/cli.py `admin certs`).

A participant's subject is CN=<name>, OU=<kind> (server, device, admin) and,
for an admin, TITLE=<role>. Server certificates carry their host names as
subjectAltName and the serverAuth usage; device and admin certificates the
clientAuth usage, so one kind cannot stand in for another in a TLS handshake.
Keys are ECDSA P-256 (small and fast to handshake).
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertError",
    "CertKind",
    "Identity",
    "Issued",
    "Role",
    "check_pair",
    "identity",
    "issue",
    "load_certificate",
    "make_ca",
    "parse_role",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")


class CertError(ValueError):
    """A certificate or key is missing, malformed, expired, or does not match."""


class CertKind(enum.StrEnum):
    SERVER = "server"
    DEVICE = "device"
    ADMIN = "admin"


class Role(enum.StrEnum):
    """What an admin credential may do; each role may do everything of the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise ValueError(
            f"unknown role {text!r}; roles are {', '.join(r.value for r in Role)}: run the "
            "command again with one of them (e.g. --role viewer)"
        ) from None


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Identity:
    """Who a participant certificate names."""

    kind: CertKind | None
    name: str
    role: Role | None = None
    # The certificate's serial number (lowercase hex) and when it was issued (our
    # certificates are valid from ISSUE_BACKDATE before that): what revocation checks.
    serial: str = ""
    issued_at: dt.datetime | None = None


# Certificates are valid from a little before they are issued, for clocks that lag.
ISSUE_BACKDATE = dt.timedelta(minutes=5)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(
    name: str = "xeno-fl project CA", days: int = 3650, now: dt.datetime | None = None
) -> Issued:
    """A new self-signed CA that may sign participant certificates (not other CAs)."""
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - ISSUE_BACKDATE)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _check_name(kind: CertKind, name: str) -> None:
    if kind is CertKind.SERVER:
        for host in name.split(","):
            if not _is_ip(host) and not _HOST.match(host):
                raise CertError(f"{host!r} is not a host name or IP address")
    elif not _NAME.match(name):
        raise CertError(
            f"{kind.value} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def issue(
    ca: Issued,
    kind: CertKind,
    name: str,
    *,
    role: Role | None = None,
    days: int = 365,
    now: dt.datetime | None = None,
) -> Issued:
    """A certificate of `kind` for `name`, signed by the CA.

    A server's name is its host names and IP addresses, comma-separated (the
    first is the common name). An admin certificate needs a role.
    """
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    _check_name(kind, name)
    if (kind is CertKind.ADMIN) != (role is not None):
        raise CertError("an admin certificate needs --role (viewer, operator or admin)")
    ca_cert = load_certificate(ca.cert_pem, "CA certificate")
    ca_key = _load_key(ca.key_pem, "CA key")
    _require_match(ca_cert, ca_key, "CA certificate", "CA key")
    start = _now(now)
    if start > ca_cert.not_valid_after_utc:
        raise CertError(
            "the project CA has expired; create a new one with `xeno-fl admin certs init DIR`"
        )
    not_after = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    names = name.split(",")
    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind.value),
    ]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.TITLE, role.value))
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if kind is CertKind.SERVER
        else (ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - ISSUE_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if kind is CertKind.SERVER:
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def load_certificate(pem: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertError(
            f"{what} is not a PEM certificate; issue one with `xeno-fl admin certs issue`"
        ) from None


def _load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise CertError(
            f"{what} is not an unencrypted PEM private key; issue a certificate and key "
            "with `xeno-fl admin certs issue`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{what} is not an ECDSA key (xeno-fl admin certs issues P-256 keys)")
    return key


def _require_match(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_what: str, key_what: str
) -> None:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != (
        key.public_key().public_numbers()
    ):
        raise CertError(
            f"{key_what} does not belong to {cert_what}: give the key issued with that "
            "certificate (or issue both again with `xeno-fl admin certs issue`)"
        )


def check_pair(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes | None = None,
    now: dt.datetime | None = None,
    what: str = "certificate",
) -> x509.Certificate:
    """The certificate, checked: it parses, matches its key, is valid now, is the CA's.

    The CA is checked only when ca_pem is given.
    """
    cert = load_certificate(cert_pem, what)
    key = _load_key(key_pem, f"the key of the {what}")
    _require_match(cert, key, f"the {what}", "the key")
    moment = _now(now)
    if moment > cert.not_valid_after_utc:
        raise CertError(
            f"the {what} expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue a new one with "
            "`xeno-fl admin certs issue`"
        )
    if moment < cert.not_valid_before_utc:
        raise CertError(f"the {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if ca_pem is not None:
        ca = load_certificate(ca_pem, "CA certificate")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CertError(f"the {what} was not signed by this CA") from None
    return cert


def identity(cert: x509.Certificate | bytes) -> Identity:
    """Kind, name and role a participant certificate names (kind None: not one of ours)."""
    if isinstance(cert, bytes):
        cert = load_certificate(cert)

    def first(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        value = values[0].value if values else ""
        return value if isinstance(value, str) else value.decode(errors="replace")

    try:
        kind: CertKind | None = CertKind(first(NameOID.ORGANIZATIONAL_UNIT_NAME))
    except ValueError:
        kind = None
    role_text = first(NameOID.TITLE)
    role = Role(role_text) if role_text in {r.value for r in Role} else None
    return Identity(
        kind,
        first(NameOID.COMMON_NAME),
        role if kind is CertKind.ADMIN else None,
        serial_hex(cert),
        cert.not_valid_before_utc + ISSUE_BACKDATE,
    )
