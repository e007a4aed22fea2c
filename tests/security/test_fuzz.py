"""Hostile input on loopback against a live server; afterwards it must still chat, its
memory must have stayed bounded, and no acknowledged message may be missing.

For about ``FUZZ_SECONDS`` many connections at once send random bytes, malformed MQTT
(bad remaining lengths, truncated frames, fields running past their packet, reserved and
server-only packet types, wrong protocol levels and names, huge topics, invalid UTF-8)
and random JSON commands, while HTTP clients post random JSON to the API and a real
device keeps chatting. The random generator is seeded: a failure names its seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import string
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from mqchat.config import Settings
from mqchat.runner import RunningServer
from tests.security.raw import connect, encode_length, field, packet, publish, subscribe
from tests.support.accounts import http_client, register
from tests.support.devices import connect_device

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FUZZ_SECONDS = 12
CONCURRENCY = 12
RSS_GROWTH_LIMIT_MB = 96
SEED = int(os.environ.get("MQCHAT_FUZZ_SEED", "20261127"))
FIELDS = ["type", "client_msg_id", "to_user", "group_id", "content", "seq", "message_id", "since_seq", "limit", "state"]
TYPES = ["send_message", "send_group_message", "sync_messages", "ack", "mark_as_read", "recall_message", "typing"]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Every fuzzing connection uses a device id of its own: the device-id budget is not under test."""
    limits = settings.limits.model_copy(update={"max_new_devices_per_hour": 100_000})
    return settings.model_copy(update={"limits": limits})


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------ generators


def random_text(rng: random.Random, size: int = 12) -> str:
    alphabet = string.printable + "äß€😀\u202e\ufeff" + "".join(chr(rng.randrange(0xD800, 0xE000)) for _ in range(2))
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(size)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    return [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice([0, -1, 1, 2**62, 2**63, 10**30, -(10**30), rng.randrange(-1000, 1000)]),
        lambda: rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf")]),
        lambda: random_text(rng),
        lambda: rng.choice(["alice", "bob", "a/b", "+", "#", "", "x" * 70, "chat/user/bob"]),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: random_command(rng, depth + 1),
        lambda: {random_text(rng, 6): random_value(rng, depth + 1) for _ in range(rng.randrange(3))},
    ][kind]()


def random_command(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    command = {name: random_value(rng, depth + 1) for name in rng.sample(FIELDS, rng.randrange(len(FIELDS)))}
    if rng.random() < 0.8:
        command["type"] = rng.choice(TYPES)
    return command


def random_json_bytes(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return b"[" * 100_000 + b"]" * 100_000  # nesting deeper than the parser's recursion limit
    if roll < 0.1:
        return json.dumps(random_text(rng, 40)).encode() + b"\xff\xfe"  # invalid UTF-8
    return json.dumps(random_command(rng), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def hostile_packets(rng: random.Random, inbox: str) -> list[bytes]:
    """After a valid CONNECT: a mix of good, bad and broken packets."""
    makers: list[Callable[[], bytes]] = [
        lambda: publish(inbox, random_json_bytes(rng), qos=rng.choice([0, 1]), packet_id=rng.randrange(1, 65535)),
        lambda: publish(inbox, rng.randbytes(rng.randrange(200))),
        lambda: publish(rng.choice(["chat/user/bob", "chat/in/bob/x", "$SYS/x", "a/+/b", "#"]), b"{}"),
        lambda: publish(b"chat/in/\xff\xfe\xfd", b"{}"),  # invalid UTF-8 topic
        lambda: publish("chat/in/" + "x" * rng.randrange(1000, 60_000), b"{}"),  # huge topic, under the limit
        lambda: packet(0x32, b"\xff\xff" + b"abc"),  # topic length runs past the packet
        lambda: b"\x30\xff\xff\xff\xff\x7f",  # remaining length of 5 bytes
        lambda: b"\x32" + encode_length(rng.randrange(70_000, 300_000_000)) + b"\x00",  # over the size limit
        lambda: rng.choice([b"\x00\x00", b"\xf0\x00", b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x00"]),  # bad types
        lambda: subscribe(rng.choice(["#", "chat/+/bob", "$SYS/#", "a/#/b", "x+", random_text(rng)])),
        lambda: packet(0x80, struct.pack("!H", 1) + field("chat/user/x") + b"\x01"),  # SUBSCRIBE, wrong flags
        lambda: packet(0xA2, struct.pack("!H", 2) + field(random_text(rng).encode("utf-8", "surrogatepass"))),
        lambda: rng.choice([b"\x40\x02\x12\x34", b"\x60\x02\x00\x01", b"\xc0\x01\x00", b"\xc0\x00", b"\xe0\x00"]),
        lambda: connect("mallory:again", "mallory", "x"),  # a second CONNECT
        lambda: rng.randbytes(rng.randrange(1, 300)),
        lambda: publish(inbox, random_json_bytes(rng))[: rng.randrange(1, 12)],  # truncated
    ]
    return [rng.choice(makers)() for _ in range(rng.randrange(1, 8))]


def hostile_connect(rng: random.Random) -> bytes:
    body = field(rng.choice(["MQTT", "MQIsdp", "MQTT5", "", "\u00ff"])) + bytes(
        [rng.randrange(256), rng.randrange(256)]
    )
    choices: list[Callable[[], bytes]] = [
        lambda: connect("x:y", "x", "y", level=rng.choice([0, 3, 5, 6, 255])),
        lambda: connect("x:y", "x", "y", name="MQIsdp", level=3),
        lambda: packet(0x10, body + rng.randbytes(rng.randrange(30))),
        lambda: packet(0x10, field("MQTT") + bytes([4, 0x04]) + b"\x00\x1e" + field("x:y")),  # will flag, no will
        lambda: packet(0x10, field("MQTT") + bytes([4, 0x03]) + b"\x00\x1e" + field("x:y")),  # reserved flag
        lambda: packet(0x10, field("MQTT") + bytes([4, 0xC2]) + b"\x00\x1e" + field(b"\xff\xfe:y")),  # bad UTF-8
        lambda: packet(0x10, field("MQTT") + bytes([4, 0xC2]) + b"\x00\x1e" + field("x" * 60_000)),
        lambda: packet(0x10, field("MQTT") + bytes([4, 0x82]) + b"\x00\x1e" + field("x:y")),  # user flag, no user
        lambda: connect("x:y", "x", "y")[: rng.randrange(1, 20)],  # truncated
        lambda: b"\x10\xff\xff\xff\xff\xff",
        lambda: rng.randbytes(rng.randrange(1, 500)),
    ]
    return rng.choice(choices)()


# ------------------------------------------------------------------ attackers


async def _read_until_closed(reader: asyncio.StreamReader, seconds: float) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass


async def attack_once(port: int, rng: random.Random, token: str, number: int) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        if rng.random() < 0.35:
            writer.write(hostile_connect(rng))
        else:
            device = f"fuzz{number}"
            writer.write(connect(f"mallory:{device}", "mallory", token))
            for chunk in hostile_packets(rng, f"chat/in/mallory/{device}"):
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()
        await _read_until_closed(reader, 0.5)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def attacker(port: int, seed: int, token: str, stop: asyncio.Event) -> int:
    rng = random.Random(seed)
    sessions = 0
    while not stop.is_set():
        await attack_once(port, rng, token, seed * 100_000 + sessions)
        sessions += 1
    return sessions


async def http_attacker(server: RunningServer, seed: int, token: str, stop: asyncio.Event) -> list[str]:
    rng = random.Random(seed)
    paths = ["/v1/messages", "/v1/groups", "/v1/token", "/v1/users", "/v1/conversations/user:bob/read"]
    fives = []
    async with http_client(server, token) as http:
        while not stop.is_set():
            path = rng.choice(paths)
            body = random_json_bytes(rng)
            try:
                response = await http.post(path, content=body, headers={"content-type": "application/json"})
            except httpx.TransportError:
                continue
            if response.status_code >= 500:
                fives.append(f"POST {path} {body[:80]!r} -> {response.status_code}")
    return fives


# ------------------------------------------------------------------ the test


async def test_hostile_input_leaves_a_working_server(server: RunningServer) -> None:
    assert server.mqtt_port is not None
    alice, bob, mallory = [await register(server, user) for user in ("alice", "bob", "mallory")]
    gc.collect()
    rss_before = rss_mb()
    stop = asyncio.Event()
    acked: list[int] = []
    async with connect_device(server, "alice", "phone", alice) as phone:
        await phone.next("sync_response")
        attackers = [
            asyncio.create_task(attacker(server.mqtt_port, SEED + i, mallory, stop)) for i in range(CONCURRENCY)
        ]
        http_attackers = [asyncio.create_task(http_attacker(server, SEED + 1000 + i, mallory, stop)) for i in range(2)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FUZZ_SECONDS
        while loop.time() < deadline:  # a real user keeps chatting through the storm
            await phone.send("bob", f"during {len(acked)}", f"live-{len(acked)}")
            acked.append((await phone.next("message_ack", timeout=20))["server_msg_id"])
            await asyncio.sleep(0.1)
        stop.set()
        sessions = sum(await asyncio.gather(*attackers))
        fives = [line for lines in await asyncio.gather(*http_attackers) for line in lines]
    assert sessions > 100, f"only {sessions} hostile sessions ran (seed {SEED})"
    assert not fives, f"seed {SEED}: " + "\n".join(fives[:10])

    # A normal chat still works, and every acknowledged message is there.
    async with (
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "bob", "laptop", bob) as laptop,
    ):
        await phone.next("sync_response")
        await laptop.send("alice", "after the storm", "after-1")
        assert (await phone.next("new_message"))["content"] == "after the storm"
    async with http_client(server, bob) as http:
        stored, since = set(), 0
        while True:
            page = (await http.get("/v1/sync", params={"since_seq": since, "limit": 500})).json()
            stored |= {e["server_msg_id"] for e in page["events"] if e["type"] == "new_message"}
            if not page["has_more"]:
                break
            since = page["events"][-1]["seq"]
    assert len(acked) > 20 and set(acked) <= stored, f"seed {SEED}: acked but missing {set(acked) - stored}"
    gc.collect()
    growth = rss_mb() - rss_before
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew by {growth:.0f} MB during the fuzz run (seed {SEED})"
