"""The `xeno-fl` command as users run it: help, env vars, real server and client processes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.runtime import Backoff, ClientConfig
from common.config import from_namespace
from server.app import ServerConfig, grpc_server_options
from xeno.cli import build_parser
from xeno.simulation import SimulationConfig

XENO = [sys.executable, "-m", "xeno.cli"]
ROOT = Path(__file__).resolve().parent.parent


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


@pytest.mark.parametrize(
    ("command", "config"),
    [("server", ServerConfig), ("client", ClientConfig), ("simulate", SimulationConfig)],
)
def test_help_explains_every_setting_and_its_env_var(command: str, config: type) -> None:
    text = " ".join(_subparser(command).format_help().split())
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, f"{command} --help lacks {flag}"
        env = field.metadata.get("env")
        if env:
            assert f"[env {env}]" in text


def test_help_runs_as_a_command() -> None:
    out = subprocess.run([*XENO, "simulate", "--help"], capture_output=True, text=True, check=True)
    assert "--clients" in out.stdout and "--report" in out.stdout


def test_flags_beat_env_vars_beat_defaults() -> None:
    parser = build_parser()
    args = parser.parse_args(["server", "--port", "7000"])
    config = from_namespace(ServerConfig, args, {"XENO_PORT": "8000", "XENO_ROUNDS": "5"})
    assert config.port == 7000 and config.rounds == 5 and config.min_clients == 2
    with pytest.raises(SystemExit, match="XENO_RESET"):
        from_namespace(ClientConfig, parser.parse_args(["client"]), {"XENO_RESET": "maybe"})


def test_stream_window_flag_sets_a_fixed_grpc_window_or_restores_the_adaptive_one() -> None:
    args = build_parser().parse_args(["server", "--stream-window-kib", "512"])
    options = dict(grpc_server_options(from_namespace(ServerConfig, args, {})))
    assert options["grpc.http2.lookahead_bytes"] == 512 << 10
    assert options["grpc.http2.bdp_probe"] == 0
    adaptive = dict(grpc_server_options(ServerConfig(stream_window_kib=0)))
    assert "grpc.http2.lookahead_bytes" not in adaptive and "grpc.http2.bdp_probe" not in adaptive
    with pytest.raises(ValueError, match="stream_window_kib"):
        grpc_server_options(ServerConfig(stream_window_kib=-1))


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = Backoff(base=0.1, cap=2.0)
    delays = [backoff.next_delay() for _ in range(30)]
    for n, d in enumerate(delays):
        assert 0 <= d <= min(2.0, 0.1 * 2**n)
    assert len({round(d, 6) for d in delays}) > 20  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_backoff_keeps_retrying_after_thousands_of_attempts() -> None:
    # A device whose server is down for hours must keep retrying, not crash: 2**1024
    # overflows a float (at the 2 s cap of a benchmark that took 17 minutes).
    backoff = Backoff(base=0.1, cap=2.0)
    assert all(0 <= backoff.next_delay() <= 2.0 for _ in range(5000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "XENO_LOG_LEVEL": "warning"}


@pytest.mark.slow
def test_server_and_client_processes_run_a_federation(tmp_path: Path) -> None:
    """The very commands docker-compose runs: `xeno-fl server` and three `xeno-fl client`."""
    db = f"sqlite:///{tmp_path}/fl.db"
    port = _free_port()
    server = subprocess.Popen(
        [
            *XENO,
            "server",
            "--port",
            str(port),
            "--db",
            db,
            "--rounds",
            "2",
            "--clients-per-round",
            "3",
            "--min-clients",
            "3",
            "--local-epochs",
            "1",
            "--selection-window",
            "1",
            # Deadlines sized for a loaded machine (load 48 seen): the rounds close as soon
            # as all three devices answer, so they cost nothing when it is idle.
            "--round-deadline",
            "300",
            "--secagg-phase-timeout",
            "60",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    clients = [
        subprocess.Popen(
            [*XENO, "client", "--num-partitions", "3", "--max-backoff", "2"],
            env={
                **_env(),
                "XENO_SERVER": f"127.0.0.1:{port}",
                "XENO_PARTITION": str(i),
                "XENO_STATE_DIR": str(tmp_path / f"dev{i}"),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    try:
        for c in clients:
            out, _ = c.communicate(timeout=600)
            assert c.returncode == 0, out
        out, _ = server.communicate(timeout=120)
        assert server.returncode == 0, out
        assert f"listening on 127.0.0.1:{port}" in out
    finally:
        for p in [server, *clients]:
            p.kill()
    report = subprocess.run(
        [*XENO, "admin", "--db", db, "--json", "rounds"], capture_output=True, text=True, check=True
    )
    rounds = json.loads(report.stdout)["rounds"]
    assert [r["status"] for r in rounds] == ["completed", "completed"]
    assert all(r["participants"] == 3 for r in rounds)
    # credentials persist in each device's local store, owner-only
    creds = tmp_path / "dev0" / "credentials.json"
    assert creds.exists() and (creds.stat().st_mode & 0o777) == 0o600


def test_client_exits_cleanly_on_sigterm(server_factory, tmp_path: Path) -> None:
    server = server_factory(min_clients=5, clients_per_round=5)  # no round will start
    client = subprocess.Popen(
        [
            *XENO,
            "--log-level",
            "info",
            "client",
            "--server",
            server.address,
            "--state-dir",
            str(tmp_path / "dev"),
            "--num-partitions",
            "3",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    # wait until the device is inside a step: registered and long-polling CheckIn
    while not server.coordinator._available:
        assert client.poll() is None, client.communicate()[0]
        assert time.monotonic() < deadline, "the device never checked in"
        time.sleep(0.05)
    client.send_signal(signal.SIGTERM)
    out, _ = client.communicate(timeout=20)
    assert client.returncode == 0, out
    assert "finishing the current step" in out


def test_devices_wait_for_a_late_server_and_reconnect(server_factory, device_threads) -> None:
    port = _free_port()

    class Late:
        address = f"127.0.0.1:{port}"

    devices = device_threads(Late, 2)
    deadline = time.monotonic() + 30
    while not all(d.client.backoff.attempt >= 2 for d in devices):  # failed twice already
        assert time.monotonic() < deadline, "the devices never tried the closed port"
        time.sleep(0.05)
    assert all(d.thread.is_alive() and d.client.rounds_done == 0 for d in devices)
    server = server_factory(port=port, rounds=1, clients_per_round=2)
    assert server.coordinator.wait_finished(timeout=60)
    for d in devices:
        d.thread.join(timeout=30)
        assert d.client.rounds_done == 1


@pytest.mark.slow
def test_simulate_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            *XENO,
            "simulate",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--db",
            f"sqlite:///{tmp_path}/sim.db",
            "--report",
            str(report),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(report.read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert [r["version"] for r in data["rounds"]] == [2, 3]
    for r in data["rounds"]:
        assert (
            r["participants"] == 3 and 0 < r["accuracy"] <= 1 and r["loss"] > 0 and r["seconds"] > 0
        )
    assert re.search(r"database: sqlite:///", out.stdout)


@pytest.mark.slow
def test_default_simulation_reaches_95_percent(tmp_path: Path) -> None:
    """The demo's configuration: 10 devices, Dirichlet(0.5), 20 rounds."""
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            *XENO,
            "simulate",
            "--db",
            f"sqlite:///{tmp_path}/demo.db",
            "--report",
            str(report),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = json.loads(report.read_text())["rounds"]
    assert len(rounds) == 20 and all(r["participants"] == 10 for r in rounds)
    assert rounds[-1]["accuracy"] >= 0.95, [r["accuracy"] for r in rounds]
    # the default is secure aggregation; plain FedAvg with the same seed lands within 0.5 points
    plain_report = tmp_path / "plain.json"
    out = subprocess.run(
        [
            *XENO,
            "simulate",
            "--db",
            f"sqlite:///{tmp_path}/plain.db",
            "--report",
            str(plain_report),
            "--no-progress",
            "--no-secagg",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    plain = json.loads(plain_report.read_text())["rounds"]
    assert abs(rounds[-1]["accuracy"] - plain[-1]["accuracy"]) <= 0.005
