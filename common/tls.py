"""TLS for every channel: server credentials, client channels, the peer's certificate.

The server, the device and the admin command all read their certificate files
through `read_pem`, so a missing, unreadable, group- or world-readable key, a
malformed certificate or a key that is not the certificate's stops each of them
before anything listens or connects, with the command to run instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from common.atrest import check_private_file
from common.certs import CertError, Identity, check_pair, identity, load_certificate

__all__ = [
    "client_channel",
    "is_loopback",
    "peer_identity",
    "read_pem",
    "server_credentials",
]


def read_pem(path: str, what: str, private: bool = False) -> bytes:
    """The file's bytes; a clear CertError when it is missing, unreadable or too open."""
    try:
        if private:
            check_private_file(path, what)
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(
            f"{what} {path} does not exist; create the project CA with "
            "`xeno-fl admin certs init DIR` and issue certificates with "
            "`xeno-fl admin certs issue DIR --server HOST | --device NAME | --admin NAME "
            "--role ROLE`"
        ) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise CertError(f"{what} {path} cannot be read: {exc.strerror}") from None


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> Any:
    """gRPC server credentials; with client_ca_file, client certificates are required (mTLS)."""
    if not cert_file or not key_file:
        raise CertError("TLS needs both --tls-cert and --tls-key")
    cert = read_pem(cert_file, "TLS certificate")
    key = read_pem(key_file, "TLS key", private=True)
    client_ca = read_pem(client_ca_file, "client CA certificate") if client_ca_file else None
    check_pair(cert, key, what=f"TLS certificate {cert_file}")
    if client_ca is not None:
        load_certificate(client_ca, f"client CA certificate {client_ca_file}")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def client_channel(
    address: str,
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    options: Sequence[tuple[str, Any]] = (),
    server_name: str = "",
) -> grpc.Channel:
    """A channel to address: TLS when ca_file is given, else plaintext.

    With cert_file and key_file the client presents its certificate (mTLS).
    """
    if not ca_file:
        if cert_file or key_file:
            raise CertError("a client certificate needs --tls-ca too (the server's CA)")
        return grpc.insecure_channel(address, options=list(options))
    ca = read_pem(ca_file, "CA certificate")
    load_certificate(ca, f"CA certificate {ca_file}")
    cert = key = None
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise CertError("a client certificate needs both --tls-cert and --tls-key")
        cert = read_pem(cert_file, "TLS certificate")
        key = read_pem(key_file, "TLS key", private=True)
        check_pair(cert, key, ca, what=f"TLS certificate {cert_file}")
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, creds, options=opts)


def peer_identity(context: Any) -> Identity | None:
    """Who the peer's verified client certificate names (None: no client certificate)."""
    try:
        auth = context.auth_context()
    except Exception:  # a context without transport details (in-process calls)
        return None
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    return identity(pem if isinstance(pem, bytes) else str(pem).encode())


def is_loopback(host: str) -> bool:
    """Whether host is a loopback address (where development runs without TLS)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
