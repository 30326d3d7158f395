"""What the server needs before it listens: secrets, admin credentials, safe exposure.

Secrets come from files (owner-only) or environment variables; a flag value
works but shows in process listings (the CLI warns). Off loopback the server
refuses to start without TLS, without a way to keep strangers from enrolling
(an enrollment key or mTLS) and without an admin credential, and says what to
run instead; on loopback it stays zero-configuration for development.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from common.atrest import check_private_file, read_secret, resolve_key
from common.certs import Role, parse_role
from common.tls import is_loopback

log = logging.getLogger("xeno.server.security")

__all__ = [
    "ADMIN_RPC_ROLES",
    "Exposure",
    "Principal",
    "add_admin_token",
    "check_exposure",
    "parse_admin_tokens",
    "read_secret",
    "required_role",
    "resolve_data_key",
]


# The least role each Admin RPC needs. Every RPC of the Admin service must be here
# (tests/test_roles.py fails otherwise); an RPC missing at run time is refused to all.
ADMIN_RPC_ROLES: dict[str, Role] = {
    # viewer: read models, versions, rounds, the privacy report, metrics, alerts, A/B results
    "ListModels": Role.VIEWER,  # with each model's task, settings and pause state
    "ListVersions": Role.VIEWER,
    "GetVersion": Role.VIEWER,
    "CompareVersions": Role.VIEWER,
    "GetRoundHistory": Role.VIEWER,
    "GetPrivacyReport": Role.VIEWER,
    "ListAlerts": Role.VIEWER,
    "GetTrend": Role.VIEWER,
    "ListAbTests": Role.VIEWER,
    "AnalyzeAbTest": Role.VIEWER,
    # operator: change what is served and trained: rollback, tags, A/B tests, models
    "Rollback": Role.OPERATOR,
    "SetTag": Role.OPERATOR,
    "CreateAbTest": Role.OPERATOR,
    "AssignVariant": Role.OPERATOR,
    "RecordAbResult": Role.OPERATOR,
    "EndAbTest": Role.OPERATOR,
    "CreateModel": Role.OPERATOR,
    "PauseModel": Role.OPERATOR,
    "ResumeModel": Role.OPERATOR,
    "EvaluateModel": Role.OPERATOR,  # schedules an evaluation-only round of a version
    # admin: delete data, revoke certificates, read the audit log (it names every actor)
    "PruneVersions": Role.ADMIN,
    "DeleteModel": Role.ADMIN,  # stops a model's training for good (its history is kept)
    "RevokeCertificate": Role.ADMIN,
    "ListRevokedCertificates": Role.ADMIN,
    "ListAuditLog": Role.ADMIN,
    "VerifyAuditLog": Role.ADMIN,
}


def required_role(method: str) -> Role | None:
    """The least role for a full gRPC method name; None when the RPC has no entry."""
    return ADMIN_RPC_ROLES.get(method.rsplit("/", 1)[-1])


@dataclass(frozen=True)
class Principal:
    """An authenticated operator: from an admin token, or from an admin certificate (mTLS)."""

    name: str
    role: Role


def parse_admin_tokens(text: str, source: str = "admin token file") -> dict[str, Principal]:
    """token -> principal from lines `TOKEN` (role admin) or `NAME ROLE TOKEN`."""
    tokens: dict[str, Principal] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            principal = Principal("admin", Role.ADMIN)
        elif len(parts) == 3:
            try:
                principal = Principal(parts[0], parse_role(parts[1]))
            except ValueError as exc:
                raise ValueError(
                    f"{source} line {number}: {str(exc).split(': run')[0]}; fix that line, or "
                    "remove it and run `xeno-fl admin token add FILE NAME --role ROLE`"
                ) from None
        else:
            raise ValueError(f"{source} line {number}: expected TOKEN or NAME ROLE TOKEN")
        token = parts[-1]
        if len(token) < 16:
            raise ValueError(f"{source} line {number}: a token needs at least 16 characters")
        if token in tokens:
            raise ValueError(f"{source} line {number}: the same token is given twice")
        tokens[token] = principal
    return tokens


def add_admin_token(path: str | Path, name: str, role: Role) -> str:
    """Append `NAME ROLE TOKEN` with a new token to the file (created owner-only); the token."""
    path = Path(path)
    existing = path.read_text() if path.exists() else ""
    if existing:
        check_private_file(path, "admin token file")
        if any(
            line.split()[0] == name
            for line in existing.splitlines()
            if len(line.split()) == 3 and not line.startswith("#")
        ):
            raise ValueError(f"{path} already has a credential named {name!r}")
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} {role.value} {token}\n")
    return token


@dataclass(frozen=True)
class Exposure:
    """What the server will run with, as far as exposure is concerned."""

    host: str
    tls: bool
    mtls: bool
    insecure: bool
    enrollment_key: bool
    admin_credential: bool
    metrics_host: str
    metrics_on: bool


def check_exposure(e: Exposure) -> None:
    """Refuse an exposed configuration that leaves a door open; say what to run instead."""
    if is_loopback(e.host):
        return
    if not e.tls and not e.insecure:
        raise ValueError(
            f"refusing to listen on {e.host} without TLS: device tokens, updates and admin "
            "calls would cross the network in the clear. Make certificates with\n"
            "  xeno-fl admin certs init certs\n"
            "  xeno-fl admin certs issue certs --server HOSTNAME\n"
            "and start with --tls-cert certs/server-HOSTNAME.crt --tls-key "
            "certs/server-HOSTNAME.key (add --tls-client-ca certs/ca.crt for mTLS), or "
            "give --insecure if a proxy in front terminates TLS"
        )
    if not e.enrollment_key and not e.mtls:
        raise ValueError(
            f"refusing to listen on {e.host} with open enrollment: anyone could register "
            "devices. Give --enrollment-key-file FILE (e.g. `openssl rand -hex 32 > FILE; "
            "chmod 600 FILE`, or `xeno-fl admin keygen FILE`) or require device "
            "certificates with --tls-client-ca"
        )
    if not e.admin_credential and not e.mtls:
        raise ValueError(
            f"refusing to listen on {e.host} with an open admin API. Create a credential "
            "with `xeno-fl admin token add admin.tokens NAME --role admin` and give "
            "--admin-token-file admin.tokens (or use admin certificates with "
            "--tls-client-ca)"
        )


def resolve_data_key(data_key_file: str, default_dir: str, env_var: str = "XENO_DATA_KEY") -> bytes:
    """The server's data key (see common.atrest.resolve_key): created on first start."""
    return resolve_key(data_key_file, Path(default_dir) / "xeno.key", env_var, log, "data key")
