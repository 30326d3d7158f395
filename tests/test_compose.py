"""docker-compose.yml: valid against the compose spec, wired correctly, and its very
service commands run a federation here on loopback against PostgreSQL (no Docker engine)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from client.runtime import ClientConfig
from client.storage import LocalStore
from common.atrest import Sealer, load_key
from server.app import ServerConfig
from server.store import Store

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _known_env_vars() -> set[str]:
    names = {"XENO_LOG_LEVEL", "XENO_LOG_FORMAT"}
    for cls in (ServerConfig, ClientConfig):
        names |= {f.metadata["env"] for f in dataclasses.fields(cls) if f.metadata.get("env")}
    return names


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    import check_jsonschema
    import jsonschema

    schema_path = (
        Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
    )
    jsonschema.validate(COMPOSE, json.loads(schema_path.read_text()))


def test_services_images_commands_health_and_dependencies() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "server", "client"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    server, client = services["server"], services["client"]
    assert server["build"] == "." and server["image"] == client["image"]
    assert server["command"] == ["server"] and client["command"] == ["client"]
    assert server["ports"] == ["50051:50051"]  # only the device port; metrics stay local
    assert "XENO_METRICS_HOST" not in server["environment"]  # default: 127.0.0.1
    # mTLS from the provisioned secrets: the server requires client certificates
    assert server["environment"]["XENO_TLS_CLIENT_CA"] == "/run/secrets/ca_cert"
    assert client["environment"]["XENO_TLS_CERT"] == "/run/secrets/device_cert"
    assert "--tls-cert" in server["healthcheck"]["test"]
    declared = set(COMPOSE["secrets"])
    for name in ("server", "client"):
        used = {s["source"] for s in services[name]["secrets"]}
        assert used <= declared
        for value in services[name]["environment"].values():
            if str(value).startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in used, value
    assert server["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert client["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert server["healthcheck"]["test"][:2] == ["CMD", "xeno-fl"]
    assert server["environment"]["XENO_DB"].startswith("postgresql+psycopg://")
    assert server["environment"]["XENO_DB"].split("@")[1].startswith("postgres:5432/")
    assert client["environment"]["XENO_SERVER"] == "server:50051"
    assert client["environment"]["XENO_PARTITION"] == "-1"  # distinct shards under --scale
    for name in ("server", "client"):
        unknown = set(services[name]["environment"]) - _known_env_vars()
        assert not unknown, f"{name}: environment variables no setting reads: {unknown}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["xeno-fl"]' in dockerfile and "torch==2.13.0" in dockerfile


def provisioning_commands() -> list[list[str]]:
    """The `xeno-fl ...` lines of the compose file's header, as argument lists."""
    lines = (ROOT / "docker-compose.yml").read_text().splitlines()
    return [line.lstrip("# ").split()[1:] for line in lines if line.startswith("#   xeno-fl admin")]


def provision(folder: Path) -> dict[str, str]:
    """Run the header's commands verbatim in folder; /run/secrets/NAME -> the file there."""
    for command in provisioning_commands():
        out = subprocess.run(
            [sys.executable, "-m", "xeno.cli", *command],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    return {
        f"/run/secrets/{name}": str(folder / spec["file"])
        for name, spec in COMPOSE["secrets"].items()
    }


def _with_secrets(env: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
    return {k: secrets.get(str(v), str(v)) for k, v in env.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(command: list[str], env: dict[str, str], **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xeno.cli", *command],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_compose_service_commands_run_a_federation_on_postgres(db_url: str, tmp_path) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("the compose stack runs PostgreSQL")
    services = COMPOSE["services"]
    secrets = provision(tmp_path)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    server_env = {
        **_with_secrets(services["server"]["environment"], secrets),
        # loopback instead of the compose network, a test schema instead of the compose DB,
        # and a small federation: 3 devices, 2 rounds
        "XENO_HOST": "127.0.0.1",
        "XENO_PORT": str(port),
        "XENO_DB": db_url,
        "XENO_ROUNDS": "2",
        "XENO_CLIENTS_PER_ROUND": "3",
        "XENO_SELECTION_WINDOW": "1",
        "XENO_LOCAL_EPOCHS": "1",
        "XENO_METRICS_PORT": "0",
    }
    server = _run(services["server"]["command"], server_env)
    clients: list[subprocess.Popen[str]] = []
    try:
        health = services["server"]["healthcheck"]["test"][2:]  # drop "CMD", "xeno-fl"
        health = [
            address if part == "127.0.0.1:50051" else secrets.get(part, part) for part in health
        ]
        deadline = time.monotonic() + 90
        while True:
            probe = subprocess.run(
                [sys.executable, "-m", "xeno.cli", *health], capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, probe.stdout + probe.stderr
            assert server.poll() is None, server.communicate()[0]
            time.sleep(0.5)
        for i in range(3):
            env = {
                **_with_secrets(services["client"]["environment"], secrets),
                "XENO_SERVER": address,
                "XENO_STATE_DIR": str(tmp_path / f"device-{i}"),
            }
            clients.append(_run(services["client"]["command"], env))
        for c in clients:
            out, _ = c.communicate(timeout=180)
            assert c.returncode == 0, out
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
    finally:
        for p in [server, *clients]:
            p.kill()
    store = Store(db_url)
    rounds = store.list_rounds("digits-mlp")
    store.close()
    assert [r.status for r in rounds] == ["completed", "completed"]
    assert all(r.participants == 3 for r in rounds)
    shards = sorted(
        LocalStore(tmp_path / f"device-{i}", Sealer(load_key("", "XENO_DEVICE_KEY")))
        .load_credentials(address)
        .enrollment_index
        for i in range(3)
    )
    assert shards == [0, 1, 2]  # each replica took its own partition
