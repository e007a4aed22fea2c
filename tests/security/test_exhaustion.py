"""Security round 2: what one token can make the server hold, and how fast it can make it work
(issue 10). Each resource is bounded and refused with a clear answer; each test failed before."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.config import Settings
from mqchat.core import mqtt
from mqchat.core.mqtt import Connack, Connect, Publish, Subscribe
from mqchat.runner import RunningServer
from tests.security.raw import RawClient, raw_client, stalled_socket, ws_frame, ws_handshake
from tests.support.accounts import UNLIMITED, http_client, register
from tests.support.devices import Device, connect_device

BUFFER_LIMIT = 256 * 1024


@pytest.fixture
async def database_url(tmp_path: Path) -> AsyncIterator[str]:
    """The limits are the broker's and the chat service's: SQLite is enough."""
    yield f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"


@pytest.fixture
def extra_limits() -> dict[str, float]:
    """A test narrows the limit it is about with ``@pytest.mark.parametrize("extra_limits", ...)``."""
    return {}


@pytest.fixture
def settings(settings: Settings, extra_limits: dict[str, float]) -> Settings:
    update = {**UNLIMITED, "max_connections_per_listener": 20, **extra_limits}
    return settings.model_copy(update={"limits": settings.limits.model_copy(update=update)})


def command(kind: str, **fields: object) -> dict[str, object]:
    return {"type": kind, **fields}


async def flood(sender: Device, to_user: str, count: int, size: int) -> None:
    content = "x" * size
    for i in range(count):
        await sender.publish(command("send_message", client_msg_id=f"f{i}", to_user=to_user, content=content))


async def flood_over_http(server: RunningServer, token: str, to_user: str, count: int, size: int) -> None:
    """Sends from a user with no MQTT connection: only the recipient's devices get the events."""
    async with http_client(server, token) as http:
        for i in range(count):
            body = {"client_msg_id": f"h{i}", "to_user": to_user, "content": "x" * size}
            assert (await http.post("/v1/messages", json=body)).status_code == 200


async def gone(server: RunningServer, user_id: str, timeout: float = 20) -> None:
    """Wait until the user has no live connection on the broker."""
    async with asyncio.timeout(timeout):
        while user_id in server.broker._live:  # noqa: ASYNC110 (broker state has no event to await)
            await asyncio.sleep(0.05)


# ------------------------------------------------------------ slow readers


@pytest.mark.parametrize("extra_limits", [{"max_outgoing_buffer_bytes": BUFFER_LIMIT}])
@pytest.mark.parametrize("transport", ["tcp-qos2", "websocket"])
async def test_a_reader_that_never_reads_is_closed_at_the_buffer_limit(
    server: RunningServer, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    caplog.set_level(logging.WARNING, "mqchat.broker.connection")
    websocket = transport == "websocket"
    port = server.ws_port if websocket else server.mqtt_port
    assert port is not None
    wrap = ws_frame if websocket else (lambda data: data)
    async with stalled_socket(port) as (reader, writer):
        if websocket:
            await ws_handshake(reader, writer)
        writer.write(wrap(Connect("bob:slow", True, 0, "bob", bob.encode()).encode()))
        writer.write(wrap(Subscribe(1, (("chat/user/bob", 2), ("chat/device/bob/slow", 2))).encode()))
        await writer.drain()
        await reader.read(64)  # the CONNACK (and perhaps the SUBACK): from now on we read nothing
        flooding = asyncio.create_task(flood_over_http(server, alice, "bob", 400, 16_000))  # 6.4 MB, unread
        await gone(server, "bob")
        await flooding
    assert "reads too slowly" in caplog.text and "bob:slow" in caplog.text


async def subscribed_to_stream(raw: RawClient, client_id: str, token: str) -> None:
    """Connect as ``client_id`` and subscribe to the user's stream at QoS 1."""
    user_id = client_id.partition(":")[0]
    await raw.send(Connect(client_id, True, 0, user_id, token.encode()).encode())
    await raw.send(Subscribe(1, ((f"chat/user/{user_id}", 1),)).encode())
    await raw.read_packet()  # CONNACK
    await raw.read_packet()  # SUBACK


@pytest.mark.parametrize("extra_limits", [{"max_unacked_deliveries": 50}])
async def test_a_reader_that_never_acknowledges_is_closed_at_the_inflight_limit(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with raw_client(server.mqtt_port or 0) as raw:
        await subscribed_to_stream(raw, "bob:lazy", bob)
        await flood_over_http(server, alice, "bob", 80, 10)  # limits.max_unacked_deliveries = 50; never PUBACKed
        received = 0
        while await raw.read_packet(10):
            received += 1
    assert 50 <= received < 80


@pytest.mark.parametrize("extra_limits", [{"max_unacked_deliveries": 50}])
async def test_a_reader_that_acknowledges_stays_past_the_inflight_limit(server: RunningServer) -> None:
    """PUBACKs that arrive alone or two to a read (the broker's shortcut for them) and with a
    PINGREQ in the same read (through the parser) all free their slots."""
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with raw_client(server.mqtt_port or 0) as raw:
        await subscribed_to_stream(raw, "bob:busy", bob)
        # More than twice the limit, read and acknowledged while it is sent.
        flooding = asyncio.create_task(flood_over_http(server, alice, "bob", 120, 10))
        held: list[bytes] = []
        received = 0
        while received < 120:
            delivered = await raw.read_packet(10)
            assert delivered, f"closed after {received} deliveries"
            if delivered[0] >> 4 != mqtt.PUBLISH:
                continue  # a PINGRESP
            received += 1
            held.append(delivered)
            if len(held) == 3:  # two PUBACKs in one read, then one alone (pauses keep TCP from merging them)
                ids = [_packet_id(p) for p in held]
                await raw.send(b"".join(mqtt.puback(i) for i in ids[:2]))
                await asyncio.sleep(0.01)
                await raw.send(mqtt.puback(ids[2]))
                await asyncio.sleep(0.01)
                held.clear()
        await flooding
        await raw.send(b"".join(mqtt.puback(_packet_id(packet)) for packet in held) + _PINGREQ)
        while (answer := await raw.read_packet(5)) and answer[0] != 0xD0:
            pass
        assert answer and answer[0] == 0xD0  # PINGRESP: still connected


_PINGREQ = b"\xc0\x00"


def _packet_id(publish: bytes) -> int:
    parser = mqtt.Parser(server=False)
    parser.feed(b"\x20\x02\x00\x00" + publish)  # after a CONNACK, as a client reads it
    parser.next()
    packet = parser.next()
    assert isinstance(packet, Publish) and packet.packet_id is not None
    return packet.packet_id


# ------------------------------------------------------------ read floods


async def test_a_sync_flood_is_refused_and_does_not_starve_connects(server: RunningServer, settings: Settings) -> None:
    alice, bob, carol = [await register(server, user) for user in ("alice", "bob", "carol")]
    async with connect_device(server, "bob", "phone", bob) as sender, connect_device(server, "alice", "a", alice) as a:
        await sender.next("sync_response")
        await a.next("sync_response")
        await flood(sender, "alice", 500, 100)
        await a.stream_events(500, timeout=30)
        started = time.monotonic()
        for _ in range(2000):  # pages of 100 events: the flood, not the page size, is under test
            await a.publish(command("sync_messages", since_seq=400, limit=500))
        # Meanwhile another user connects and reads over HTTP, promptly.
        connect_started = time.monotonic()
        async with raw_client(server.mqtt_port or 0) as raw:
            await raw.send(Connect("carol:c", True, 30, "carol", carol.encode()).encode())
            assert await raw.next_packet(timeout=3) == Connack(False, mqtt.ACCEPTED)
        async with http_client(server, carol) as http:
            assert (await http.get("/v1/sync", timeout=3)).status_code == 200
        assert time.monotonic() - connect_started < 3
        answers = await a.drain(1.0)
    pages = [e for e in answers if e["type"] == "sync_response"]
    refused = [e for e in answers if e["type"] == "error" and e["code"] == "rate_limited"]
    elapsed = time.monotonic() - started
    allowed = settings.limits.sync_burst + settings.limits.sync_rate_per_second * elapsed
    assert len(pages) <= allowed and refused, (len(pages), len(refused), elapsed)


async def test_sends_are_limited_per_user_whatever_the_device_ids(server: RunningServer, settings: Settings) -> None:
    # Device buckets stay wide: the user's bucket (10/s, bursts of 30) is what must hold.
    server.services.chat._limits.user_sends._rate, server.services.chat._limits.user_sends._burst = 10, 30.0
    alice, _ = await register(server, "alice"), await register(server, "bob")
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        devices = [await stack.enter_async_context(connect_device(server, "alice", f"d{i}", alice)) for i in range(10)]
        for device in devices:
            await device.next("sync_response")
        for number, device in enumerate(devices):
            for i in range(20):
                await device.send("bob", "x", f"d{number}-{i}")
        answers = [event for device in devices for event in await device.drain(0.5)]
    acks = [e for e in answers if e["type"] == "message_ack"]
    refused = [e for e in answers if e["type"] == "error" and e["code"] == "rate_limited"]
    assert len(acks) + len(refused) == 200
    assert len(acks) <= 30 + 10 * (time.monotonic() - started) + 1


async def test_new_device_ids_per_user_are_bounded(server: RunningServer) -> None:
    server.broker._new_devices._limit = 3
    alice = await register(server, "alice")
    codes = []
    for device in ("a", "b", "c", "d", "a"):
        async with raw_client(server.mqtt_port or 0) as raw:
            await raw.send(Connect(f"alice:{device}", True, 30, "alice", alice.encode()).encode())
            answer = await raw.next_packet()
            assert isinstance(answer, Connack)
            codes.append(answer.return_code)
    assert codes == [0, 0, 0, mqtt.NOT_AUTHORIZED, 0]  # a known device id is always welcome back


# ---------------------------------------------------------- hostile input


async def test_a_lone_surrogate_gets_an_error_event_and_no_traceback(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await register(server, "alice")
    caplog.set_level(logging.INFO)
    payload = b'{"type":"send_message","client_msg_id":"\\udfff","to_user":"bob","content":"x"}'
    async with connect_device(server, "alice", "phone", alice) as phone:
        await phone.next("sync_response")
        for _ in range(200):
            await phone.publish(payload)
        errors = [await phone.next("error") for _ in range(200)]
    assert {(e["code"], e["ref"]) for e in errors} == {("invalid_command", None)}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if "surrogate" in r.getMessage()]) <= 1


async def test_connections_per_listener_are_capped(server: RunningServer) -> None:
    async with contextlib.AsyncExitStack() as stack:
        idle: list[RawClient] = [await stack.enter_async_context(raw_client(server.mqtt_port or 0)) for _ in range(20)]
        await asyncio.sleep(0.1)
        async with raw_client(server.mqtt_port or 0) as extra:
            started = time.monotonic()
            assert await extra.closed(timeout=2)
            assert time.monotonic() - started < 1  # refused at once, not at the CONNECT timeout
        assert len(idle) == 20
    token = await register(server, "alice")
    async with connect_device(server, "alice", "phone", token) as phone:  # room again
        await phone.next("sync_response")


async def test_an_http_long_poll_keeps_its_read_slot_only_while_reading(server: RunningServer) -> None:
    alice = await register(server, "alice")
    async with http_client(server, alice) as http:
        polls = []
        for _ in range(6):  # more waiting polls than limits.max_concurrent_reads_per_user (4)
            polls.append(asyncio.create_task(http.get("/v1/sync/long-poll", params={"timeout": 2})))
            await asyncio.sleep(0.1)
        assert (await http.get("/v1/sync")).status_code == 200  # waiting polls hold no read slot
        for response in await asyncio.gather(*polls):
            assert response.status_code == 200
