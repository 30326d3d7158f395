"""Shared fixtures: a real server on an ephemeral loopback port, raw device stubs, devices."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import settings

from client.runtime import ClientConfig, DeviceClient, data_source
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc
from server.app import ServerConfig, XenoServer

torch.set_num_threads(1)

# CI replays the same property-test examples every run (no test may pass or fail by
# the draw); a developer's run explores fresh examples, and a failure it finds is kept
# in .hypothesis/ and becomes a plain regression test.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

# Data keys for servers and devices started by the tests (subprocesses inherit them).
os.environ.setdefault("XENO_DATA_KEY", "11" * 32)
os.environ.setdefault("XENO_DEVICE_KEY", "22" * 32)
# Test federations have 2-4 devices: below the devices' default minimum secure cohort
# of 5 (tests/test_secagg_attacks.py runs devices with the default).
os.environ.setdefault("XENO_MIN_SECAGG_COHORT", "2")
# The desktop app's tests (pytest-qt) draw into memory: no display is needed.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: `pytest -n 2` then spreads the long ones over both workers from
    the start, instead of leaving one worker with a minute-long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _postgres_urls() -> list[str]:
    return ["postgres"] if os.environ.get("XENO_TEST_POSTGRES_URL") else []


@pytest.fixture(params=["sqlite", *_postgres_urls()])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite, and PostgreSQL when XENO_TEST_POSTGRES_URL is set.

    Each PostgreSQL test gets its own schema (dropped afterwards). When the
    variable is set but the server is unreachable, the test fails: it does not skip.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    from sqlalchemy import create_engine, text

    base = os.environ["XENO_TEST_POSTGRES_URL"]
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        pytest.fail(f"XENO_TEST_POSTGRES_URL is set but PostgreSQL is unreachable: {exc}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


FAST_SERVER = ServerConfig(
    host="127.0.0.1",
    port=0,
    min_clients=2,
    clients_per_round=3,
    round_deadline=20.0,
    selection_window=2.0,
    local_epochs=1,
    max_workers=64,
    secagg=False,
    metrics_port=-1,
)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., XenoServer]]:
    servers: list[XenoServer] = []

    def make(recorder: Any = None, **overrides: Any) -> XenoServer:
        overrides.setdefault("db", f"sqlite:///{tmp_path}/server-{len(servers)}.db")
        server = XenoServer(replace(FAST_SERVER, **overrides), recorder=recorder).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop(grace=0.5)


@dataclass
class RawDevice:
    """A device driven by hand through the generated stubs (for protocol-level tests)."""

    channel: grpc.Channel
    stub: federation_pb2_grpc.FederationStub
    device_id: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("x-xeno-device-id", self.device_id), ("authorization", f"Bearer {self.token}"))

    def check_in(self, wait_ms: int = 5000) -> pb.CheckInResponse:
        return self.stub.CheckIn(
            pb.CheckInRequest(max_wait_ms=wait_ms), metadata=self.md, timeout=30
        )


@pytest.fixture
def raw_device() -> Iterator[Callable[[XenoServer], RawDevice]]:
    channels: list[grpc.Channel] = []

    def make(server: XenoServer) -> RawDevice:
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        stub = federation_pb2_grpc.FederationStub(channel)
        resp = stub.Register(pb.RegisterRequest(), timeout=10)
        return RawDevice(channel, stub, resp.device_id, resp.token)

    yield make
    for c in channels:
        c.close()


@dataclass
class DeviceThread:
    client: DeviceClient
    thread: threading.Thread
    stop: threading.Event

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.fixture
def device_threads(tmp_path: Path) -> Iterator[Callable[..., list[DeviceThread]]]:
    """Real DeviceClient loops in threads, each with its own partition and local store."""
    started: list[DeviceThread] = []

    def start(
        server: XenoServer,
        n: int,
        num_partitions: int | None = None,
        before_start: Callable[[DeviceClient], None] | None = None,
        **overrides: Any,
    ) -> list[DeviceThread]:
        out = []
        # Devices run the plain rounds of a server started without secure aggregation.
        config_of = getattr(server, "config", None)  # None: a stand-in for a server not up yet
        overrides.setdefault("allow_plaintext", not (config_of or FAST_SERVER).secagg)
        # Federations of 2-4 test devices: their secure rounds are below the devices'
        # default minimum cohort of 5 (tests/test_secagg_attacks.py keeps the default).
        overrides.setdefault("min_secagg_cohort", 2)
        for i in range(n):
            config = ClientConfig(
                server=server.address,
                state_dir=str(tmp_path / f"device-{len(started)}"),
                partition=i,
                num_partitions=num_partitions or n,
                max_wait_ms=2000,
                max_backoff=1.0,
                **overrides,
            )
            stop = threading.Event()
            # The simulated shard with its held-out part (a CLINC150 user's kept fifth).
            client = DeviceClient(config, data_source(config).load(), stop)
            if before_start is not None:
                before_start(client)
            thread = threading.Thread(target=client.run, daemon=True, name=f"device-{i}")
            thread.start()
            dt = DeviceThread(client, thread, stop)
            started.append(dt)
            out.append(dt)
        return out

    yield start
    for d in started:
        d.halt()
        d.client.close()
