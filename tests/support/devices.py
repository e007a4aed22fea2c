"""A device that is a real MQTT client (aiomqtt), and the check that its events are the server's."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt

from mqchat.clients.client import read_disconnection
from mqchat.core.origin import verify
from mqchat.runner import RunningServer


@contextlib.asynccontextmanager
async def aiomqtt_client(
    port: int | None,
    user_id: str,
    device_id: str,
    token: str,
    on_message: Callable[[aiomqtt.Message], None],
    *,
    server_may_close: bool = False,
    **options: Any,
) -> AsyncIterator[aiomqtt.Client]:
    """An aiomqtt client connected as ``{user_id}:{device_id}``; every message it receives
    goes to ``on_message`` (from a task that runs while the client is in use).

    ``server_may_close``: a connection the server closed ends the message loop with
    ``MqttError``; without this flag that error fails the test when the client is left."""
    assert port is not None, "the server has no plain MQTT listener"
    client = aiomqtt.Client(
        "127.0.0.1", port, identifier=f"{user_id}:{device_id}", username=user_id, password=token, **options
    )
    try:
        async with client:

            async def pump() -> None:
                async for message in client.messages:
                    on_message(message)

            task = asyncio.create_task(pump())
            try:
                yield client
            finally:
                task.cancel()
                ignored = (asyncio.CancelledError, aiomqtt.MqttError) if server_may_close else (asyncio.CancelledError,)
                with contextlib.suppress(*ignored):
                    await task
    finally:
        # A connection the server closed after the pump stopped leaves its error unread, and
        # asyncio would report it in whichever test collects the client (test_admin's stderr).
        read_disconnection(client)


def topic_and_payload(message: aiomqtt.Message) -> tuple[str, bytes]:
    return str(message.topic), bytes(message.payload)


def checked_origin(key: bytes, topic: str, payload: bytes) -> bytes:
    """The payload without its ``sig``; every event on a stream or device topic must carry the server's."""
    if not topic.startswith(("chat/user/", "chat/device/")):
        return payload
    body = verify(key, payload)
    assert body is not None, f"an event on {topic} without a valid server signature: {payload[:200]!r}"
    return body


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
                if kind is None or event.get("type") == kind:
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


@contextlib.asynccontextmanager
async def connect_device(
    server: RunningServer, user_id: str, device_id: str, token: str, *, subscribe: bool = True
) -> AsyncIterator[Device]:
    key = server.services.event_keys.key_for(user_id)
    device: Device | None = None

    def received(message: aiomqtt.Message) -> None:
        assert device is not None
        topic, payload = topic_and_payload(message)
        device.received.put_nowait((topic, json.loads(checked_origin(key, topic, payload))))

    async with aiomqtt_client(
        server.mqtt_port, user_id, device_id, token, received, server_may_close=True, keepalive=30
    ) as client:
        device = Device(client, user_id, device_id)
        if subscribe:
            await client.subscribe([(f"chat/user/{user_id}", 1), (f"chat/device/{user_id}/{device_id}", 1)])
        yield device
