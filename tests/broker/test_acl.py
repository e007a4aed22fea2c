"""Authentication and the topic ACL, seen from real MQTT clients (protocol v1, "Connect" and "Topics").

CONNACK and SUBACK codes are read with paho-mqtt 2.x, which reports them precisely
(``tests.support.paho``). Publishing and payload checks use the aiomqtt devices of
``tests.support.devices``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import warnings
from collections.abc import Iterator
from typing import Any

import jwt
import paho.mqtt.client as mqtt

from mqchat.core.mqtt import Connect, Publish, Subscribe
from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register
from tests.support.devices import Device, connect_device
from tests.support.paho import EVENT_TIMEOUT, paho_device

# MQTT 3.1.1, section 3.2.2.3
ACCEPTED = 0
IDENTIFIER_REJECTED = 2
NOT_AUTHORIZED = 5
# MQTT 3.1.1, section 3.9.3
SUBACK_FAILURE = 0x80


async def connack_code(
    server: RunningServer, client_id: str, username: str | None, password: str | None, *, clean_session: bool = True
) -> int:
    async with paho_device(server, client_id, username, password, clean_session=clean_session) as device:
        code = await device.connect()
        if code != ACCEPTED:
            # A refused client must also be disconnected by the server.
            async with asyncio.timeout(EVENT_TIMEOUT):
                await device.closed.wait()
        return code


def craft_token(server: RunningServer, like: str, *, key: str | None = None, **changes: Any) -> str:
    """A token with the claims of the server-issued ``like``, changed, signed with the server's key or ``key``."""
    claims = jwt.decode(like, options={"verify_signature": False})
    claims.update(changes)
    secret = key if key is not None else server.services.settings.resolved_secret()
    return jwt.encode(claims, secret, algorithm="HS256")


async def sync_latest_seq(server: RunningServer, token: str) -> int:
    async with http_client(server, token) as http:
        response = await http.get("/v1/sync", params={"since_seq": 0})
        assert response.status_code == 200, response.text
        return int(response.json()["latest_seq"])


async def ready(*devices: Device) -> None:
    """Wait for each device's catch-up page: its subscriptions are in place."""
    for device in devices:
        page = await device.next("sync_response", EVENT_TIMEOUT)
        assert page["type"] == "sync_response"


async def settle(*devices: Device, new_messages: int = 0) -> None:
    """Receive (and so acknowledge) the stream events still on their way, so nothing is in flight at exit.

    Each device expects ``new_messages`` more ``new_message`` events and then nothing else.
    """
    for device in devices:
        for _ in range(new_messages):
            await device.next("new_message", EVENT_TIMEOUT)
        assert await device.drain(0.2) == []


# ------------------------------------------------------------------ CONNECT


async def test_connack_codes(server: RunningServer) -> None:
    alice = await register(server, "alice")
    bob = await register(server, "bob")
    now = int(time.time())
    fresh = craft_token(server, alice, iat=now - 10, exp=now + 600)
    expired = craft_token(server, alice, iat=now - 600, exp=now - 30)
    other_key = craft_token(server, alice, key="not-the-server-secret-0123456789abcdef")
    alg_none = jwt.encode(jwt.decode(alice, options={"verify_signature": False}), None, algorithm="none")
    wrong_audience = craft_token(server, alice, aud="someone-else")
    no_expiry = jwt.encode(
        {"sub": "alice", "aud": "mqchat"}, server.services.settings.resolved_secret(), algorithm="HS256"
    )
    short_lived = server.services.tokens.issue("alice", ttl_seconds=60)

    cases: dict[str, tuple[str, str | None, str | None]] = {
        # name: (client id, username, password)
        "valid token": ("alice:phone", "alice", alice),
        "crafted unexpired token (control)": ("alice:crafted", "alice", fresh),
        "issued with a short ttl": ("alice:short", "alice", short_lived),
        "garbage token": ("alice:phone", "alice", "not-a-token"),
        "expired token": ("alice:phone", "alice", expired),
        "token signed with another key": ("alice:phone", "alice", other_key),
        "alg none token": ("alice:phone", "alice", alg_none),
        "token for another audience": ("alice:phone", "alice", wrong_audience),
        "token without exp": ("alice:phone", "alice", no_expiry),
        "bob's token as alice": ("alice:phone", "alice", bob),
        "alice's token, client id of bob": ("bob:laptop", "alice", alice),
        "alice's token, username and client id of bob": ("bob:laptop", "bob", alice),
        "username is not the client id's user": ("alice:phone", "bob", alice),
        "username differs in case": ("alice:phone", "Alice", alice),
        "username without password": ("alice:phone", "alice", None),
        "empty password": ("alice:phone", "alice", ""),
        "no username, no password": ("alice:phone", None, None),
        "client id without colon": ("alicephone", "alice", alice),
        "client id with '/'": ("alice:ph/one", "alice", alice),
        "client id with '+'": ("alice:ph+one", "alice", alice),
        "client id with '#'": ("alice:ph#one", "alice", alice),
        "user part with '/'": ("al/ice:phone", "al/ice", alice),
        "empty device id": ("alice:", "alice", alice),
        "empty user id": (":phone", "alice", alice),
        "two colons": ("alice:phone:2", "alice", alice),
        "device id of 65 chars": ("alice:" + "d" * 65, "alice", alice),
        "malformed id and a bad token": ("alice/phone", "alice", "not-a-token"),
    }
    expected = {
        "valid token": ACCEPTED,
        "crafted unexpired token (control)": ACCEPTED,
        "issued with a short ttl": ACCEPTED,
        "garbage token": NOT_AUTHORIZED,
        "expired token": NOT_AUTHORIZED,
        "token signed with another key": NOT_AUTHORIZED,
        "alg none token": NOT_AUTHORIZED,
        "token for another audience": NOT_AUTHORIZED,
        "token without exp": NOT_AUTHORIZED,
        "bob's token as alice": NOT_AUTHORIZED,
        "alice's token, client id of bob": NOT_AUTHORIZED,
        "alice's token, username and client id of bob": NOT_AUTHORIZED,
        "username is not the client id's user": NOT_AUTHORIZED,
        "username differs in case": NOT_AUTHORIZED,
        "username without password": NOT_AUTHORIZED,
        "empty password": NOT_AUTHORIZED,
        "no username, no password": NOT_AUTHORIZED,
        "client id without colon": IDENTIFIER_REJECTED,
        "client id with '/'": IDENTIFIER_REJECTED,
        "client id with '+'": IDENTIFIER_REJECTED,
        "client id with '#'": IDENTIFIER_REJECTED,
        "user part with '/'": IDENTIFIER_REJECTED,
        "empty device id": IDENTIFIER_REJECTED,
        "empty user id": IDENTIFIER_REJECTED,
        "two colons": IDENTIFIER_REJECTED,
        "device id of 65 chars": IDENTIFIER_REJECTED,
        "malformed id and a bad token": IDENTIFIER_REJECTED,
    }
    results = {}
    for name, (client_id, username, password) in cases.items():
        results[name] = await connack_code(server, client_id, username, password)
    assert results == expected


def raw_connect(client_id: str, username: str, password: str) -> bytes:
    return Connect(client_id, True, 30, username, password.encode()).encode()


def raw_publish_qos1(topic: str, payload: bytes, packet_id: int) -> bytes:
    return Publish(topic, payload, 1, packet_id=packet_id).encode()


def raw_subscribe(topic_filter: str, packet_id: int) -> bytes:
    return Subscribe(packet_id, ((topic_filter, 1),)).encode()


async def raw_session(server: RunningServer, data: bytes) -> bytes:
    """Write ``data`` at once and return everything the server sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(EVENT_TIMEOUT):
            return await reader.read()  # to EOF
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_commands_pipelined_after_a_refused_connect_are_ignored(server: RunningServer) -> None:
    """A client may write PUBLISH and SUBSCRIBE right behind CONNECT; when CONNECT is refused they
    must do nothing: the only reply is the refusing CONNACK, then the server closes the connection."""
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with connect_device(server, "bob", "laptop", bob_token) as bob:
        await ready(bob)
        command = json.dumps({"type": "send_message", "client_msg_id": "p-1", "to_user": "bob", "content": "hi"})
        for client_id, username, password, code in [
            ("alice:phone", "alice", "not-a-token", NOT_AUTHORIZED),
            ("alice:phone", "alice", bob_token, NOT_AUTHORIZED),
            ("alice/phone", "alice", alice_token, IDENTIFIER_REJECTED),
        ]:
            pipelined = (
                raw_connect(client_id, username, password)
                + raw_subscribe("chat/device/alice/phone", 1)
                + raw_publish_qos1("chat/in/alice/phone", command.encode(), 2)
            )
            assert await raw_session(server, pipelined) == bytes([0x20, 0x02, 0x00, code]), client_id
        assert await bob.drain(0.3) == []
    assert await sync_latest_seq(server, bob_token) == 0
    assert await sync_latest_seq(server, alice_token) == 0


async def test_refused_connect_with_a_live_client_id_leaves_that_device_alone(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice_token) as alice,
        connect_device(server, "bob", "laptop", bob_token) as bob,
    ):
        await ready(alice, bob)
        # Someone who knows bob's client id, without bob's token.
        assert await connack_code(server, "bob:laptop", "bob", "not-a-token") == NOT_AUTHORIZED
        assert await connack_code(server, "bob:laptop", "alice", alice_token) == NOT_AUTHORIZED

        await alice.send("bob", "still there?", "m-1")
        ack = await alice.next("message_ack", EVENT_TIMEOUT)
        incoming = await bob.next("new_message", 3)
        assert incoming["server_msg_id"] == ack["server_msg_id"]
        await bob.send("alice", "yes", "r-1")
        reply_ack = await bob.next("message_ack", 3)
        assert reply_ack["client_msg_id"] == "r-1"
        await settle(alice, new_messages=2)  # the echo of m-1, then r-1
        await settle(bob, new_messages=1)  # the echo of r-1


async def test_refused_takeover_does_not_disconnect_the_live_device(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice_token) as alice,
        connect_device(server, "bob", "laptop", bob_token) as bob,
    ):
        await ready(alice, bob)
        assert await connack_code(server, "bob:laptop", "bob", "not-a-token", clean_session=False) == NOT_AUTHORIZED

        await alice.send("bob", "still there?", "m-1")
        ack = await alice.next("message_ack", EVENT_TIMEOUT)
        incoming = await bob.next("new_message", 3)
        assert incoming["server_msg_id"] == ack["server_msg_id"]
        await settle(alice, new_messages=1)


# ------------------------------------------------------------------ SUBSCRIBE

REFUSED_FILTERS = [
    "chat/user/bob",
    "chat/device/bob/laptop",
    "chat/device/alice/tablet",  # another device of the same user
    "chat/in/alice/phone",  # one's own inbox is publish-only
    "chat/in/bob/laptop",
    "#",
    "chat/#",
    "chat/user/+",
    "chat/+/bob",
    "chat/user/#",
    "chat/device/alice/+",
    "chat/device/+/+",
    "chat/in/+/+",
    "+/user/bob",
    "+/+/+",
    "$SYS/#",
    "$SYS/broker/clients/connected",
    "chat/user/alice/#",
    "chat/user/Alice",
    "chat/user/alice2",
    "chat/device/alice",
]


async def test_subscribe_acl(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    carol_token = await register(server, "carol")
    async with (
        paho_device(server, "alice:phone", "alice", alice_token) as alice,
        connect_device(server, "bob", "laptop", bob_token) as bob,
        connect_device(server, "carol", "pad", carol_token) as carol,
    ):
        await ready(bob, carol)
        assert await alice.connect() == ACCEPTED

        # Each refused filter on its own SUBSCRIBE ...
        refused = {topic: await alice.subscribe([topic]) for topic in REFUSED_FILTERS}
        assert refused == {topic: [SUBACK_FAILURE] for topic in REFUSED_FILTERS}
        # ... and mixed with the two allowed ones in one SUBSCRIBE: codes follow the filters' order.
        mixed = ["#", "chat/user/alice", "chat/user/+", "chat/device/alice/phone", "chat/device/bob/laptop"]
        assert await alice.subscribe(mixed) == [SUBACK_FAILURE, 1, SUBACK_FAILURE, 1, SUBACK_FAILURE]
        assert await alice.subscribe(["chat/user/alice"], qos=0) == [0]
        assert await alice.subscribe(["chat/user/alice"], qos=1) == [1]

        topic, page = await alice.next("sync_response")
        assert (topic, page) == (
            "chat/device/alice/phone",
            {"type": "sync_response", "events": [], "latest_seq": 0, "has_more": False},
        )

        # Traffic between bob and carol never reaches alice, whatever she tried to subscribe to.
        await carol.send("bob", "private", "c-1")
        carol_ack = await carol.next("message_ack")
        bob_sees = await bob.next("new_message")
        assert bob_sees["server_msg_id"] == carol_ack["server_msg_id"]
        assert (await carol.next("new_message"))["server_msg_id"] == carol_ack["server_msg_id"]  # carol's own echo
        await bob.send("carol", "private too", "b-1")
        bob_ack = await bob.next("message_ack")
        assert (await bob.next("new_message"))["server_msg_id"] == bob_ack["server_msg_id"]  # bob's own echo
        assert (await carol.next("new_message"))["server_msg_id"] == bob_ack["server_msg_id"]

        # The connection is still up and alice's own topics still work.
        assert alice.client.is_connected()
        await alice.publish(
            "chat/in/alice/phone", {"type": "send_message", "client_msg_id": "a-1", "to_user": "bob", "content": "hi"}
        )
        topic, ack = await alice.next("message_ack")
        assert topic == "chat/device/alice/phone" and ack["client_msg_id"] == "a-1" and ack["seq"] == 1
        topic, echo = await alice.next("new_message")
        assert topic == "chat/user/alice" and echo["server_msg_id"] == ack["server_msg_id"]
        assert (await bob.next("new_message"))["server_msg_id"] == ack["server_msg_id"]
        assert await alice.drain() == []
        # Everything alice ever received was on her own two topics, and none of it was bob's or carol's.
        own = {"chat/user/alice", "chat/device/alice/phone"}
        foreign = [
            (topic, event)
            for topic, event in alice.seen
            if topic not in own or event.get("client_msg_id") in {"c-1", "b-1"}
        ]
        assert foreign == []
        assert [event["type"] for _, event in alice.seen if event["type"] != "sync_response"] == [
            "message_ack",
            "new_message",
        ]


# ------------------------------------------------------------------ PUBLISH

FORBIDDEN_PUBLISH_TOPICS = [
    "chat/in/bob/laptop",  # another user's inbox, speaking as bob
    "chat/in/alice/tablet",  # another device of the same user
    "chat/in/alice",
    "chat/in/alice/phone/extra",
    "chat/user/bob",  # forging events onto a stream
    "chat/user/alice",
    "chat/device/bob/laptop",
    "chat/device/alice/phone",
    "chat/in/Alice/phone",
    "random/topic",
    "chat",
]


async def test_refused_publish_gets_not_allowed_and_delivers_nothing(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice_token) as alice,
        connect_device(server, "bob", "laptop", bob_token) as bob,
    ):
        await ready(alice, bob)
        codes = {}
        for index, topic in enumerate(FORBIDDEN_PUBLISH_TOPICS):
            # A payload that would be a valid command, and that looks like an event if delivered.
            forged = {
                "type": "send_message",
                "client_msg_id": f"forged-{index}",
                "to_user": "alice",
                "content": "I am bob",
                "from_user": "bob",
                "seq": 1,
                "server_msg_id": 1,
            }
            await alice.client.publish(topic, json.dumps(forged), qos=1)
            reply = await alice.next(timeout=EVENT_TIMEOUT)  # the very next thing alice receives
            codes[topic] = (reply["type"], reply.get("code"))
        assert codes == dict.fromkeys(FORBIDDEN_PUBLISH_TOPICS, ("error", "not_allowed"))
        assert await alice.drain(0.3) == []
        assert bob.received.empty()
        assert await sync_latest_seq(server, bob_token) == 0
        assert await sync_latest_seq(server, alice_token) == 0

        # The same connection then sends normally; nothing was stored before (seq 1 on both sides).
        await alice.send("bob", "for real", "m-1")
        ack = await alice.next("message_ack")
        assert (ack["client_msg_id"], ack["seq"], ack["duplicate"]) == ("m-1", 1, False)
        incoming = await bob.next("new_message")
        assert (incoming["seq"], incoming["server_msg_id"], incoming["from_user"], incoming["content"]) == (
            1,
            ack["server_msg_id"],
            "alice",
            "for real",
        )
        await settle(alice, new_messages=1)
        await settle(bob)


async def test_publish_on_a_dollar_topic_is_refused_or_disconnected_never_ignored(server: RunningServer) -> None:
    """Either outcome is fine: an ``error`` (protocol v1: a refused publish gets one, the connection
    stays up) or a closed connection (docs/protocol.md: a ``$`` topic is a protocol violation and
    the broker closes the connection). A connection that stays open but ignores commands is not."""
    alice_token = await register(server, "alice")
    await register(server, "bob")
    async with paho_device(server, "alice:phone", "alice", alice_token) as alice:
        assert await alice.connect() == ACCEPTED
        assert await alice.subscribe(["chat/user/alice", "chat/device/alice/phone"]) == [1, 1]
        await alice.next("sync_response")
        assert alice.client.publish("$SYS/broker/uptime", b"{}", qos=1).rc == mqtt.MQTT_ERR_SUCCESS
        closed = asyncio.ensure_future(alice.closed.wait())
        reply = asyncio.ensure_future(alice.next(timeout=3))
        await asyncio.wait([closed, reply], return_when=asyncio.FIRST_COMPLETED)
        if closed.done():  # disconnected, as docs/protocol.md says
            reply.cancel()
            return
        closed.cancel()
        with contextlib.suppress(TimeoutError):
            topic, event = await reply
            assert (topic, event["type"], event["code"]) == ("chat/device/alice/phone", "error", "not_allowed")
        # Refused with an error, or (today) nothing at all: the connection must still take commands.
        await alice.publish("chat/in/alice/phone", send("m-1", content="after $SYS"))  # PUBACKed today...
        _, ack = await alice.next("message_ack", 3)  # ... but never answered
        assert (ack["client_msg_id"], ack["seq"]) == ("m-1", 1)
        await alice.next("new_message")


# ------------------------------------------------------------------ payloads

# A payload over 64 KiB exceeds limits.max_packet_bytes: the packet guard closes the
# connection before the body is read (tests/security/test_limits.py), so it is not here.


def send(client_msg_id: str, **changes: Any) -> dict[str, Any]:
    command = {"type": "send_message", "client_msg_id": client_msg_id, "to_user": "bob", "content": "hello"}
    command.update(changes)
    return {key: value for key, value in command.items() if value is not None}


MALFORMED: dict[str, tuple[bytes | dict[str, Any], tuple[str, str | None]]] = {
    # name: (payload, (code, ref))
    "not JSON": (b"hello bob", ("invalid_json", None)),
    "empty payload": (b"", ("invalid_json", None)),
    "invalid UTF-8": (b'{"type": "send_message", "content": "\xff\xfe"}', ("invalid_json", None)),
    "truncated JSON": (b'{"type": "send_message", "client_msg_id": "m-0"', ("invalid_json", None)),
    "JSON array": (b'[{"type": "send_message"}]', ("invalid_command", None)),
    "JSON string": (b'"send_message"', ("invalid_command", None)),
    "JSON null": (b"null", ("invalid_command", None)),
    "unknown type": ({"type": "fly_away", "client_msg_id": "m-1"}, ("unknown_type", "m-1")),
    "type is not a string": ({"type": 5, "client_msg_id": "m-2"}, ("unknown_type", "m-2")),
    "no type": (send("m-3", type=None), ("unknown_type", "m-3")),
    "no content": (send("m-4", content=None), ("invalid_command", "m-4")),
    "no to_user": (send("m-5", to_user=None), ("invalid_command", "m-5")),
    "no client_msg_id": ({"type": "send_message", "to_user": "bob", "content": "x"}, ("invalid_command", None)),
    "empty content": (send("m-6", content=""), ("invalid_command", "m-6")),
    "content of 16001 chars": (send("m-7", content="x" * 16_001), ("invalid_command", "m-7")),
    # An over-long client_msg_id is not echoed back: ref is limited to valid lengths.
    "client_msg_id of 65 chars": (send("c" * 65), ("invalid_command", None)),
    "to_user with '/'": (send("m-8", to_user="bob/laptop"), ("invalid_command", "m-8")),
    "to_user with '+'": (send("m-9", to_user="+"), ("invalid_command", "m-9")),
    "NUL in content": (send("m-10", content="a\x00b"), ("invalid_command", "m-10")),
    "NUL in client_msg_id": (send("m-11\x00"), ("invalid_command", "m-11\x00")),
    "lone surrogate in content": (
        b'{"type": "send_message", "client_msg_id": "m-12", "to_user": "bob", "content": "\\ud800"}',
        ("invalid_command", "m-12"),
    ),
    "unknown msg_type": (send("m-13", msg_type="audio"), ("invalid_command", "m-13")),
    "content is a number": (send("m-14", content=42), ("invalid_command", "m-14")),
    "unknown recipient": (send("m-15", to_user="nobody"), ("unknown_recipient", "m-15")),
    "sync limit over 500": ({"type": "sync_messages", "since_seq": 0, "limit": 501}, ("invalid_command", None)),
    "negative ack": ({"type": "ack", "seq": -1}, ("invalid_command", None)),
}


async def test_malformed_payloads_get_stable_error_codes(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice_token) as alice,
        connect_device(server, "bob", "laptop", bob_token) as bob,
    ):
        await ready(alice, bob)
        results: dict[str, tuple[str, str | None] | str] = {}
        for name, (payload, _) in MALFORMED.items():
            await alice.publish(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
            try:
                event = await alice.next(timeout=EVENT_TIMEOUT)
            except TimeoutError:
                results[name] = "no reply"
                continue
            assert set(event) == {"type", "code", "message", "ref"}, event
            results[name] = (event["code"], event["ref"]) if event["type"] == "error" else event["type"]
            assert isinstance(event["message"], str) and event["message"]
        assert results == {name: outcome for name, (_, outcome) in MALFORMED.items()}

        # Nothing was stored, and the same connection still works; limits are inclusive.
        assert await alice.drain(0.3) == []
        assert bob.received.empty()
        longest_id = "c" * 64
        await alice.publish(send(longest_id, content="y" * 16_000))
        ack = await alice.next("message_ack")
        assert (ack["client_msg_id"], ack["seq"], ack["duplicate"], ack["status"]) == (longest_id, 1, False, "sent")
        incoming = await bob.next("new_message")
        assert (incoming["seq"], incoming["server_msg_id"], incoming["content"]) == (
            1,
            ack["server_msg_id"],
            "y" * 16_000,
        )
        await alice.send("bob", "and a short one", "m-ok")
        ack2 = await alice.next("message_ack")
        assert (ack2["client_msg_id"], ack2["seq"]) == ("m-ok", 2)
        assert (await bob.next("new_message"))["server_msg_id"] == ack2["server_msg_id"]
        await settle(alice, new_messages=1)  # the echo of m-ok (waiting for ack2 skipped the first echo)
        await settle(bob)


# ------------------------------------------------------------------ sockets of refused and departed clients


def open_server_transports(port: int) -> list[asyncio.Transport]:
    """Server-side connections on ``port`` (the broker runs in this process) whose socket is still open."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Transport):
            sockname = obj.get_extra_info("sockname")
            sock = obj.get_extra_info("socket")
            if isinstance(sockname, tuple) and sockname[1] == port and sock is not None and sock.fileno() != -1:
                found.append(obj)
    return found


def open_server_sockets(port: int) -> int:
    return len(open_server_transports(port))


async def wait_for_no_open_server_socket(port: int, within: float = 2.0) -> int:
    """How many server-side sockets are still open once they have had ``within`` seconds to close."""
    for _ in range(int(within / 0.1)):
        if not open_server_sockets(port):
            return 0
        await asyncio.sleep(0.1)
    return open_server_sockets(port)


@contextlib.contextmanager
def leak_watch(port: int) -> Iterator[None]:
    """Pause the garbage collector, which would close leaked sockets behind the test's back and hide
    a leak; on the way out, close what leaked (the test has reported it) so later tests stay clean."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        for transport in open_server_transports(port):
            transport.abort()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        if enabled:
            gc.enable()


async def test_refused_and_departed_clients_leave_no_open_server_socket(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    with leak_watch(server.mqtt_port):
        for _ in range(3):
            assert await connack_code(server, "alice:phone", "alice", "not-a-token") == NOT_AUTHORIZED
            assert await connack_code(server, "alice/phone", "alice", alice_token) == IDENTIFIER_REJECTED
        assert await wait_for_no_open_server_socket(server.mqtt_port) == 0
        async with (
            connect_device(server, "alice", "phone", alice_token) as alice,
            connect_device(server, "bob", "laptop", bob_token) as bob,
        ):
            await ready(alice, bob)
            assert open_server_sockets(server.mqtt_port) == 2  # the probe sees live connections
            await alice.send("bob", "hi", "m-1")
            await alice.next("message_ack")
            await settle(alice, bob, new_messages=1)
        assert await wait_for_no_open_server_socket(server.mqtt_port) == 0


async def test_devices_leaving_during_a_delivery_have_their_server_socket_closed(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    with leak_watch(server.mqtt_port):
        for attempt in range(3):
            async with (
                connect_device(server, "alice", "phone", alice_token) as alice,
                connect_device(server, "bob", "laptop", bob_token) as bob,
            ):
                await ready(alice, bob)
                await alice.send("bob", "hi", f"m-{attempt}")
                await alice.next("message_ack")
                # Both leave now, while the new_message is on its way to each of them: a common
                # case (an app closed right after sending), and a race every attempt nearly always hits.
        assert await wait_for_no_open_server_socket(server.mqtt_port) == 0
