"""A full 1:1 exchange with each third-party MQTT client: paho-mqtt, aiomqtt, mosquitto_pub/sub.

Each exchange: alice sends to bob; bob receives a ``new_message`` with the
``server_msg_id`` of alice's ``message_ack``; bob replies; alice receives it. Every
event is compared field by field with what protocol v1 promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiomqtt
import pytest

from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register
from tests.support.devices import aiomqtt_client, checked_origin, topic_and_payload
from tests.support.paho import PahoDevice, paho_device
from tests.support.services import service_missing

pytestmark = pytest.mark.interop

TIMEOUT = 10.0
HELLO = "Hello Bob! \N{WAVING HAND SIGN} ça va?"
REPLY = "Hi Alice! \N{SNOWMAN} très bien"


class Endpoint(Protocol):
    user_id: str
    device_id: str

    async def send(self, to_user: str, content: str, client_msg_id: str) -> None: ...

    async def next(self, kind: str) -> tuple[str, dict[str, Any]]: ...

    async def drain(self) -> list[tuple[str, dict[str, Any]]]: ...


def command(to_user: str, content: str, client_msg_id: str) -> bytes:
    return json.dumps(
        {
            "type": "send_message",
            "client_msg_id": client_msg_id,
            "to_user": to_user,
            "content": content,
            "msg_type": "text",
        }
    ).encode()


class _Received:
    """What a device received, as (topic, event), with the ``next`` and ``drain`` every endpoint shares.

    The broker delivers each message in its own task, so events on a device's two topics
    (an ack, a stream event) may arrive in either order: ``next`` keeps the others aside,
    and ``drain`` returns them, so that every event is accounted for.
    """

    def __init__(self, key: bytes, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        self.key = key  # the user's event key: every event must carry the server's signature
        self.queue = queue
        self._aside: list[tuple[str, dict[str, Any]]] = []

    async def next(self, kind: str) -> tuple[str, dict[str, Any]]:
        for index, (topic, event) in enumerate(self._aside):
            if event["type"] == kind:
                del self._aside[index]
                return topic, event
        async with asyncio.timeout(TIMEOUT):
            while True:
                topic, payload = await self.queue.get()
                event = json.loads(checked_origin(self.key, topic, payload))
                if event["type"] == kind:
                    return topic, event
                self._aside.append((topic, event))

    async def drain(self, quiet: float = 0.3) -> list[tuple[str, dict[str, Any]]]:
        out, self._aside = self._aside, []
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(quiet):
                    topic, payload = await self.queue.get()
                out.append((topic, json.loads(checked_origin(self.key, topic, payload))))
        return out


# ------------------------------------------------------------------ paho-mqtt (its own network thread)


class PahoEndpoint(_Received):
    def __init__(self, paho: PahoDevice, user_id: str, device_id: str, key: bytes) -> None:
        super().__init__(key, paho.messages)
        self.paho = paho
        self.user_id = user_id
        self.device_id = device_id

    async def send(self, to_user: str, content: str, client_msg_id: str) -> None:
        # Returns once PUBACKed.
        await self.paho.publish(f"chat/in/{self.user_id}/{self.device_id}", command(to_user, content, client_msg_id))


@contextlib.asynccontextmanager
async def paho_endpoint(
    server: RunningServer, user_id: str, device_id: str, token: str, *, websocket: bool = False
) -> AsyncIterator[PahoEndpoint]:
    async with paho_device(
        server, f"{user_id}:{device_id}", user_id, token, websocket=websocket, timeout=TIMEOUT
    ) as paho:
        assert await paho.connect() == 0
        assert await paho.subscribe([f"chat/user/{user_id}", f"chat/device/{user_id}/{device_id}"]) == [1, 1]
        yield PahoEndpoint(paho, user_id, device_id, server.services.event_keys.key_for(user_id))


# ------------------------------------------------------------------ aiomqtt


class AiomqttEndpoint(_Received):
    def __init__(self, user_id: str, device_id: str, key: bytes) -> None:
        super().__init__(key, asyncio.Queue())
        self.client: aiomqtt.Client | None = None
        self.user_id = user_id
        self.device_id = device_id

    def received(self, message: aiomqtt.Message) -> None:
        self.queue.put_nowait(topic_and_payload(message))

    async def send(self, to_user: str, content: str, client_msg_id: str) -> None:
        assert self.client is not None
        async with asyncio.timeout(TIMEOUT):
            await self.client.publish(
                f"chat/in/{self.user_id}/{self.device_id}", command(to_user, content, client_msg_id), qos=1
            )


@contextlib.asynccontextmanager
async def aiomqtt_endpoint(
    server: RunningServer, user_id: str, device_id: str, token: str
) -> AsyncIterator[AiomqttEndpoint]:
    endpoint = AiomqttEndpoint(user_id, device_id, server.services.event_keys.key_for(user_id))
    async with aiomqtt_client(
        server.mqtt_port, user_id, device_id, token, endpoint.received,
        protocol=aiomqtt.ProtocolVersion.V311, keepalive=30, timeout=TIMEOUT,
    ) as client:  # fmt: skip
        endpoint.client = client
        async with asyncio.timeout(TIMEOUT):
            granted = await client.subscribe([(f"chat/user/{user_id}", 1), (f"chat/device/{user_id}/{device_id}", 1)])
        assert [getattr(code, "value", code) for code in granted] == [1, 1]
        yield endpoint


# ------------------------------------------------------------------ the exchange


def expected_new_message(ack: dict[str, Any], seq: int, sender: str, recipient: str, content: str) -> dict[str, Any]:
    return {
        "type": "new_message",
        "seq": seq,
        "server_msg_id": ack["server_msg_id"],
        "client_msg_id": ack["client_msg_id"],
        "from_user": sender,
        "to_user": recipient,
        "content": content,
        "msg_type": "text",
        "created_at": ack["created_at"],
    }


def check_ack(ack: dict[str, Any], client_msg_id: str, seq: int) -> None:
    assert set(ack) == {"type", "client_msg_id", "server_msg_id", "seq", "status", "created_at", "duplicate"}
    assert (ack["type"], ack["client_msg_id"], ack["seq"], ack["status"], ack["duplicate"]) == (
        "message_ack",
        client_msg_id,
        seq,
        "sent",
        False,
    )
    assert isinstance(ack["server_msg_id"], int) and ack["server_msg_id"] >= 1
    assert isinstance(ack["created_at"], str) and ack["created_at"].endswith("Z")


async def exchange(alice: Endpoint, bob: Endpoint) -> None:
    alice_device = f"chat/device/alice/{alice.device_id}"
    bob_device = f"chat/device/bob/{bob.device_id}"
    empty_page = {"type": "sync_response", "events": [], "latest_seq": 0, "has_more": False}
    # The catch-up page each device gets on subscribing: nothing yet.
    assert await alice.next("sync_response") == (alice_device, empty_page)
    assert await bob.next("sync_response") == (bob_device, empty_page)

    await alice.send("bob", HELLO, "m-1")
    topic, ack = await alice.next("message_ack")
    assert topic == alice_device
    check_ack(ack, "m-1", seq=1)
    hello = expected_new_message(ack, 1, "alice", "bob", HELLO)
    assert await bob.next("new_message") == ("chat/user/bob", hello)
    assert await alice.next("new_message") == ("chat/user/alice", hello)  # the sender's own stream

    await bob.send("alice", REPLY, "r-1")
    topic, reply_ack = await bob.next("message_ack")
    assert topic == bob_device
    check_ack(reply_ack, "r-1", seq=2)  # bob's stream: alice's message, then his reply
    assert reply_ack["server_msg_id"] > ack["server_msg_id"]
    reply = expected_new_message(reply_ack, 2, "bob", "alice", REPLY)
    assert await alice.next("new_message") == ("chat/user/alice", reply)
    assert await bob.next("new_message") == ("chat/user/bob", reply)

    # Nothing else, and nothing left in flight when the clients leave.
    assert await alice.drain() == []
    assert await bob.drain() == []


async def test_paho_exchange(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        paho_endpoint(server, "alice", "paho-phone", alice_token) as alice,
        paho_endpoint(server, "bob", "paho-laptop", bob_token) as bob,
    ):
        await exchange(alice, bob)


async def test_aiomqtt_exchange(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        aiomqtt_endpoint(server, "alice", "aio-phone", alice_token) as alice,
        aiomqtt_endpoint(server, "bob", "aio-laptop", bob_token) as bob,
    ):
        await exchange(alice, bob)


async def test_paho_over_websocket_exchange(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        paho_endpoint(server, "alice", "browser", alice_token, websocket=True) as alice,
        paho_endpoint(server, "bob", "ws-laptop", bob_token, websocket=True) as bob,
    ):
        await exchange(alice, bob)


async def test_mixed_clients_exchange(server: RunningServer) -> None:
    """Clients of different libraries and transports talk to each other."""
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        paho_endpoint(server, "alice", "browser", alice_token, websocket=True) as alice,
        aiomqtt_endpoint(server, "bob", "aio-laptop", bob_token) as bob,
    ):
        await exchange(alice, bob)


# ------------------------------------------------------------------ mosquitto_pub / mosquitto_sub

MOSQUITTO_TOOLS = ("mosquitto_pub", "mosquitto_sub")


def mosquitto_tools() -> dict[str, str]:
    found = {name: shutil.which(name) for name in MOSQUITTO_TOOLS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        service_missing(f"{' and '.join(missing)} not installed (Debian package mosquitto-clients)")
    return {name: path for name, path in found.items() if path is not None}


def connection_args(server: RunningServer, user_id: str, device_id: str, token: str) -> list[str]:
    return [
        "-h",
        "127.0.0.1",
        "-p",
        str(server.mqtt_port),
        "-V",
        "mqttv311",
        "-i",
        f"{user_id}:{device_id}",
        "-u",
        user_id,
        "-P",
        token,
        "-q",
        "1",
    ]


class MosquittoSub:
    """``mosquitto_sub -v`` on a device's two topics, stopping by itself after ``count`` messages."""

    def __init__(self, process: asyncio.subprocess.Process, key: bytes) -> None:
        self.process = process
        self.key = key

    async def next(self, kind: str) -> tuple[str, dict[str, Any]]:
        assert self.process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            line = await self.process.stdout.readline()
        assert line, f"mosquitto_sub ended early: {await self.stderr()}"
        topic, _, payload = line.decode().rstrip("\n").partition(" ")
        event = json.loads(checked_origin(self.key, topic, payload.encode()))
        assert event["type"] == kind, (topic, event)
        return topic, event

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                return (await self.process.stderr.read()).decode(errors="replace")
        return ""

    async def finish(self) -> tuple[int | None, bytes]:
        """Wait for it to exit on its own (``-C``); returns its exit code and any further output."""
        async with asyncio.timeout(TIMEOUT):
            rest, _ = await self.process.communicate()
        return self.process.returncode, rest


@contextlib.asynccontextmanager
async def mosquitto_sub(
    tools: dict[str, str], server: RunningServer, user_id: str, device_id: str, token: str, count: int
) -> AsyncIterator[MosquittoSub]:
    process = await asyncio.create_subprocess_exec(
        tools["mosquitto_sub"],
        *connection_args(server, user_id, device_id, token),
        "-t",
        f"chat/user/{user_id}",
        "-t",
        f"chat/device/{user_id}/{device_id}",
        "-v",
        "-C",
        str(count),
        "-W",
        "20",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield MosquittoSub(process, server.services.event_keys.key_for(user_id))
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def mosquitto_pub(
    tools: dict[str, str], server: RunningServer, user_id: str, device_id: str, token: str, payload: bytes
) -> None:
    process = await asyncio.create_subprocess_exec(
        tools["mosquitto_pub"],
        *connection_args(server, user_id, device_id, token),
        "-t",
        f"chat/in/{user_id}/{device_id}",
        "-m",
        payload.decode(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 0, (out, err)


async def resend_over_http(
    server: RunningServer, token: str, to_user: str, content: str, client_msg_id: str
) -> dict[str, Any]:
    """The message_ack of an already stored message, by an idempotent retry."""
    async with http_client(server, token) as http:
        response = await http.post(
            "/v1/messages",
            json={"client_msg_id": client_msg_id, "to_user": to_user, "content": content, "msg_type": "text"},
        )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


async def test_mosquitto_cli_exchange(server: RunningServer) -> None:
    tools = mosquitto_tools()
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    # Each terminal's mosquitto_sub sees: its catch-up page, then two new_message events.
    async with (
        mosquitto_sub(tools, server, "alice", "term", alice_token, count=3) as alice,
        mosquitto_sub(tools, server, "bob", "term", bob_token, count=3) as bob,
    ):
        empty_page = {"type": "sync_response", "events": [], "latest_seq": 0, "has_more": False}
        assert await alice.next("sync_response") == ("chat/device/alice/term", empty_page)
        assert await bob.next("sync_response") == ("chat/device/bob/term", empty_page)

        await mosquitto_pub(tools, server, "alice", "cli", alice_token, command("bob", HELLO, "m-1"))
        topic, hello = await bob.next("new_message")
        assert topic == "chat/user/bob"
        # mosquitto_pub cannot see the message_ack on its device topic (it subscribes to nothing and is
        # gone by then); an idempotent retry over HTTP returns that same ack, marked duplicate.
        ack = await resend_over_http(server, alice_token, "bob", HELLO, "m-1")
        assert ack == {
            "type": "message_ack",
            "client_msg_id": "m-1",
            "server_msg_id": hello["server_msg_id"],
            "seq": 1,
            "status": "sent",
            "created_at": hello["created_at"],
            "duplicate": True,
        }
        assert hello == expected_new_message(ack, 1, "alice", "bob", HELLO)
        assert await alice.next("new_message") == ("chat/user/alice", hello)

        await mosquitto_pub(tools, server, "bob", "cli", bob_token, command("alice", REPLY, "r-1"))
        topic, reply = await alice.next("new_message")
        assert topic == "chat/user/alice"
        reply_ack = await resend_over_http(server, bob_token, "alice", REPLY, "r-1")
        assert (reply_ack["server_msg_id"], reply_ack["seq"], reply_ack["duplicate"]) == (
            reply["server_msg_id"],
            2,
            True,
        )
        assert reply == expected_new_message(reply_ack, 2, "bob", "alice", REPLY)
        assert reply["server_msg_id"] > hello["server_msg_id"]
        assert await bob.next("new_message") == ("chat/user/bob", reply)

        # Both stop by themselves after their third message (-C 3), with nothing more to say.
        assert await alice.finish() == (0, b"")
        assert await bob.finish() == (0, b"")
