"""Limits, each with a clear refusal and nothing dropped silently, on a real server.

The server here runs with tight limits so that each one is reached in a few packets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess

import pytest
import websockets

from mqchat.api.errors import error_body
from mqchat.config import LimitsSettings, Settings
from mqchat.core.errors import InvalidCommand, RateLimited
from mqchat.core.protocol import decode_event, encode_event, error_event
from mqchat.runner import RunningServer
from tests.security.raw import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_VERSION,
    connect,
    encode_length,
    packet,
    publish,
    raw_client,
    subscribe,
)
from tests.support.accounts import http_client, register
from tests.support.devices import connect_device
from tests.support.services import service_missing

LIMITS = LimitsSettings(
    max_packet_bytes=4096,
    connect_timeout_seconds=1,
    send_rate_per_second=2,
    send_burst=3,
    max_connections_per_user=2,
    max_subscriptions_per_connection=3,
    http_max_body_bytes=2048,
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"limits": LIMITS})


def mqtt_port(server: RunningServer) -> int:
    assert server.mqtt_port is not None
    return server.mqtt_port


async def test_an_oversized_packet_closes_the_connection_before_its_body_is_read(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await register(server, "alice")
    caplog.set_level(logging.WARNING, "mqchat.broker.connection")
    async with raw_client(mqtt_port(server)) as raw:
        await raw.send(connect("alice:phone", "alice", alice))
        assert await raw.read_packet() == CONNACK_ACCEPTED
        # Announce 10 MB and send 10 bytes: the server must not wait for (or buffer) the rest.
        await raw.send(b"\x32" + encode_length(10_000_000) + b"\x00\x0achat/in/a")
        assert await raw.closed(timeout=3)
    assert "above the limit of 4096 (limits.max_packet_bytes)" in caplog.text and "alice:phone" in caplog.text
    async with raw_client(mqtt_port(server)) as raw:  # just over the limit, body and all
        await raw.send(connect("alice:phone", "alice", alice))
        assert await raw.read_packet() == CONNACK_ACCEPTED
        await raw.send(publish("chat/in/alice/phone", b"x" * 4096))
        assert await raw.closed(timeout=3)
    async with connect_device(server, "alice", "phone", alice) as phone:  # the user is not locked out
        await phone.next("sync_response")


async def test_sends_over_the_rate_are_refused_with_retry_after_and_their_ref(server: RunningServer) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    async with connect_device(server, "alice", "phone", alice) as phone:
        await phone.next("sync_response")
        for i in range(5):
            await phone.send("bob", f"m{i}", f"c{i}")
        answers = {}
        for _ in range(5):  # every send is answered: an ack or an error, never silence
            event = await phone.next()
            while event["type"] not in ("message_ack", "error"):
                event = await phone.next()
            answers[event.get("client_msg_id") or event["ref"]] = event
        assert sorted(answers) == [f"c{i}" for i in range(5)]
        refused = [e for e in answers.values() if e["type"] == "error"]
        assert len(refused) == 2 and all(e["code"] == "rate_limited" for e in refused)
        assert all(0 < e["retry_after"] <= 0.5 for e in refused)
        await asyncio.sleep(max(e["retry_after"] for e in refused))
        await phone.send("bob", "again", refused[0]["ref"])
        assert (await phone.next("message_ack"))["client_msg_id"] == refused[0]["ref"]
    async with http_client(server, alice) as http:
        statuses = []
        for i in range(4):
            response = await http.post(
                "/v1/messages", json={"client_msg_id": f"h{i}", "to_user": "bob", "content": "x"}
            )
            statuses.append(response.status_code)
        assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
        assert response.json()["error"]["code"] == "rate_limited" and response.json()["error"]["retry_after"] > 0
        assert response.headers["retry-after"] == "1"


async def test_connections_per_user_beyond_the_limit_are_refused(server: RunningServer) -> None:
    alice = await register(server, "alice")
    async with (
        connect_device(server, "alice", "one", alice),
        connect_device(server, "alice", "two", alice) as two,
        raw_client(mqtt_port(server)) as third,
    ):
        await third.send(connect("alice:three", "alice", alice))
        assert await third.read_packet() == b"\x20\x02\x00\x05"
        # The same device reconnecting takes over its own connection: not a new one.
        async with connect_device(server, "alice", "two", alice) as again:
            await again.next("sync_response")
        assert two.client is not None
    async with connect_device(server, "alice", "three", alice) as three:  # room again once they left
        await three.next("sync_response")


async def test_subscriptions_per_connection_beyond_the_limit_get_0x80(server: RunningServer) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    async with http_client(server, alice) as http:  # alice and bob become contacts
        await http.post("/v1/messages", json={"client_msg_id": "c", "to_user": "bob", "content": "hi"})
    async with raw_client(mqtt_port(server)) as raw:
        await raw.send(connect("alice:phone", "alice", alice))
        assert await raw.read_packet() == CONNACK_ACCEPTED
        granted = []
        topics = ["chat/user/alice", "chat/device/alice/phone", "chat/presence/alice", "chat/presence/bob"]
        for packet_id, topic in enumerate(topics, start=1):
            await raw.send(subscribe(topic, packet_id=packet_id))
            granted.append((await raw.next_of(0x90))[-1])
        assert granted == [1, 1, 1, 0x80]
        # Unsubscribing frees the slot: the refusal was the limit, not the ACL.
        await raw.send(packet(0xA2, b"\x00\x09" + b"\x00\x13chat/presence/alice"))
        await raw.next_of(0xB0)
        await raw.send(subscribe("chat/presence/bob", packet_id=10))
        assert (await raw.next_of(0x90))[-1] == 1


async def test_http_bodies_over_the_limit_get_413(server: RunningServer) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    big = {"client_msg_id": "big", "to_user": "bob", "content": "x" * 3000}
    async with http_client(server, alice) as http:
        response = await http.post("/v1/messages", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"

        async def chunks():  # no Content-Length: the limit holds on what actually arrives
            for _ in range(10):
                yield b"x" * 500

        chunked = await http.post("/v1/messages", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        small = await http.post("/v1/messages", json={**big, "content": "fits"})
        assert small.status_code == 200, small.text


@pytest.mark.parametrize(("name", "level"), [("MQTT", 5), ("MQIsdp", 3), ("MQTT", 3), ("MQTT", 6), ("XYZ", 4)], ids=str)
async def test_other_protocol_versions_get_connack_0x01_at_once(server: RunningServer, name: str, level: int) -> None:
    async with raw_client(mqtt_port(server)) as raw:
        await raw.send(connect("x:y", "x", "token", name=name, level=level))
        assert await raw.read_packet(timeout=2) == CONNACK_BAD_VERSION
        assert await raw.closed(timeout=2)


async def test_a_first_packet_that_is_not_connect_or_never_comes_is_closed(server: RunningServer) -> None:
    async with raw_client(mqtt_port(server)) as raw:
        await raw.send(publish("chat/in/a/b", b"{}"))
        assert await raw.closed(timeout=2)
    async with raw_client(mqtt_port(server)) as silent:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await silent.closed(timeout=5)
        assert loop.time() - started < 3  # limits.connect_timeout_seconds = 1


@pytest.mark.interop
@pytest.mark.parametrize(("version", "says"), [("mqttv5", "Unsupported Protocol Version"), ("mqttv31", "unacceptable")])
async def test_mosquitto_clients_of_other_versions_are_told_promptly(
    server: RunningServer, version: str, says: str
) -> None:
    if shutil.which("mosquitto_pub") is None:
        service_missing("mosquitto_pub is not installed (Debian package mosquitto-clients)")
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt_port(server)), "-V", version]
    command += ["-i", "alice:phone", "-u", "alice", "-P", "x", "-t", "chat/in/alice/phone", "-m", "{}"]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=10)
    assert done.returncode != 0 and says in done.stderr


def test_rate_limited_carries_retry_after_on_both_faces() -> None:
    limited = RateLimited("slow down", retry_after=0.0421, ref="c-1")
    assert limited.retry_after == 0.043 and limited.status == 429 and limited.code == "rate_limited"
    event = json.loads(encode_event(error_event(limited)))
    assert event == {
        "type": "error",
        "code": "rate_limited",
        "message": "slow down",
        "ref": "c-1",
        "retry_after": 0.043,
    }
    assert decode_event(encode_event(error_event(limited))) == error_event(limited)
    other = json.loads(encode_event(error_event(InvalidCommand("bad"))))
    assert other == {"type": "error", "code": "invalid_command", "message": "bad", "ref": None}  # unchanged
    assert error_body("rate_limited", "m", 1.5) == {
        "error": {"code": "rate_limited", "message": "m", "retry_after": 1.5}
    }


async def test_the_websocket_listener_has_the_same_guard(server: RunningServer) -> None:
    alice = await register(server, "alice")
    url = f"ws://127.0.0.1:{server.ws_port}/mqtt"
    async with websockets.connect(url, subprotocols=[websockets.Subprotocol("mqtt")]) as ws:
        await ws.send(connect("x:y", "x", "y", level=5))
        assert await asyncio.wait_for(ws.recv(), 3) == CONNACK_BAD_VERSION
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
    async with websockets.connect(url, subprotocols=[websockets.Subprotocol("mqtt")]) as ws:
        await ws.send(connect("alice:browser", "alice", alice))
        assert await asyncio.wait_for(ws.recv(), 3) == CONNACK_ACCEPTED
        await ws.send(publish("chat/in/alice/browser", b"x" * 5000))  # over max_packet_bytes
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 3)
