"""The README's operator, device and admin commands, copied from it and run verbatim on a
first start: no key configured anywhere (the server and the devices create theirs)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from server.store import Store

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> dict[str, list[str]]:
    """The first `xeno-fl server`, `client`, `admin --server` and `admin --db` lines."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        words = shlex.split(line) if line.startswith("xeno-fl ") else []
        if len(words) < 3:
            continue
        kind = words[1] if words[1] != "admin" else f"admin {words[2]}"
        found.setdefault(kind, words[1:])
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_readme_commands_run_verbatim_on_a_first_start(tmp_path: Path) -> None:
    commands = readme_commands()
    server_cmd, client_cmd = commands["server"], commands["client"]
    assert "--port" in server_cmd and "--server" in client_cmd
    port = int(server_cmd[server_cmd.index("--port") + 1])
    if not _port_free(port):
        pytest.skip(f"port {port} of the README's commands is in use on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("XENO_DATA_KEY", "XENO_DEVICE_KEY")}
    # What the commands leave to defaults: a free metrics port on a shared machine, a
    # federation of three devices, one local epoch, a short selection window.
    env.update(
        PYTHONUNBUFFERED="1",
        XENO_METRICS_PORT="-1",
        XENO_MIN_CLIENTS="3",
        XENO_CLIENTS_PER_ROUND="3",
        XENO_LOCAL_EPOCHS="1",
        XENO_SELECTION_WINDOW="1",
    )
    xeno = [sys.executable, "-m", "xeno.cli"]
    home = tmp_path / "operator"
    home.mkdir()
    procs: list[subprocess.Popen[str]] = []

    def start(cmd: list[str], cwd: Path) -> subprocess.Popen[str]:
        cwd.mkdir(exist_ok=True)
        p = subprocess.Popen(
            [*xeno, *cmd],
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        return p

    server = start(server_cmd, home)
    try:
        devices = [start(client_cmd, tmp_path / f"device-{i}") for i in range(3)]
        db = server_cmd[server_cmd.index("--db") + 1].replace("sqlite:///", f"sqlite:///{home}/")
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.communicate()[0]
            for d in devices:
                assert d.poll() is None, d.communicate()[0]
            if Path(db.removeprefix("sqlite:///")).exists():
                store = Store(db)
                try:
                    rounds = store.list_rounds("digits-mlp")
                except OperationalError:  # the server is still creating the schema
                    rounds = []
                store.close()
                if any(r.status == "completed" for r in rounds):
                    break
            assert time.monotonic() < deadline, "no round completed"
            time.sleep(1)
        for kind in ("admin --server", "admin --db"):
            out = subprocess.run(
                [*xeno, *commands[kind]],
                cwd=home,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            # a table with rows (rich folds its cells to the 80 columns of a pipe)
            assert "│ 2 " in out.stdout, out.stdout
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = []
        for p in procs:  # devices finish their step first; this test does not wait for it
            try:
                outputs.append(p.communicate(timeout=30)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outputs.append(p.communicate()[0])
    key = home / "data" / "xeno.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert f"created the data key {key}" in outputs[0] and "back it up" in outputs[0]
    for i in range(3):
        device_key = tmp_path / f"device-{i}" / "data" / "dev3" / "device.key"
        assert device_key.stat().st_mode & 0o777 == 0o600
