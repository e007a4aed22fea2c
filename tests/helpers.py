"""Test helpers: accounts over real HTTP, and a device that is a real MQTT client (aiomqtt)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import httpx

from mqchat.core.origin import verify
from mqchat.runner import RunningServer

PASSWORD = "correct-horse-1"

UNLIMITED = {
    "send_rate_per_second": 100_000,
    "send_burst": 100_000,
    "user_send_rate_per_second": 100_000,
    "user_send_burst": 100_000,
    "command_rate_per_second": 100_000,
    "command_burst": 100_000,
    "max_new_devices_per_hour": 100_000,
}
"""Limits for tests that send in bursts on purpose: the rate limits are not what they test."""


def http_client(server: RunningServer, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", headers=headers, timeout=30)


async def register(server: RunningServer, user_id: str, password: str = PASSWORD) -> str:
    """Create the user and return an access token."""
    async with http_client(server) as http:
        created = await http.post("/v1/users", json={"user_id": user_id, "password": password})
        assert created.status_code == 201, created.text
        token = await http.post("/v1/token", json={"user_id": user_id, "password": password})
        assert token.status_code == 200, token.text
        return str(token.json()["access_token"])


class Device:
    """One connected device: subscribed to its stream and device topic, recording what arrives."""

    def __init__(self, client: aiomqtt.Client, user_id: str, device_id: str) -> None:
        self.client = client
        self.user_id = user_id
        self.device_id = device_id
        self.received: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    @property
    def inbox(self) -> str:
        return f"chat/in/{self.user_id}/{self.device_id}"

    async def publish(self, payload: dict[str, Any] | bytes | str) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        await self.client.publish(self.inbox, data, qos=1)

    async def send(self, to_user: str, content: str, client_msg_id: str) -> None:
        await self.publish(
            {"type": "send_message", "client_msg_id": client_msg_id, "to_user": to_user, "content": content}
        )

    async def next(self, kind: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next event (of ``kind``, skipping others)."""
        async with asyncio.timeout(timeout):
            while True:
                _, event = await self.received.get()
                if kind is None or event["type"] == kind:
                    return event

    async def collect(self, kind: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        return [await self.next(kind, timeout) for _ in range(count)]

    async def stream_events(self, until_seq: int, timeout: float = 20) -> dict[int, dict[str, Any]]:
        """Stream events by seq, live or from sync pages, until ``until_seq`` is covered."""
        events: dict[int, dict[str, Any]] = {}
        async with asyncio.timeout(timeout):
            while not all(seq in events for seq in range(1, until_seq + 1)):
                _, event = await self.received.get()
                batch = event["events"] if event["type"] == "sync_response" else [event]
                for item in batch:
                    if "seq" in item:
                        events.setdefault(item["seq"], item)
        return events

    async def drain(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Everything that arrives until nothing has for ``quiet`` seconds."""
        out = []
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(quiet):
                    out.append((await self.received.get())[1])
        return out


def checked_origin(key: bytes, topic: str, payload: bytes) -> bytes:
    """The payload without its ``sig``; every event on a stream or device topic must carry the server's."""
    if not topic.startswith(("chat/user/", "chat/device/")):
        return payload
    body = verify(key, payload)
    assert body is not None, f"an event on {topic} without a valid server signature: {payload[:200]!r}"
    return body


@contextlib.asynccontextmanager
async def connect_device(
    server: RunningServer, user_id: str, device_id: str, token: str, *, subscribe: bool = True
) -> AsyncIterator[Device]:
    client = aiomqtt.Client(
        "127.0.0.1",
        server.mqtt_port,
        identifier=f"{user_id}:{device_id}",
        username=user_id,
        password=token,
        keepalive=30,
    )
    async with client:
        device = Device(client, user_id, device_id)

        key = server.services.event_keys.key_for(user_id)

        async def pump() -> None:
            async for message in client.messages:
                topic, payload = str(message.topic), bytes(message.payload)  # type: ignore[arg-type]
                device.received.put_nowait((topic, json.loads(checked_origin(key, topic, payload))))

        task = asyncio.create_task(pump())
        try:
            if subscribe:
                await client.subscribe([(f"chat/user/{user_id}", 1), (f"chat/device/{user_id}/{device_id}", 1)])
            yield device
        finally:
            task.cancel()
            # A connection the server closed ends the iteration with MqttError.
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
