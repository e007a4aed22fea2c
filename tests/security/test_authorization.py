"""Who may read and write what: user A (alice) against user B (bob), exhaustively.

The tables below are the contract; docs/security.md repeats them. The world:

- bob and carol chat 1:1 (bob's message holds ``SECRET``), and bob owns group ``private``
  with carol; alice is in neither. dave shares nothing with alice (a stranger).
- bob also owns group ``shared`` with alice and carol: alice may read it, not manage it.
- alice owns group ``mine`` with bob, where bob has posted (alice may not recall his post).

Every case runs against a real server over SQLite and PostgreSQL, and each table is one
test that reports every failing row at once.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import jwt
import pytest

from mqchat.runner import RunningServer
from tests.security.raw import CONNACK_ACCEPTED, connect, raw_client, subscribe
from tests.support.accounts import http_client, register
from tests.support.devices import connect_device

SECRET = "SECRET-bob-to-carol"
SUBACK_FAILURE = 0x80
WRONG_KEY = "a-key-that-is-long-enough-but-not-the-servers-own"


@dataclass
class World:
    alice: str
    bob: str
    carol: str
    private: str  # bob's group with carol
    shared: str  # bob's group with alice and carol
    mine: str  # alice's group with bob
    secret_id: int  # bob -> carol
    bobs_post_in_mine: int


async def _group(server: RunningServer, token: str, name: str, members: list[str]) -> str:
    async with http_client(server, token) as http:
        response = await http.post("/v1/groups", json={"name": name, "members": members})
        assert response.status_code == 201, response.text
        return str(response.json()["group_id"])


async def _send(server: RunningServer, token: str, body: dict[str, Any]) -> int:
    async with http_client(server, token) as http:
        response = await http.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        return int(response.json()["server_msg_id"])


@pytest.fixture
async def world(server: RunningServer) -> World:
    alice, bob, carol = [await register(server, user) for user in ("alice", "bob", "carol")]
    await register(server, "dave")
    private = await _group(server, bob, "private", ["carol"])
    shared = await _group(server, bob, "shared", ["alice", "carol"])
    mine = await _group(server, alice, "mine", ["bob"])
    secret_id = await _send(server, bob, {"client_msg_id": "s1", "to_user": "carol", "content": SECRET})
    await _send(server, bob, {"client_msg_id": "s2", "group_id": private, "content": SECRET})
    post = await _send(server, bob, {"client_msg_id": "s3", "group_id": mine, "content": "bob in mine"})
    return World(alice, bob, carol, private, shared, mine, secret_id, post)


# --------------------------------------------------------------------------- MQTT

# (topic filter alice:phone asks for, why it must be refused)
SUBSCRIBE_REFUSED = [
    ("chat/user/bob", "B's stream"),
    ("chat/device/bob/laptop", "B's device topic"),
    ("chat/in/bob/laptop", "B's inbox (his commands)"),
    ("chat/in/alice/phone", "even A's own inbox: commands are not echoed"),
    ("chat/presence/dave", "presence of a stranger (no shared conversation or group)"),
    ("chat/group/{private}", "topic of a group A is not in"),
    ("chat/group/nosuchgroup", "topic of a group that does not exist"),
    ("#", "everything"),
    ("chat/#", "every chat topic"),
    ("chat/user/+", "every stream"),
    ("chat/+/bob", "every topic ending in bob"),
    ("chat/user/#", "every stream, multi-level"),
    ("chat/device/bob/+", "every device of B"),
    ("chat/device/+/+", "every device"),
    ("chat/presence/+", "everyone's presence"),
    ("chat/group/+", "every group"),
    ("chat/in/#", "every inbox"),
    ("+/user/bob", "B's stream via a first-level wildcard"),
    ("+/+/+", "any three-level topic"),
    ("$SYS/#", "broker internals"),
    ("$SYS/broker/clients/connected", "a broker internal"),
]
SUBSCRIBE_ALLOWED = [
    ("chat/user/alice", "A's own stream"),
    ("chat/device/alice/phone", "A's own device topic"),
    ("chat/group/{shared}", "a group A is in"),
    ("chat/presence/carol", "presence of someone A shares a group with"),
    ("chat/presence/bob", "presence of B, with whom A shares a group"),
]

# (topic alice:phone publishes on, what it would forge); each must reach nobody.
PUBLISH_REFUSED = [
    ("chat/in/bob/laptop", "a command as B"),
    ("chat/in/bob/phone", "a command as B's other device"),
    ("chat/user/bob", "an event in B's stream"),
    ("chat/user/carol", "an event in a third user's stream"),
    ("chat/device/bob/laptop", "an ack or error to B's device"),
    ("chat/presence/bob", "B's presence (retained)"),
    ("chat/group/{private}", "typing in a group A is not in"),
    ("chat/group/{shared}", "a raw event in A's own group (only the server publishes there)"),
    ("chat/user/alice", "an event in A's own stream (only the server writes streams)"),
]


def _fill(template: str, world: World) -> str:
    return template.format(private=world.private, shared=world.shared, mine=world.mine)


async def test_subscribe_table(server: RunningServer, world: World) -> None:
    assert server.mqtt_port is not None
    failures = []
    async with raw_client(server.mqtt_port) as raw:
        await raw.send(connect("alice:phone", "alice", world.alice))
        assert await raw.read_packet() == CONNACK_ACCEPTED
        cases = [(t, why, SUBACK_FAILURE) for t, why in SUBSCRIBE_REFUSED]
        cases += [(t, why, 1) for t, why in SUBSCRIBE_ALLOWED]
        for packet_id, (template, why, expected) in enumerate(cases, start=1):
            topic = _fill(template, world)
            await raw.send(subscribe(topic, packet_id=packet_id))
            code = (await raw.next_of(0x90))[-1]
            if code != expected:
                failures.append(f"SUBSCRIBE {topic} ({why}): got {code:#x}, want {expected:#x}")
    assert not failures, "\n".join(failures)


async def test_publish_table_reaches_nobody(server: RunningServer, world: World) -> None:
    async with (
        connect_device(server, "alice", "phone", world.alice) as phone,
        connect_device(server, "bob", "laptop", world.bob) as laptop,
        connect_device(server, "carol", "tablet", world.carol) as tablet,
    ):
        for device in (phone, laptop, tablet):
            await device.next("sync_response")
        await asyncio.gather(laptop.client.subscribe(f"chat/group/{world.private}", qos=1))
        heads = await _heads(server, world)
        forged = {"type": "send_message", "client_msg_id": "forged", "to_user": "carol", "content": "from bob?"}
        for template, _ in PUBLISH_REFUSED:
            await phone.client.publish(_fill(template, world), json.dumps(forged), qos=1, retain=True)
        errors = [e for e in await phone.drain(1.0) if e["type"] == "error"]
        assert len(errors) == len(PUBLISH_REFUSED) and {e["code"] for e in errors} == {"not_allowed"}
        assert await laptop.drain(0.3) == [] and await tablet.drain(0.3) == []
        assert await _heads(server, world) == heads  # no stream got a single event
    async with connect_device(server, "bob", "laptop", world.bob) as again:  # no retained forgery either
        await again.client.subscribe("chat/presence/carol", qos=1)
        retained = [e for e in await again.drain(1.0) if e.get("user_id") == "bob" or e.get("content") == "from bob?"]
        assert retained == []


async def _heads(server: RunningServer, world: World) -> dict[str, int]:
    heads = {}
    for user, token in (("alice", world.alice), ("bob", world.bob), ("carol", world.carol)):
        async with http_client(server, token) as http:
            heads[user] = (await http.get("/v1/sync", params={"since_seq": 10**6})).json()["latest_seq"]
    return heads


async def test_wildcards_receive_nothing_of_others(server: RunningServer, world: World) -> None:
    """Every refused filter at once, then B chats, types and comes online: A hears nothing."""
    async with connect_device(server, "alice", "phone", world.alice, subscribe=False) as phone:
        refused = [(_fill(t, world), 1) for t, _ in SUBSCRIBE_REFUSED]
        codes = await phone.client.subscribe(refused)
        assert {int(getattr(c, "value", c)) for c in codes} == {SUBACK_FAILURE}
        async with (
            connect_device(server, "bob", "laptop", world.bob) as laptop,
            connect_device(server, "carol", "tablet", world.carol) as tablet,
        ):
            await laptop.next("sync_response")
            await tablet.next("sync_response")
            await laptop.send("carol", SECRET, "live-1")
            await laptop.publish({"type": "typing", "group_id": world.private, "state": "started"})
            await laptop.publish({"type": "typing", "to_user": "carol", "state": "started"})
            assert (await tablet.next("new_message"))["content"] == SECRET
        leaked = await phone.drain(1.0)
        assert leaked == [], leaked


async def test_forged_and_borrowed_tokens_cannot_connect(server: RunningServer, world: World) -> None:
    assert server.mqtt_port is not None
    forged = jwt.encode({"sub": "bob", "aud": "mqchat", "exp": 2**40}, WRONG_KEY, algorithm="HS256")
    unsigned = jwt.encode({"sub": "bob", "aud": "mqchat", "exp": 2**40}, None, algorithm="none")
    cases = [
        ("bob:laptop", "bob", world.alice, "A's token as B"),
        ("bob:laptop", "alice", world.alice, "B's client id with A's user name"),
        ("alice:phone", "bob", world.alice, "A's client id with B's user name"),
        ("bob:laptop", "bob", forged, "a token signed with another key"),
        ("bob:laptop", "bob", unsigned, "an unsigned token (alg none)"),
        ("bob:laptop", "bob", "", "no password"),
        ("bob", "bob", world.bob, "a client id without a device"),
    ]
    failures = []
    for client_id, username, password, why in cases:
        async with raw_client(server.mqtt_port) as raw:
            await raw.send(connect(client_id, username, password))
            answer = await raw.read_packet()
            if answer[:3] != b"\x20\x02\x00" or answer[3] == 0:
                failures.append(f"CONNECT {client_id} as {username} ({why}): got {answer.hex()}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Http:
    what: str
    method: str
    path: str
    body: dict[str, Any] | None
    status: int
    code: str | None = None


def http_table(world: World) -> list[Http]:
    private, shared, mine = world.private, world.shared, world.mine
    secret, post = world.secret_id, world.bobs_post_in_mine
    return [
        Http("B's 1:1 history with C", "GET", "/v1/conversations/user:carol/messages", None, 200),
        Http("B's history with A (none)", "GET", "/v1/conversations/user:bob/messages", None, 200),
        Http("history of a group A is not in", "GET", f"/v1/conversations/group:{private}/messages", None, 200),
        Http("A's conversation list", "GET", "/v1/conversations", None, 200),
        Http("A's sync (B's events are not in it)", "GET", "/v1/sync", None, 200),
        Http("receipts of B's message", "GET", f"/v1/messages/{secret}/receipts", None, 404, "not_found"),
        Http("a group A is not in", "GET", f"/v1/groups/{private}", None, 403, "not_a_member"),
        Http("A's group list", "GET", "/v1/groups", None, 200),
        Http("presence of a stranger", "GET", "/v1/users/dave/presence", None, 404, "not_found"),
        Http("mark B's message read", "POST", "/v1/conversations/user:carol/read", {"message_id": secret}, 404),
        Http("recall B's 1:1 message", "POST", f"/v1/messages/{secret}/recall", None, 404, "not_found"),
        Http("recall B's post in A's own group", "POST", f"/v1/messages/{post}/recall", None, 403, "not_allowed"),
        Http(
            "send into a group A is not in",
            "POST",
            "/v1/messages",
            {"client_msg_id": "x1", "group_id": private, "content": "hi"},
            403,
            "not_a_member",
        ),
        Http(
            "add self to B's group", "POST", f"/v1/groups/{private}/members", {"user_id": "alice"}, 403, "not_allowed"
        ),
        Http("add to a group A is in, not owns", "POST", f"/v1/groups/{shared}/members", {"user_id": "dave"}, 403),
        Http("remove C from B's group", "DELETE", f"/v1/groups/{private}/members/carol", None, 403, "not_allowed"),
        Http("remove C from a group A is in", "DELETE", f"/v1/groups/{shared}/members/carol", None, 403),
        Http("remove the owner B", "DELETE", f"/v1/groups/{shared}/members/bob", None, 403, "not_allowed"),
        Http("remove B from A's own group (allowed)", "DELETE", f"/v1/groups/{mine}/members/bob", None, 204),
    ]


async def test_http_table(server: RunningServer, world: World) -> None:
    failures = []
    async with http_client(server, world.alice) as http:
        for case in http_table(world):
            response = await http.request(case.method, case.path, json=case.body)
            code = response.json()["error"]["code"] if response.status_code >= 400 else None
            if response.status_code != case.status or (case.code and code != case.code):
                failures.append(f"{case.method} {case.path} ({case.what}): {response.status_code} {code}")
            if SECRET in response.text or "carol:" in response.text:
                failures.append(f"{case.method} {case.path} ({case.what}) leaked: {response.text[:200]}")
    assert not failures, "\n".join(failures)


async def test_http_send_is_always_as_the_token_holder(server: RunningServer, world: World) -> None:
    body = {"client_msg_id": "as-bob", "to_user": "carol", "content": "hi", "from_user": "bob", "sender": "bob"}
    async with http_client(server, world.alice) as http:
        assert (await http.post("/v1/messages", json=body)).status_code == 200
        [message] = (await http.get("/v1/conversations/user:carol/messages")).json()["messages"]
        assert message["from_user"] == "alice"
    async with http_client(server, world.bob) as http:
        bobs = (await http.get("/v1/conversations/user:carol/messages")).json()["messages"]
        assert all(m["client_msg_id"] != "as-bob" for m in bobs)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        jwt.encode({"sub": "bob", "aud": "mqchat", "exp": 2**40}, WRONG_KEY, algorithm="HS256"),
        jwt.encode({"sub": "bob", "aud": "mqchat", "exp": 2**40}, None, algorithm="none"),
    ],
    ids=["garbage", "wrong-key", "alg-none"],
)
async def test_http_refuses_forged_tokens(server: RunningServer, token: str) -> None:
    async with http_client(server) as http:
        response = await http.get("/v1/sync", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401 and response.json()["error"]["code"] in ("invalid_token", "not_authorized")
