"""Security round 2, MQTT side: Last Wills, retained messages, persistent sessions, QoS 2, and
packets the spec says must close the connection (issue 10). Each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.config import Settings
from mqchat.core import mqtt
from mqchat.core.mqtt import Connack, Connect, Publish, Pubrec, Pubrel, Suback, Subscribe, Will
from mqchat.runner import RunningServer
from tests.security.raw import RawClient, field, packet, raw_client
from tests.support.accounts import UNLIMITED, http_client, register
from tests.support.devices import connect_device
from tests.support.logthrottles import reset_log_throttles

NOT_AUTHORIZED = Connack(False, mqtt.NOT_AUTHORIZED)


@pytest.fixture
async def database_url(tmp_path: Path) -> AsyncIterator[str]:
    """The broker is what is under test: SQLite is enough."""
    yield f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    limits = settings.limits.model_copy(
        update={**UNLIMITED, "max_offline_sessions_per_user": 3, "max_inflight_qos2": 5, "session_expiry_seconds": 3}
    )
    return settings.model_copy(update={"limits": limits})


def port(server: RunningServer) -> int:
    assert server.mqtt_port is not None
    return server.mqtt_port


async def connack_of(raw: RawClient, connect: Connect) -> mqtt.Packet | None:
    await raw.send(connect.encode())
    return await raw.next_packet()


def send_command(client_msg_id: str, to_user: str, content: str) -> bytes:
    return json.dumps(
        {"type": "send_message", "client_msg_id": client_msg_id, "to_user": to_user, "content": content}
    ).encode()


async def group_with(server: RunningServer, owner_token: str, members: list[str]) -> str:
    async with http_client(server, owner_token) as http:
        created = await http.post("/v1/groups", json={"name": "private", "members": members})
        assert created.status_code == 201, created.text
        return str(created.json()["group_id"])


# ------------------------------------------------------------------- wills


async def test_a_will_on_anyone_elses_topic_refuses_the_connect(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, user) for user in ("alice", "bob", "carol")]
    private = await group_with(server, bob, ["carol"])
    forged = send_command("forged", "bob", "forged")
    async with connect_device(server, "bob", "laptop", bob) as laptop:
        await laptop.next("sync_response")
        for topic in (
            "chat/user/bob",
            "chat/device/bob/laptop",
            "chat/presence/carol",
            f"chat/group/{private}",
            "chat/in/bob/laptop",
            "chat/user/alice",  # even the own stream: only the server writes streams
            "chat/in/alice/other",  # another device's inbox of the same user
        ):
            for retain in (False, True):
                will = Will(topic, b'{"type":"new_message","seq":1,"from_user":"carol"}', 1, retain)
                async with raw_client(port(server)) as raw:
                    answer = await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode(), will))
                    assert answer == NOT_AUTHORIZED, (topic, retain, answer)
                    assert await raw.closed()
        # The forged events never reached bob, and his real messages are still his first seqs.
        assert await laptop.drain() == []
        async with http_client(server, carol) as http:
            for i in range(3):
                sent = await http.post(
                    "/v1/messages", json={"client_msg_id": f"real-{i}", "to_user": "bob", "content": "real"}
                )
                assert sent.status_code == 200
        got = [await laptop.next("new_message") for _ in range(3)]
        # seq 1 is the group's creation; carol's real messages follow, none displaced.
        assert [(e["seq"], e["from_user"], e["content"]) for e in got] == [(i, "carol", "real") for i in (2, 3, 4)]
        assert forged not in json.dumps(got).encode()


async def test_refused_connects_are_logged_once_per_kind_per_interval(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack re-run made 900-1,400 refusal lines a second from one token (issue 10)."""
    alice = await register(server, "alice")
    will = Will("chat/user/bob", b"forged", 1, False)
    reset_log_throttles()  # per process: earlier refusals in this test's server count too
    with caplog.at_level(logging.WARNING, logger="mqchat.broker.server"):
        for _ in range(30):
            async with raw_client(port(server)) as raw:
                assert (
                    await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode(), will))
                    == NOT_AUTHORIZED
                )
    refusals = [r for r in caplog.records if r.name == "mqchat.broker.server" and "a will on" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


async def test_a_retained_will_is_refused_even_on_the_own_inbox(server: RunningServer) -> None:
    alice = await register(server, "alice")
    will = Will("chat/in/alice/phone", send_command("w", "alice", "x"), 1, True)
    async with raw_client(port(server)) as raw:
        assert await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode(), will)) == NOT_AUTHORIZED


async def test_a_will_on_the_own_inbox_is_a_command_run_when_the_device_drops(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with connect_device(server, "bob", "laptop", bob) as laptop:
        await laptop.next("sync_response")
        for name, disconnect in (("polite", True), ("dropped", False)):
            will = Will("chat/in/alice/phone", send_command(f"will-{name}", "bob", f"gone ({name})"), 1, False)
            async with raw_client(port(server)) as raw:
                answer = await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode(), will))
                assert answer == Connack(False, mqtt.ACCEPTED)
                if disconnect:
                    await raw.send(mqtt.Disconnect().encode())
            # A DISCONNECT discards the will (MQTT 3.1.2.5); a dropped socket runs it, once.
        got = await laptop.next("new_message")
        assert (got["client_msg_id"], got["content"], got["from_user"]) == ("will-dropped", "gone (dropped)", "alice")
        assert await laptop.drain() == []


# ---------------------------------------------------------------- retained


async def test_nobody_but_the_server_retains_anything(server: RunningServer) -> None:
    """A retained PUBLISH (any QoS) or will from a client is never kept: the broker has no retained
    store but the server's presence, answered from the live state at each SUBSCRIBE."""
    alice = await register(server, "alice")
    for device in range(10):
        async with raw_client(port(server)) as raw:
            answer = await connack_of(raw, Connect(f"alice:d{device}", True, 30, "alice", alice.encode()))
            assert answer == Connack(False, mqtt.ACCEPTED)
            for qos in (0, 1, 2):
                publish = Publish(f"chat/in/alice/d{device}", b"x" * 60_000, qos, True, packet_id=qos or None)
                await raw.send(publish.encode())
            await raw.send(mqtt.Disconnect().encode())
            await raw.closed()
    async with raw_client(port(server)) as raw:
        assert await connack_of(raw, Connect("alice:reader", True, 30, "alice", alice.encode())) == Connack(False)
        topics = ("chat/user/alice", "chat/device/alice/reader", "chat/presence/alice")
        await raw.send(Subscribe(1, tuple((topic, 1) for topic in topics)).encode())
        received = []
        while (packet := await raw.next_packet(timeout=1)) is not None:
            received.append(packet)
            if isinstance(packet, Publish) and packet.qos:
                await raw.send(mqtt.puback(packet.packet_id or 0))
            if len(received) == 3:
                break
    retained = [p for p in received if isinstance(p, Publish) and p.retain]
    assert [p.topic for p in retained] == ["chat/presence/alice"]
    assert all(b"x" * 100 not in p.payload for p in received if isinstance(p, Publish))


# --------------------------------------------------------- persistent sessions


async def test_offline_persistent_sessions_are_bounded_per_user_and_expire(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    for device in range(8):
        async with raw_client(port(server)) as raw:
            answer = await connack_of(raw, Connect(f"alice:p{device}", False, 30, "alice", alice.encode()))
            assert answer == Connack(False, mqtt.ACCEPTED)
            await raw.send(Subscribe(1, (("chat/user/alice", 1), ("chat/device/alice/p" + str(device), 1))).encode())
            assert isinstance(await raw.next_packet(), Suback)
            await raw.send(mqtt.Disconnect().encode())
            await raw.closed()
    assert server.broker.stats["offline_sessions"] == 3  # limits.max_offline_sessions_per_user
    # Messages to a user with offline sessions queue nowhere: the store and the cursor deliver them.
    async with http_client(server, bob) as http:
        for i in range(20):
            await http.post("/v1/messages", json={"client_msg_id": f"m{i}", "to_user": "alice", "content": "x" * 1000})
    # The newest is resumed (session present) and caught up from its cursor.
    async with raw_client(port(server)) as raw:
        assert await connack_of(raw, Connect("alice:p7", False, 30, "alice", alice.encode())) == Connack(True)
        page = await raw.next_packet()
        assert isinstance(page, Publish) and page.topic == "chat/device/alice/p7"
        assert b'"sync_response"' in page.payload and b'"latest_seq":20' in page.payload
        await raw.send(mqtt.Disconnect().encode())
    async with raw_client(port(server)) as raw:  # an evicted one starts afresh
        assert await connack_of(raw, Connect("alice:p0", False, 30, "alice", alice.encode())) == Connack(False)
        await raw.send(mqtt.Disconnect().encode())
    await asyncio.sleep(3.2)  # limits.session_expiry_seconds = 3
    assert server.broker._sessions.expire() >= 1
    assert server.broker.stats["offline_sessions"] == 0


# ------------------------------------------------------------------- QoS 2


async def test_qos2_sends_are_handled_once_and_unreleased_ones_are_bounded(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with connect_device(server, "bob", "laptop", bob) as laptop, raw_client(port(server)) as raw:
        await laptop.next("sync_response")
        assert await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode())) == Connack(False)
        command = Publish("chat/in/alice/phone", send_command("q2", "bob", "exactly once"), 2, packet_id=7)
        await raw.send(command.encode())
        assert await raw.next_packet() == Pubrec(7)
        await raw.send(Publish(command.topic, command.payload, 2, dup=True, packet_id=7).encode())  # a resend
        assert await raw.next_packet() == Pubrec(7)
        await raw.send(Pubrel(7).encode())
        assert await raw.next_packet() == mqtt.Pubcomp(7)
        assert (await laptop.next("new_message"))["content"] == "exactly once"
        assert await laptop.drain() == []
        # Six QoS 2 PUBLISHes never released: limits.max_inflight_qos2 = 5 closes the connection.
        for packet_id in range(10, 16):
            await raw.send(Publish("chat/in/alice/phone", b'{"type":"typing"}', 2, packet_id=packet_id).encode())
        assert await raw.closed()


async def test_subscriptions_are_granted_at_qos1_at_most(server: RunningServer) -> None:
    alice = await register(server, "alice")
    async with raw_client(port(server)) as raw:
        assert await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode())) == Connack(False)
        await raw.send(Subscribe(3, (("chat/user/alice", 2), ("chat/device/alice/phone", 0))).encode())
        assert await raw.next_packet() == Suback(3, (1, 0))


# --------------------------------------------------- packets that must close


@pytest.mark.parametrize(
    "violation",
    [
        packet(0x32, field(b"chat/in/alice/\x00phone") + b"\x00\x01{}"),  # NUL in a topic
        packet(0x82, b"\x00\x01"),  # SUBSCRIBE without a filter
        packet(0x82, b"\x00\x01" + field(b"chat/user/alice") + b"\x03"),  # requested QoS 3
        packet(0x82, b"\x00\x01" + field(b"chat/user/\x00") + b"\x01"),  # NUL in a filter
        packet(0xA2, b"\x00\x01"),  # UNSUBSCRIBE without a filter
    ],
    ids=["nul-topic", "empty-subscribe", "qos3-subscribe", "nul-filter", "empty-unsubscribe"],
)
async def test_packets_the_spec_calls_malformed_close_the_connection(server: RunningServer, violation: bytes) -> None:
    alice = await register(server, "alice")
    async with raw_client(port(server)) as raw:
        assert await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode())) == Connack(False)
        await raw.send(violation)
        assert await raw.next_packet() is None  # closed, with no SUBACK or anything else first


async def test_a_sends_puback_comes_once_it_is_stored_and_pubacks_keep_their_order(server: RunningServer) -> None:
    """PUBACK means stored: a send's PUBACK follows its message_ack; a command published after
    it (a typing, answered at once) still gets its PUBACK after the send's (MQTT 3.1.1, 4.6)."""
    alice, _ = await register(server, "alice"), await register(server, "bob")
    async with raw_client(port(server)) as raw:
        assert await connack_of(raw, Connect("alice:phone", True, 30, "alice", alice.encode())) == Connack(False)
        await raw.send(Subscribe(1, (("chat/device/alice/phone", 1),)).encode())
        assert isinstance(await raw.next_packet(), Suback)
        page = await raw.next_packet()
        assert isinstance(page, Publish) and b"sync_response" in page.payload
        await raw.send(mqtt.puback(page.packet_id or 0))
        await raw.send(Publish("chat/in/alice/phone", send_command("m-1", "bob", "hi"), 1, packet_id=11).encode())
        typing = b'{"type":"typing","to_user":"bob","state":"started"}'
        await raw.send(Publish("chat/in/alice/phone", typing, 1, packet_id=12).encode())
        order = []
        while len([p for p in order if isinstance(p, mqtt.Puback)]) < 2:
            packet = await raw.next_packet()
            assert packet is not None
            order.append(packet)
    kinds = [
        ("ack" if b"message_ack" in p.payload else "event") if isinstance(p, Publish) else f"puback {p.packet_id}"
        for p in order
        if isinstance(p, Publish | mqtt.Puback)
    ]
    assert kinds.index("ack") < kinds.index("puback 11") < kinds.index("puback 12"), kinds
