"""The command line as a user runs it: `mqchat serve | user add | token`."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.accounts import http_client
from tests.support.ports import free_port
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow


def mqchat(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqchat.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def test_commands_other_than_serve_refuse_a_data_dir_that_does_not_exist(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (("token", "alice"), ("user", "add", "alice", "--password", "alice-secret"), ("db", "current")):
        result = subprocess.run(
            [sys.executable, "-m", "mqchat.cli", *args], cwd=elsewhere, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "mqchat-data" in result.stderr and "--data-dir" in result.stderr
        assert not (elsewhere / "mqchat-data").exists()


async def test_tokens_survive_a_restart_and_the_secret_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    assert (
        mqchat("user", "add", "alice", "--password", "alice-secret", data_dir=data).stdout.strip()
        == "created user alice"
    )
    duplicate = mqchat("user", "add", "alice", "--password", "alice-secret", data_dir=data, check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    token = mqchat("token", "alice", data_dir=data).stdout.strip()
    assert stat.S_IMODE(os.stat(data / "secret.key").st_mode) == 0o600
    unknown = mqchat("token", "nobody", data_dir=data, check=False)
    assert unknown.returncode == 1 and "no such user" in unknown.stderr

    server = ServerProcess(data)
    for _ in range(2):  # the same token works before and after a restart (on the same ports)
        async with server, http_client(server, token) as http:
            response = await http.get("/v1/sync")
            assert response.status_code == 200, response.text


async def test_ctrl_c_shuts_down_cleanly(tmp_path: Path) -> None:
    async with ServerProcess(tmp_path / "data", stdout_path=tmp_path / "stdout.txt") as server:
        server.signal(signal.SIGINT)
        assert await server.wait(15) == 0
        out = server.stdout()
        assert "MQTT on 127.0.0.1:" in out and "shutting down" in out


@pytest.mark.parametrize("flag", ["--mqtt-port", "--ws-port", "--http-port"])
def test_a_port_in_use_is_a_one_line_error(tmp_path: Path, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = {"--mqtt-port": free_port(), "--ws-port": free_port(), "--http-port": free_port(), flag: taken}
        args = [item for pair in ports.items() for item in (pair[0], str(pair[1]))]
        result = mqchat("serve", "--host", "127.0.0.1", *args, data_dir=tmp_path / "data", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"mqchat: port {taken} is already in use; choose another with {flag}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mqtt-port", "70000"], "mqchat: invalid setting mqtt.port: Input should be less than or equal to 65535"),
        (["--config", "/nonexistent/mqchat.toml"], "mqchat: config file /nonexistent/mqchat.toml does not exist"),
    ],
)
def test_bad_settings_are_a_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = mqchat("serve", *args, data_dir=tmp_path / "data", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
