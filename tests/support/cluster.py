"""Cluster mode under test: a Redis the test owns (so it can kill it), nodes as ``mqchat serve``
processes on one fresh PostgreSQL database, and devices that know which node they are on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import redis.asyncio as redis

from mqchat.core.origin import decode_key
from tests.support.accounts import PASSWORD, http_client
from tests.support.devices import Device, aiomqtt_client, checked_origin, topic_and_payload
from tests.support.ports import free_port
from tests.support.processes import ServerProcess
from tests.support.services import service_missing

REDIS_SERVER = shutil.which("redis-server")


async def until_answering(client: redis.Redis, timeout: float, check: Callable[[], None] | None = None) -> None:
    """Ping until the server answers (``check`` raises if waiting is pointless); closes ``client``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if check is not None:
                    check()
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


class RedisProcess:
    """``redis-server`` on a port of its own, keeping nothing on disk; killable and restartable."""

    def __init__(self, workdir: Path) -> None:
        if REDIS_SERVER is None:
            service_missing("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self._workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        self._workdir.mkdir(parents=True, exist_ok=True)
        with (self._workdir / "redis.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self._workdir), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        await until_answering(redis.Redis.from_url(self.url), 10)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def node(
    data_root: Path, name: str, database_url: str, redis_url: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """One node: its own ports and data dir (secret shared through ``MQCHAT_AUTH__SECRET``)."""
    return ServerProcess(
        data_root / name,
        database_url,
        {"MQCHAT_AUTH__SECRET": "cluster-test-secret-of-enough-length", **(env or {})},
        args=("--redis-url", redis_url, "--node-id", name, "--log-level", "INFO"),
        log_path=data_root / f"{name}.log",
    )


@contextlib.asynccontextmanager
async def running(nodes: Sequence[ServerProcess]) -> AsyncIterator[Sequence[ServerProcess]]:
    """Start the nodes together (as a fresh cluster would) and kill whatever is left at the end."""
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        yield nodes
    finally:
        for n in nodes:
            await n.kill()


async def account(server: ServerProcess, user_id: str) -> tuple[str, bytes]:
    """Register (through ``server``) and log in: the token and the user's event key."""
    async with http_client(server) as http:
        created = await http.post("/v1/users", json={"user_id": user_id, "password": PASSWORD})
        assert created.status_code == 201, created.text
        login = await http.post("/v1/token", json={"user_id": user_id, "password": PASSWORD})
        assert login.status_code == 200, login.text
        body = login.json()
        return str(body["access_token"]), decode_key(body["event_key"])


@contextlib.asynccontextmanager
async def device_on(
    server: ServerProcess, user_id: str, device_id: str, token: str, key: bytes, *, topics: Sequence[str] = ()
) -> AsyncIterator[Device]:
    """A device connected to one node, subscribed to its stream and device topics (and ``topics``);
    every event it receives must carry the server's signature."""
    device: Device | None = None

    def received(message: aiomqtt.Message) -> None:
        assert device is not None
        topic, payload = topic_and_payload(message)
        device.received.put_nowait((topic, json.loads(checked_origin(key, topic, payload))))

    async with aiomqtt_client(
        server.mqtt_port, user_id, device_id, token, received, server_may_close=True, keepalive=30
    ) as client:
        device = Device(client, user_id, device_id)
        wanted = [(f"chat/user/{user_id}", 1), (f"chat/device/{user_id}/{device_id}", 1)]
        await client.subscribe(wanted + [(topic, 1) for topic in topics])
        await _catch_up_page(device)
        yield device


async def _catch_up_page(device: Device) -> None:
    """Wait for the catch-up page, keeping whatever else arrived (a presence snapshot) queued."""
    others = []
    async with asyncio.timeout(10):
        while True:
            topic, event = await device.received.get()
            if event.get("type") == "sync_response":
                break
            others.append((topic, event))
    for item in others:
        device.received.put_nowait(item)


def send_command(client_msg_id: str, to_user: str, content: str) -> dict[str, Any]:
    return {"type": "send_message", "client_msg_id": client_msg_id, "to_user": to_user, "content": content}


async def stop_signal(server: ServerProcess) -> None:
    server.signal(signal.SIGSTOP)


async def continue_signal(server: ServerProcess) -> None:
    server.signal(signal.SIGCONT)
