"""Cluster mode, everything live across nodes: two ``mqchat serve`` nodes on one PostgreSQL and one
Redis (the test's own). Each event must arrive as a live event on the other node (a top-level
``new_message``, not inside a catch-up page)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from tests.support.accounts import http_client
from tests.support.cluster import RedisProcess, account, device_on, node, running, send_command
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
async def nodes(tmp_path: Path, database: str, redis_server: RedisProcess) -> AsyncIterator[Sequence[ServerProcess]]:
    env = {"MQCHAT_LIMITS__USER_SEND_RATE_PER_SECOND": "5", "MQCHAT_LIMITS__USER_SEND_BURST": "10"}
    servers = [node(tmp_path, name, database, redis_server.url, env) for name in ("n1", "n2")]
    async with running(servers) as started:
        yield started


async def test_one_to_one_and_group_messages_reach_devices_on_the_other_node_live(
    nodes: Sequence[ServerProcess],
) -> None:
    n1, n2 = nodes
    alice, alice_key = await account(n1, "alice")
    bob, bob_key = await account(n2, "bob")
    carol, carol_key = await account(n2, "carol")
    async with http_client(n1, alice) as http:
        group = (await http.post("/v1/groups", json={"name": "trip", "members": ["bob", "carol"]})).json()["group_id"]
    async with (
        device_on(n1, "alice", "phone", alice, alice_key) as phone,
        device_on(n2, "bob", "laptop", bob, bob_key) as laptop,
        device_on(n2, "carol", "tablet", carol, carol_key) as tablet,
        device_on(n1, "bob", "phone", bob, bob_key) as bob_phone,
    ):
        await phone.publish(send_command("m-1", "bob", "hello from n1"))
        ack = await phone.next("message_ack")
        for device in (laptop, bob_phone):  # bob's devices on both nodes
            event = await device.next("new_message")
            assert (event["server_msg_id"], event["content"], event["from_user"]) == (
                ack["server_msg_id"],
                "hello from n1",
                "alice",
            )
        await phone.publish(
            {"type": "send_group_message", "client_msg_id": "g-1", "group_id": group, "content": "hi all"}
        )
        for device in (laptop, tablet, bob_phone):
            assert (await device.next("new_message"))["content"] == "hi all"
        # And back: bob on n2 answers alice on n1.
        await laptop.publish(send_command("r-1", "alice", "hi alice"))
        own = [(await phone.next("new_message"))["content"] for _ in range(3)]  # her own two first
        assert own == ["hello from n1", "hi all", "hi alice"]
        # Nothing twice: the node that stored an event does not get it back from Redis.
        for device in (laptop, bob_phone):  # bob's own answer, on his stream, once on each device
            assert [e["client_msg_id"] for e in await device.drain(0.5) if e.get("type") == "new_message"] == ["r-1"]
        for device in (phone, tablet):
            assert [e for e in await device.drain(0.5) if e.get("type") == "new_message"] == []


async def test_typing_and_presence_are_right_on_every_node(nodes: Sequence[ServerProcess]) -> None:
    n1, n2 = nodes
    alice, alice_key = await account(n1, "alice")
    bob, bob_key = await account(n2, "bob")
    async with http_client(n1, alice) as http:
        await http.post("/v1/messages", json={"client_msg_id": "c", "to_user": "bob", "content": "contact"})
        group = (await http.post("/v1/groups", json={"name": "g", "members": ["bob"]})).json()["group_id"]
    async with device_on(
        n2, "bob", "laptop", bob, bob_key, topics=["chat/presence/alice", f"chat/group/{group}"]
    ) as laptop:
        _, offline = await laptop.received.get()  # the state at SUBSCRIBE: alice has never connected
        assert (offline["user_id"], offline["status"]) == ("alice", "offline")
        async with device_on(n1, "alice", "phone", alice, alice_key) as phone:
            online = await next_presence(laptop)
            assert (online["user_id"], online["status"]) == ("alice", "online")
            async with http_client(n2, bob) as http:  # over HTTP on the other node too
                assert (await http.get("/v1/users/alice/presence")).json()["status"] == "online"
            await phone.publish({"type": "typing", "to_user": "bob", "state": "started"})
            typing = await laptop.next("typing")
            assert (typing["from_user"], typing["state"]) == ("alice", "started")
            await phone.publish({"type": "typing", "group_id": group, "state": "started"})
            typing = await laptop.next("typing")
            assert (typing["group_id"], typing["from_user"]) == (group, "alice")
        offline = await next_presence(laptop)
        assert (offline["user_id"], offline["status"]) == ("alice", "offline") and offline["last_seen"]


async def next_presence(device: object) -> dict[str, object]:
    received: asyncio.Queue[tuple[str, dict[str, object]]] = device.received  # type: ignore[attr-defined]
    async with asyncio.timeout(10):
        while True:
            topic, event = await received.get()
            if topic.startswith("chat/presence/"):
                return event


async def test_a_long_poll_on_one_node_wakes_for_a_message_stored_by_another(nodes: Sequence[ServerProcess]) -> None:
    n1, n2 = nodes
    alice, _ = await account(n1, "alice")
    bob, _ = await account(n2, "bob")
    async with http_client(n2, bob) as poller, http_client(n1, alice) as sender:
        poll = asyncio.create_task(poller.get("/v1/sync/long-poll", params={"since_seq": 0, "timeout": 20}))
        await asyncio.sleep(0.5)
        started = asyncio.get_running_loop().time()
        await sender.post("/v1/messages", json={"client_msg_id": "lp", "to_user": "bob", "content": "wake up"})
        answer = (await poll).json()
        assert [e["content"] for e in answer["events"]] == ["wake up"]
        assert asyncio.get_running_loop().time() - started < 10  # woken, not timed out


async def test_takeover_and_revocation_close_the_connection_on_the_other_node(nodes: Sequence[ServerProcess]) -> None:
    n1, n2 = nodes
    alice, alice_key = await account(n1, "alice")
    bob, bob_key = await account(n2, "bob")
    async with http_client(n1, alice) as http:
        await http.post("/v1/messages", json={"client_msg_id": "c", "to_user": "bob", "content": "contact"})
    async with device_on(n2, "bob", "watch", bob, bob_key, topics=["chat/presence/alice"]) as watch:
        await watch.received.get()  # the presence at SUBSCRIBE
        async with device_on(n1, "alice", "phone", alice, alice_key) as first:
            assert (await next_presence(watch))["status"] == "online"
            async with device_on(n2, "alice", "phone", alice, alice_key) as second:
                await closed(first)  # MQTT 3.1.1, 3.1.4: the older connection of the client id goes
                await second.publish(send_command("after", "bob", "still here"))
                assert (await second.next("message_ack"))["client_msg_id"] == "after"
                async with http_client(n1, alice) as http:  # revoked through the other node
                    assert (await http.delete("/v1/devices/phone")).status_code == 204
                await closed(second)
        # A takeover never took alice offline in between; the revocation's disconnect did.
        events = [e for e in await watch.drain(1.0) if e.get("user_id") == "alice"]
        assert [e["status"] for e in events] == ["offline"]


async def closed(device: object, timeout: float = 10) -> None:
    client = device.client  # type: ignore[attr-defined]
    async with asyncio.timeout(timeout):
        while True:
            try:
                await client.publish("chat/in/x/y", b"{}", qos=1, timeout=1)
            except Exception:
                return
            await asyncio.sleep(0.1)


async def test_connections_and_send_rate_are_counted_across_nodes(nodes: Sequence[ServerProcess]) -> None:
    n1, n2 = nodes
    alice, alice_key = await account(n1, "alice")
    await account(n1, "bob")
    async with (
        device_on(n1, "alice", "a", alice, alice_key) as on_n1,
        device_on(n2, "alice", "b", alice, alice_key) as on_n2,
    ):
        started = asyncio.get_running_loop().time()
        for i in range(20):
            await on_n1.publish(send_command(f"a-{i}", "bob", "x"))
            await on_n2.publish(send_command(f"b-{i}", "bob", "x"))
        answers = [e for d in (on_n1, on_n2) for e in await d.drain(1.0) if e["type"] in ("message_ack", "error")]
        elapsed = asyncio.get_running_loop().time() - started
    acks = [e for e in answers if e["type"] == "message_ack"]
    refused = [e for e in answers if e["type"] == "error"]
    assert len(acks) + len(refused) == 40 and {e["code"] for e in refused} == {"rate_limited"}
    # One bucket for the user across both nodes: a burst of 10 and 5/s, not twice that.
    assert len(acks) <= 10 + 5 * elapsed + 1, (len(acks), elapsed)


async def test_login_throttles_count_across_nodes(tmp_path: Path, database: str, redis_server: RedisProcess) -> None:
    env = {"MQCHAT_AUTH__LOGIN_MAX_FAILURES": "3"}
    servers = [node(tmp_path, name, database, redis_server.url, env) for name in ("n1", "n2")]
    async with running(servers) as (n1, n2):
        await account(n1, "alice")
        codes = []
        for server in (n1, n2, n1, n2):  # a guesser spreading its guesses over the nodes
            async with http_client(server) as http:
                guess = await http.post("/v1/token", json={"user_id": "alice", "password": "wrong-guess"})
                codes.append(guess.status_code)
        assert codes == [401, 401, 401, 429]
