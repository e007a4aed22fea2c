"""The ``server_process`` fixture: ``mqchat serve`` in a subprocess (SQLite or PostgreSQL).

Tests whose client processes exit, crash or cut their connections use it rather than the
in-process server: amqtt 0.12.1 leaks the server side of a connection reset by its peer
(``StreamWriterAdapter.close`` awaits ``drain()`` before ``close()``), and in-process that
leak surfaces as a ResourceWarning in whichever test happens to collect it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mqchat.clients import ChatClient
from tests.clients.support import free_port, make_client
from tests.helpers import PASSWORD


class ServerProcess:
    """``mqchat serve`` in a subprocess, restartable on the same ports and data."""

    def __init__(self, data_dir: Path, database_url: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.env = {**os.environ, **(env or {})}
        self.mqtt_port, self.ws_port, self.http_port = free_port(), free_port(), free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.up = False
        """Started once: from then on the ports are fixed (clients know them)."""

    async def start(self) -> None:
        """Start (or restart, on the same ports) and wait until healthy. A port taken by
        someone else between ``free_port()`` and the bind makes the first start pick new ports;
        a restart waits for its ports instead."""
        for _ in range(20):
            self.starts += 1
            with (self.data_dir.parent / f"server-{self.starts}.log").open("wb") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "mqchat.cli", "serve", "--host", "127.0.0.1",
                    "--mqtt-port", str(self.mqtt_port), "--ws-port", str(self.ws_port),
                    "--http-port", str(self.http_port), "--data-dir", str(self.data_dir),
                    "--database-url", self.database_url, env=self.env, stdout=log, stderr=log,
                )  # fmt: skip
            if await self._healthy():
                self.up = True
                return
            if self.proc.returncode != 2:  # 2: a port is in use
                raise AssertionError(f"the server exited with {self.proc.returncode}; see server-*.log")
            if not self.up:
                self.mqtt_port, self.ws_port, self.http_port = free_port(), free_port(), free_port()
            await asyncio.sleep(0.25)
        raise AssertionError("the server could not get its ports")

    async def _healthy(self) -> bool:
        assert self.proc is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}") as http:
            async with asyncio.timeout(30):
                while self.proc.returncode is None:
                    try:
                        if (await http.get("/healthz")).status_code == 200:
                            return True
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
        return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def register(self, user_id: str) -> str:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30) as http:
            created = await http.post("/v1/users", json={"user_id": user_id, "password": PASSWORD})
            assert created.status_code == 201, created.text
            token = await http.post("/v1/token", json={"user_id": user_id, "password": PASSWORD})
            return str(token.json()["access_token"])

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", headers=headers, timeout=30)

    async def history(self, token: str, conversation_id: str) -> list[dict[str, object]]:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.http_port}", headers={"Authorization": f"Bearer {token}"}
        ) as http:
            page = await http.get(f"/v1/conversations/{conversation_id}/messages", params={"limit": 200})
            return list(page.json()["messages"])

    def client(self, user_id: str, token: str, tmp_path: Path) -> ChatClient:
        return make_client(
            user_id, tmp_path / f"{user_id}.sqlite3", token=token, mqtt_port=self.mqtt_port, http_port=self.http_port
        )


@pytest.fixture
async def server_process(tmp_path: Path, database_url: str) -> AsyncIterator[ServerProcess]:
    running = ServerProcess(tmp_path / "server", database_url)
    await running.start()
    try:
        yield running
    finally:
        await running.kill()
