"""Roles of admin credentials: every Admin RPC has a least role, and the server enforces it
for each role (the whole matrix, over real gRPC)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass

from common.certs import Role
from common.pb import admin_pb2
from server.security import ADMIN_RPC_ROLES, add_admin_token

ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]


def test_every_admin_rpc_has_a_least_role() -> None:
    """A new Admin RPC without an entry fails here (and is refused to everyone at run time)."""
    methods = {m.name for m in ADMIN.methods}
    assert methods - set(ADMIN_RPC_ROLES) == set(), "add these to server.security.ADMIN_RPC_ROLES"
    assert set(ADMIN_RPC_ROLES) - methods == set(), "these are no Admin RPC any more"


def test_roles_follow_the_issue() -> None:
    viewer = {name for name, role in ADMIN_RPC_ROLES.items() if role is Role.VIEWER}
    assert {"ListModels", "ListVersions", "GetRoundHistory", "GetPrivacyReport"} <= viewer
    assert ADMIN_RPC_ROLES["Rollback"] is Role.OPERATOR
    assert ADMIN_RPC_ROLES["SetTag"] is Role.OPERATOR
    assert ADMIN_RPC_ROLES["CreateAbTest"] is Role.OPERATOR
    assert ADMIN_RPC_ROLES["PruneVersions"] is Role.ADMIN  # deletes data
    assert ADMIN_RPC_ROLES["RevokeCertificate"] is Role.ADMIN
    assert ADMIN_RPC_ROLES["DeleteModel"] is Role.ADMIN  # stops a model for good
    # the audit log names every actor and refusal: not for a dashboard's viewer token
    assert ADMIN_RPC_ROLES["ListAuditLog"] is Role.ADMIN
    assert ADMIN_RPC_ROLES["VerifyAuditLog"] is Role.ADMIN


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[Role, str]]:
    path = tmp_path / "admin.tokens"
    return path, {role: add_admin_token(path, f"who-{role.value}", role) for role in Role}


def _call(channel: grpc.Channel, method: object, token: str) -> grpc.StatusCode:
    request_class = GetMessageClass(method.input_type)  # type: ignore[attr-defined]
    response_class = GetMessageClass(method.output_type)  # type: ignore[attr-defined]
    call = channel.unary_unary(
        f"/{ADMIN.full_name}/{method.name}",  # type: ignore[attr-defined]
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    try:
        call(request_class(), metadata=(("authorization", f"Bearer {token}"),), timeout=20)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.PERMISSION_DENIED:
            assert "needs the role" in err.details(), err.details()
        return err.code()
    return grpc.StatusCode.OK


def test_the_role_matrix(server_factory, tokens) -> None:
    path, by_role = tokens
    server = server_factory(admin_token_file=str(path), eval_data="none")
    versions_before = [v.version for v in server.store.list_versions("digits-mlp")]
    with grpc.insecure_channel(server.address) as channel:
        for method in ADMIN.methods:
            needed = ADMIN_RPC_ROLES[method.name]
            for role, token in by_role.items():
                code = _call(channel, method, token)
                if role.allows(needed):
                    assert code != grpc.StatusCode.PERMISSION_DENIED, (method.name, role)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, role, code)
            assert _call(channel, method, "not-a-token-at-all") == grpc.StatusCode.UNAUTHENTICATED
    # what was refused changed nothing
    assert [v.version for v in server.store.list_versions("digits-mlp")] == versions_before
