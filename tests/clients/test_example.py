"""examples/sdk_chat.py runs as documented in docs/clients.md."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sdk_chat.py"


async def test_the_sdk_example_runs(server_process: ServerProcess, tmp_path: Path) -> None:
    server = server_process
    for _ in range(2):  # a second run finds the accounts and the local state in place
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--server", "127.0.0.1", "--mqtt-port", str(server.mqtt_port),
            "--http-port", str(server.http_port), "--data-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 45)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert len(lines) == 3, lines
        assert lines[0].startswith("alice sent message #")
        assert lines[1] == "bob got: [alice] Hello Bob!"
        assert lines[2] == "alice sees: read by bob"


async def test_the_sdk_example_fails_in_one_line_when_the_names_are_taken(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    server = server_process
    for password in ("first-password", "other-password"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--server", "127.0.0.1", "--mqtt-port", str(server.mqtt_port),
            "--http-port", str(server.http_port), "--data-dir", str(tmp_path), "--password", password,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 1
    assert err.decode().count("\n") == 1, err.decode()
    assert "cannot log in as 'alice'" in err.decode() and "--alice" in err.decode()
