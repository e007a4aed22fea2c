"""Presence, typing and the group-topic ACL, end to end with real MQTT clients.

Presence is a retained ``chat/presence/{user}`` that flips when a user's first device
connects and when the last one goes (clean DISCONNECT, or a silent socket closed at
1.5 x keep-alive). Typing is ephemeral: on the peer's stream topic or the group topic,
never stored, throttled per device. Group topics are checked on SUBSCRIBE and again on
every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt

from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register
from tests.support.devices import Device, aiomqtt_client, connect_device, topic_and_payload

GRANTED_QOS1 = 1
SUBACK_FAILURE = 0x80
TEST_BUDGET = 18  # seconds: every test finishes well under the 20 s it is allowed


# --------------------------------------------------------------------------- helpers


@dataclass
class Watcher:
    """A raw aiomqtt client that subscribes to extra topics and records (topic, payload, retain)."""

    client: aiomqtt.Client
    received: asyncio.Queue[tuple[str, dict[str, Any], bool]] = field(default_factory=asyncio.Queue)

    async def subscribe(self, topic: str) -> list[int]:
        """The SUBACK return codes (granted QoS, or 0x80 for a refusal)."""
        codes = await self.client.subscribe(topic, qos=1)
        return [int(getattr(code, "value", code)) for code in codes]

    async def next(self, timeout: float = 5) -> tuple[str, dict[str, Any], bool]:
        async with asyncio.timeout(timeout):
            return await self.received.get()

    async def quiet(self, seconds: float = 0.5) -> list[tuple[str, dict[str, Any], bool]]:
        """Everything that arrives within ``seconds`` (expected: nothing)."""
        await asyncio.sleep(seconds)
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out


@contextlib.asynccontextmanager
async def watcher(server: RunningServer, user_id: str, device_id: str, token: str) -> AsyncIterator[Watcher]:
    queue: asyncio.Queue[tuple[str, dict[str, Any], bool]] = asyncio.Queue()

    def received(message: aiomqtt.Message) -> None:
        topic, payload = topic_and_payload(message)
        queue.put_nowait((topic, json.loads(payload), bool(message.retain)))

    async with aiomqtt_client(server.mqtt_port, user_id, device_id, token, received) as client:
        yield Watcher(client, queue)


async def next_on(device: Device, topic: str, timeout: float = 5) -> dict[str, Any]:
    """The next event a helper ``Device`` receives, which must arrive on ``topic``."""
    async with asyncio.timeout(timeout):
        got_topic, event = await device.received.get()
    assert got_topic == topic, (got_topic, event)
    return event


async def typing_events(device: Device, quiet: float = 0.5) -> list[dict[str, Any]]:
    return [event for event in await device.drain(quiet) if event["type"] == "typing"]


async def send_over_http(server: RunningServer, token: str, to_user: str, client_msg_id: str) -> dict[str, Any]:
    async with http_client(server, token) as http:
        response = await http.post(
            "/v1/messages", json={"client_msg_id": client_msg_id, "to_user": to_user, "content": client_msg_id}
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def parse_time(value: Any) -> datetime:
    assert isinstance(value, str) and value.endswith("Z"), value
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None
    return moment


def raw_connect_packet(client_id: str, username: str, password: str, keepalive: int) -> bytes:
    """An MQTT 3.1.1 CONNECT: username + password + clean session."""

    def utf8(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(2, "big") + data

    body = utf8("MQTT") + bytes([4, 0xC2]) + keepalive.to_bytes(2, "big")
    body += utf8(client_id) + utf8(username) + utf8(password)
    remaining, length = bytearray(), len(body)
    while True:
        length, digit = divmod(length, 128)
        remaining.append(digit | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x10]) + bytes(remaining) + body


async def create_group(server: RunningServer, token: str, owner: str, members: list[str]) -> str:
    async with http_client(server, token) as http:
        response = await http.post("/v1/groups", json={"name": "trio", "members": members})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["owner"] == owner and sorted(body["members"]) == sorted({owner, *members})
    return str(body["group_id"])


async def remove_member(server: RunningServer, token: str, group_id: str, user_id: str) -> None:
    async with http_client(server, token) as http:
        response = await http.delete(f"/v1/groups/{group_id}/members/{user_id}")
    assert response.status_code == 204, response.text


# -------------------------------------------------------------------------- presence


async def presence_over_http(server: RunningServer, token: str, user_id: str) -> tuple[int, dict[str, Any]]:
    async with http_client(server, token) as http:
        response = await http.get(f"/v1/users/{user_id}/presence")
    return response.status_code, dict(response.json())


async def test_presence_follows_the_first_and_the_last_device(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, user) for user in ("alice", "bob", "carol")]
    await send_over_http(server, alice, "bob", "hello-bob")  # bob and alice now share a conversation
    topic = "chat/presence/alice"
    async with asyncio.timeout(TEST_BUDGET):
        async with watcher(server, "bob", "watch", bob) as bob_watch, watcher(server, "carol", "watch", carol) as spy:
            assert await bob_watch.subscribe(topic) == [GRANTED_QOS1]
            assert await spy.subscribe(topic) == [SUBACK_FAILURE]  # carol shares nothing with alice
            never = {"user_id": "alice", "status": "offline", "last_seen": None}
            assert await bob_watch.next() == (topic, never, True)  # alice never connected: offline, retained
            assert await bob_watch.quiet(0.3) == []
            assert await presence_over_http(server, bob, "alice") == (200, never)

            async with connect_device(server, "alice", "phone", alice, subscribe=False):
                got_topic, online, _ = await bob_watch.next()
                assert got_topic == topic
                assert online == {"user_id": "alice", "status": "online", "last_seen": online["last_seen"]}
                came_online = parse_time(online["last_seen"])
                assert abs((datetime.now(UTC) - came_online).total_seconds()) < 5
                assert await presence_over_http(server, bob, "alice") == (200, online)

                async with connect_device(server, "alice", "laptop", alice, subscribe=False):
                    assert await bob_watch.quiet() == []  # a second device changes nothing
                    async with watcher(server, "bob", "late", bob) as late:
                        await late.quiet(0.3)  # what amqtt pushes on CONNECT: see the retained-leak test below
                        assert await late.subscribe(topic) == [GRANTED_QOS1]
                        assert await late.next() == (topic, online, True)  # the retained state
                        assert await late.quiet(0.3) == []
                assert await bob_watch.quiet() == []  # the laptop left, the phone is still there
                status, body = await presence_over_http(server, bob, "alice")
                assert status == 200 and body["status"] == "online", body

            got_topic, offline, _ = await bob_watch.next()
            assert got_topic == topic
            assert offline == {"user_id": "alice", "status": "offline", "last_seen": offline["last_seen"]}
            assert parse_time(offline["last_seen"]) > came_online  # a full second of quiet() in between
            assert await bob_watch.quiet(0.3) == []  # exactly one offline
            assert await presence_over_http(server, bob, "alice") == (200, offline)

            async with watcher(server, "bob", "later", bob) as later:
                await later.quiet(0.3)  # what amqtt pushes on CONNECT: see the retained-leak test below
                assert await later.subscribe(topic) == [GRANTED_QOS1]
                assert await later.next() == (topic, offline, True)
                assert await later.quiet(0.3) == []
            # The refused subscription saw neither the retained nor the live presence.
            assert await spy.quiet(0.1) == []
            status, body = await presence_over_http(server, carol, "alice")
            assert status == 404 and body["error"]["code"] == "not_found", body


# amqtt 0.12 pushed, on every CONNECT, the retained messages of every client's filters to the
# connecting client without an ACL check; the broker sends them only to holders of the filter.
async def test_retained_presence_reaches_only_those_who_subscribe(server: RunningServer) -> None:
    alice, bob, dave = [await register(server, user) for user in ("alice", "bob", "dave")]
    await send_over_http(server, alice, "bob", "hello-bob")
    topic = "chat/presence/alice"
    async with asyncio.timeout(TEST_BUDGET), watcher(server, "bob", "watch", bob) as bob_watch:
        assert await bob_watch.subscribe(topic) == [GRANTED_QOS1]
        assert (await bob_watch.next())[1]["status"] == "offline"  # the state at SUBSCRIBE, retained
        async with connect_device(server, "alice", "phone", alice, subscribe=False):
            _, online, _ = await bob_watch.next()
            assert online["status"] == "online"
            # dave shares nothing with alice and subscribes to nothing: he must receive nothing.
            async with watcher(server, "dave", "watch", dave) as stranger:
                assert await stranger.quiet() == []
                assert await stranger.subscribe(topic) == [SUBACK_FAILURE]
                assert await stranger.quiet(0.3) == []


async def test_a_silent_device_goes_offline_at_one_and_a_half_keepalives(server: RunningServer) -> None:
    alice, bob = [await register(server, user) for user in ("alice", "bob")]
    await send_over_http(server, alice, "bob", "hello-bob")
    topic = "chat/presence/alice"
    async with asyncio.timeout(TEST_BUDGET), watcher(server, "bob", "watch", bob) as bob_watch:
        assert await bob_watch.subscribe(topic) == [GRANTED_QOS1]
        assert (await bob_watch.next())[1]["status"] == "offline"  # the state at SUBSCRIBE, retained
        reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
        try:
            writer.write(raw_connect_packet("alice:dead", "alice", alice, keepalive=2))
            await writer.drain()
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
            connacked = time.monotonic()
            _, online, _ = await bob_watch.next()
            assert online["status"] == "online"
            # Now the device says nothing at all, not even PINGREQ.
            _, offline, _ = await bob_watch.next(timeout=4.5 - (time.monotonic() - connacked))
            silent_for = time.monotonic() - connacked
            assert offline == {"user_id": "alice", "status": "offline", "last_seen": offline["last_seen"]}
            parse_time(offline["last_seen"])
            assert 2.5 <= silent_for <= 4.5, silent_for
            async with asyncio.timeout(1.5):
                # The server closed the connection: the read reaches EOF. (What it reads before EOF is
                # alice's own presence, pushed by amqtt on CONNECT: see the retained-leak test below.)
                await reader.read()
            assert reader.at_eof()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# ---------------------------------------------------------------------------- typing


async def test_typing_reaches_the_peer_is_throttled_and_never_stored(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, user) for user in ("alice", "bob", "carol")]
    await send_over_http(server, alice, "bob", "before")
    async with (
        asyncio.timeout(TEST_BUDGET),
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "bob", "laptop", bob) as laptop,
        connect_device(server, "carol", "tablet", carol) as tablet,
    ):
        for device in (phone, laptop, tablet):
            await device.next("sync_response")

        started = {"type": "typing", "from_user": "alice", "to_user": "bob", "state": "started"}
        stopped = {**started, "state": "stopped"}
        await phone.publish({"type": "typing", "to_user": "bob", "state": "started"})
        assert await next_on(laptop, "chat/user/bob") == started  # exactly: no seq
        await phone.publish({"type": "typing", "to_user": "bob", "state": "started"})  # a repeat: dropped
        await phone.publish({"type": "typing", "to_user": "bob", "state": "stopped"})  # a change: passes
        assert await next_on(laptop, "chat/user/bob") == stopped
        assert await laptop.drain() == []
        await asyncio.sleep(1.1)  # the throttle interval (1 s) has passed: the same state goes through again
        await phone.publish({"type": "typing", "to_user": "bob", "state": "stopped"})
        assert await next_on(laptop, "chat/user/bob") == stopped

        # carol shares no conversation with alice
        await phone.publish({"type": "typing", "to_user": "carol", "state": "started"})
        error = await next_on(phone, "chat/device/alice/phone")
        assert error["type"] == "error" and error["code"] == "not_found", error
        assert await typing_events(tablet) == []
        assert await phone.drain(0.1) == []

        await send_over_http(server, alice, "bob", "after")
        assert (await next_on(laptop, "chat/user/bob"))["type"] == "new_message"

    for token, user in ((bob, "bob"), (alice, "alice")):
        async with http_client(server, token) as http:
            response = await http.get("/v1/sync", params={"since_seq": 0})
        assert response.status_code == 200, response.text
        events = response.json()["events"]
        assert [(e["seq"], e["type"], e["content"]) for e in events] == [
            (1, "new_message", "before"),
            (2, "new_message", "after"),
        ], user
        assert response.json()["latest_seq"] == 2


async def test_group_typing_goes_to_the_group_topic_for_members_only(
    server: RunningServer,
) -> None:
    alice, bob, carol, dave = [await register(server, user) for user in ("alice", "bob", "carol", "dave")]
    group_id = await create_group(server, alice, "alice", ["bob", "carol"])
    topic = f"chat/group/{group_id}"
    async with (
        asyncio.timeout(TEST_BUDGET),
        watcher(server, "bob", "watch", bob) as bob_watch,
        watcher(server, "carol", "watch", carol) as carol_watch,
        watcher(server, "dave", "watch", dave) as dave_watch,
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "dave", "phone", dave) as intruder,
    ):
        await phone.next("sync_response")
        await intruder.next("sync_response")
        assert await bob_watch.subscribe(topic) == [GRANTED_QOS1]
        assert await carol_watch.subscribe(topic) == [GRANTED_QOS1]
        assert await dave_watch.subscribe(topic) == [SUBACK_FAILURE]

        await phone.publish({"type": "typing", "group_id": group_id, "state": "started"})
        expected = {"type": "typing", "from_user": "alice", "group_id": group_id, "state": "started"}
        assert await bob_watch.next() == (topic, expected, False)
        assert await carol_watch.next() == (topic, expected, False)

        await intruder.publish({"type": "typing", "group_id": group_id, "state": "started"})
        error = await next_on(intruder, "chat/device/dave/phone")
        assert error["type"] == "error" and error["code"] == "not_a_member", error
        for watch in (bob_watch, carol_watch, dave_watch):
            assert await watch.quiet(0.3) == []
        assert await phone.drain(0.1) == []  # alice is not subscribed to the group topic


async def test_a_removed_member_stops_receiving_on_the_group_topic(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, user) for user in ("alice", "bob", "carol")]
    group_id = await create_group(server, alice, "alice", ["bob", "carol"])
    topic = f"chat/group/{group_id}"
    async with (
        asyncio.timeout(TEST_BUDGET),
        watcher(server, "bob", "watch", bob) as bob_watch,
        watcher(server, "carol", "watch", carol) as carol_watch,
        connect_device(server, "alice", "phone", alice) as phone,
    ):
        await phone.next("sync_response")
        assert await bob_watch.subscribe(topic) == [GRANTED_QOS1]
        assert await carol_watch.subscribe(topic) == [GRANTED_QOS1]
        await phone.publish({"type": "typing", "group_id": group_id, "state": "started"})
        started = {"type": "typing", "from_user": "alice", "group_id": group_id, "state": "started"}
        assert await bob_watch.next() == (topic, started, False)
        assert await carol_watch.next() == (topic, started, False)

        await remove_member(server, alice, group_id, "carol")
        # carol's subscription is still in the broker: only the per-delivery check can stop her.
        subscribers = [session.client_id for session, _ in server.broker._subscriptions.of(topic)]
        assert "carol:watch" in subscribers

        await phone.publish({"type": "typing", "group_id": group_id, "state": "stopped"})
        assert await bob_watch.next() == (topic, {**started, "state": "stopped"}, False)
        assert await carol_watch.quiet() == []

        async with watcher(server, "carol", "again", carol) as again:
            assert await again.subscribe(topic) == [SUBACK_FAILURE]
