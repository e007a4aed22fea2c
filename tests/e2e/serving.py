"""``mqchat serve`` as a real subprocess, for tests that kill it or copy its database under it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import PASSWORD


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    http_port: int
    mqtt_port: int
    log: Path

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", headers=headers, timeout=30)

    async def register(self, user_id: str) -> str:
        async with self.http() as http:
            created = await http.post("/v1/users", json={"user_id": user_id, "password": PASSWORD})
            assert created.status_code in (201, 409), created.text
            token = await http.post("/v1/token", json={"user_id": user_id, "password": PASSWORD})
            assert token.status_code == 200, token.text
            return str(token.json()["access_token"])

    async def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crash or a power cut of the process."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        """SIGINT, the orderly shutdown."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                await self.kill()


@contextlib.asynccontextmanager
async def mqchat_serve(
    data_dir: Path, database_url: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """A server on free ports, once ``/healthz`` answers; killed when the block ends."""
    http_port, mqtt_port = free_port(), free_port()
    log = data_dir.parent / f"serve-{http_port}.log"
    args = ["--data-dir", str(data_dir), "--database-url", database_url, "--host", "127.0.0.1"]
    args += ["--mqtt-port", str(mqtt_port), "--ws-port", str(free_port()), "--http-port", str(http_port)]
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mqchat.cli",
            "serve",
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            env=os.environ | (env or {}),
        )
    server = ServeProcess(proc, http_port, mqtt_port, log)
    try:
        async with server.http() as http:
            for _ in range(600):
                if proc.returncode is not None:
                    raise AssertionError(f"mqchat serve exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"mqchat serve did not become healthy: {log.read_text()[-2000:]}")
        yield server
    finally:
        await server.kill()
