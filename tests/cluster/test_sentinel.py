"""Cluster mode through Redis Sentinel, and a real failover.

A master, a replica and three Sentinels (tests/support/sentinel.py); two ``mqchat serve`` nodes
with ``redis+sentinel://...``; SDK clients on both nodes send to each other without pause while
the master is killed with SIGKILL (or, in ``demote``, ``SENTINEL FAILOVER`` turns it into a
replica while it lives on and still answers). The Sentinels promote the replica; the nodes must
find it, subscribe there (``PUBSUB NUMSUB`` on the new master counts both) and deliver live
across nodes again. Two raw MQTT probe devices tell live delivery (a top-level ``new_message``) from the
catch-up that repairs the outage (``sync_response`` pages): the time from the kill until a probe
sent after it arrives live, both ways, is printed. At the end every acknowledged send is stored
exactly once and every device has seen seqs 1..head of its stream exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from mqchat.clients import ChatClient
from mqchat.core.protocol import NewMessage
from tests.clients.support import client_for
from tests.support.cluster import account, device_on, node, running, send_command
from tests.support.devices import Device
from tests.support.processes import ServerProcess
from tests.support.sentinel import SentinelSet

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(300)]

SEND_PAUSE = 0.1  # between one client's sends: a steady trickle, not a load test
PROBE_PAUSE = 0.25
PAIRS = (("alice", "bob"), ("carol", "dave"))  # the first of each pair on n1, the second on n2


@pytest.fixture
async def sentinels(tmp_path: Path) -> AsyncIterator[SentinelSet]:
    group = SentinelSet(tmp_path / "redis")
    try:
        await group.start()
        await group.ready()
        yield group
    finally:
        await group.kill_all()


@pytest.fixture
async def nodes(tmp_path: Path, database: str, sentinels: SentinelSet) -> AsyncIterator[Sequence[ServerProcess]]:
    servers = [node(tmp_path, name, database, sentinels.url) for name in ("n1", "n2")]
    async with running(servers) as started:
        yield started


@dataclass
class Sender:
    """One SDK client: what it sent (and when the ack came) and the stream it read."""

    client: ChatClient
    peer: str
    acked: list[tuple[str, int, float]] = field(default_factory=list)  # client_msg_id, server_msg_id, time
    seqs: list[int] = field(default_factory=list)
    messages: list[NewMessage] = field(default_factory=list)

    async def send_until(self, stop: asyncio.Event) -> None:
        for k in itertools.count():
            if stop.is_set():
                return
            ack = await asyncio.wait_for(self.client.send(self.peer, f"{self.client.user_id}-{k}"), 60)
            self.acked.append((ack.client_msg_id, ack.server_msg_id, time.monotonic()))
            await asyncio.sleep(SEND_PAUSE)

    async def read(self) -> None:
        async for event in self.client.events():
            self.seqs.append(event.seq)
            if isinstance(event, NewMessage):
                self.messages.append(event)


async def first_live_probe(sender: Device, receiver: Device, after: float, timeout: float = 120) -> float:
    """Send probes from ``sender`` until one sent after ``after`` reaches ``receiver`` as a live
    event; the time it arrived. A probe that cannot be sent fails the test at once."""
    sent_at: dict[str, float] = {}

    async def probes() -> None:
        for k in itertools.count():
            msg_id = f"probe-{uuid.uuid4().hex[:12]}-{k}"  # never a duplicate of an earlier round's
            sent_at[msg_id] = time.monotonic()
            await sender.publish(send_command(msg_id, receiver.user_id, "probe"))
            await asyncio.sleep(PROBE_PAUSE)

    async def arrival() -> float:
        while True:
            event = await receiver.next("new_message", timeout=timeout)  # only live: catch-up is a sync_response
            if event["from_user"] == sender.user_id and sent_at.get(event["client_msg_id"], 0) > after:
                return time.monotonic()

    sending, waiting = asyncio.create_task(probes()), asyncio.create_task(arrival())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([sending, waiting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, waiting):
            task.cancel()
        await asyncio.gather(sending, waiting, return_exceptions=True)
    if sending.done() and not sending.cancelled() and sending.exception() is not None:
        raise AssertionError(f"{sender.user_id} could not send a probe") from sending.exception()
    return waiting.result()


async def subscribers_on(sentinels: SentinelSet, port: int) -> int:
    """How many connections subscribe to the control channel on the server at ``port``."""
    client = sentinels.daemon_on(port).client()
    try:
        ((_, count),) = await client.pubsub_numsub("mqchat:ctl")
        return int(count)
    finally:
        await client.aclose()


@pytest.mark.parametrize("how", ["kill", "demote"])
async def test_a_sentinel_failover_loses_no_message_and_live_delivery_resumes(
    how: str, nodes: Sequence[ServerProcess], sentinels: SentinelSet, database: str, tmp_path: Path
) -> None:
    """``kill``: the master dies (SIGKILL), its connections break. ``demote``: ``SENTINEL
    FAILOVER`` turns the living master into a replica, where writes get ``READONLY``."""
    n1, n2 = nodes
    assert await subscribers_on(sentinels, sentinels.master.port) == 2, "both nodes subscribe on the master"

    senders: list[Sender] = []
    for left, right in PAIRS:
        for user, peer, server in ((left, right, n1), (right, left, n2)):
            token, _ = await account(server, user)
            senders.append(Sender(client_for(server, user, token, tmp_path), peer))
    probe_tokens = [await account(n1, "p1"), await account(n2, "p2")]

    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        for sender in senders:
            await stack.enter_async_context(sender.client)
        async with asyncio.timeout(30):
            for sender in senders:
                await sender.client.wait_connected()
        p1 = await stack.enter_async_context(device_on(n1, "p1", "probe", *probe_tokens[0]))
        p2 = await stack.enter_async_context(device_on(n2, "p2", "probe", *probe_tokens[1]))
        readers = [asyncio.create_task(s.read()) for s in senders]
        writers = [asyncio.create_task(s.send_until(stop)) for s in senders]
        try:
            # Live across nodes before the failover (the same measure as after it).
            await asyncio.gather(first_live_probe(p1, p2, 0), first_live_probe(p2, p1, 0))
            await asyncio.sleep(2)

            old_master, new_master = sentinels.master.port, sentinels.replica.port
            if how == "kill":
                await sentinels.master.kill()
                killed = time.monotonic()
                *live, followed = await asyncio.gather(
                    first_live_probe(p1, p2, killed),
                    first_live_probe(p2, p1, killed),
                    both_subscribed_on(sentinels, new_master),
                )
            else:
                await sentinels.demote_master()
                killed = time.monotonic()
                # The old master serves on until the Sentinels reconfigure it, so probes through it
                # would still pass: first both nodes must have moved, then live delivery is measured.
                await sentinels.wait_promoted()
                followed = await both_subscribed_on(sentinels, new_master)
                after = time.monotonic()
                live = await asyncio.gather(first_live_probe(p1, p2, after), first_live_probe(p2, p1, after))
            recovered = max(live) - killed
            assert await sentinels.master_named_by_sentinels() == new_master != old_master
            assert await subscribers_on(sentinels, new_master) == 2, "both nodes still subscribe on the new master"
            if how == "demote":
                assert await subscribers_on(sentinels, old_master) == 0, "no node stays on the demoted master"
                for server in (n1, n2):  # it asked the Sentinels, rather than wait to be cut off (~10 s)
                    assert "the Sentinels name" in server.log(), f"{server.data_dir.name} followed the new master"
            during = [a for s in senders for a in s.acked if killed < a[2] < max(live)]
            print(
                f"\nfailover ({how}): both nodes subscribed on the new master {followed - killed:.2f} s after "
                f"the failover began; live cross-node delivery again after {recovered:.2f} s "
                f"(n1->n2 {live[0] - killed:.2f} s, n2->n1 {live[1] - killed:.2f} s); "
                f"{len(during)} sends acked in between"
            )
            if how == "kill":
                assert during, "sends are acked while the master is gone"
            await asyncio.sleep(3)  # traffic on the new master
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*writers), 120)
        for server in (n1, n2):
            assert "Redis is back" in server.log(), "the node reconnected (and resynced) after the failover"
        await until_every_stream_is_read(senders, database)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for sender in senders:
            assert sender.client.outbox() == []
    await count(senders, database)


async def both_subscribed_on(sentinels: SentinelSet, port: int, timeout: float = 60) -> float:
    """Until both nodes subscribe on the server at ``port``; the time they do."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if await subscribers_on(sentinels, port) == 2:
                    return time.monotonic()
            await asyncio.sleep(0.1)


async def heads(database: str) -> dict[str, int]:
    conn = await asyncpg.connect(database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return {row["user_id"]: row["last_seq"] for row in await conn.fetch("SELECT user_id, last_seq FROM users")}
    finally:
        await conn.close()


async def until_every_stream_is_read(senders: Sequence[Sender], database: str) -> None:
    """Until each client has read up to its stream's head, twice in a row a second apart (an
    ack makes receipts, which are new events)."""
    quiet = 0
    async with asyncio.timeout(60):
        while quiet < 2:
            await asyncio.sleep(1)
            head = await heads(database)
            done = all(s.seqs and s.seqs[-1] == head[s.client.user_id] for s in senders)
            quiet = quiet + 1 if done else 0


async def count(senders: Sequence[Sender], database: str) -> None:
    head = await heads(database)
    conn = await asyncpg.connect(database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT id, sender, client_msg_id FROM messages WHERE sender = ANY($1::text[])",
            [s.client.user_id for s in senders],
        )
    finally:
        await conn.close()
    stored = {(row["sender"], row["client_msg_id"]): row["id"] for row in rows}
    acked = {(s.client.user_id, msg_id): server_id for s in senders for msg_id, server_id, _ in s.acked}
    assert len(rows) == len(stored), "no message is stored twice"
    assert stored == acked, "every acknowledged send is stored, once, under the id its ack gave"
    by_id = {server_id: user for (user, _), server_id in acked.items()}
    for s in senders:
        user = s.client.user_id
        assert s.seqs == list(range(1, head[user] + 1)), f"{user} read seqs 1..{head[user]} exactly once, in order"
        seen = [m.server_msg_id for m in s.messages]
        assert len(seen) == len(set(seen)), f"{user} got a message twice"
        mine = {i for i, sender in by_id.items() if sender in (user, s.peer)}
        assert set(seen) == mine, f"{user} got each message it sent or was sent, and no other"
    total = sum(len(s.acked) for s in senders)
    print(f"count: {total} sends acked and stored once; streams read 1..head: {dict(sorted(head.items()))}")


async def test_nodes_stay_healthy_while_only_the_sentinels_are_down(
    nodes: Sequence[ServerProcess], sentinels: SentinelSet
) -> None:
    """The Sentinels are asked where the master is every heartbeat; when none answers while the
    master does, the nodes keep working on it (and say so once) rather than report Redis down,
    and the question does not hold up the heartbeat that keeps a node alive for the others."""
    n1, n2 = nodes
    probes = [await account(n1, "p1"), await account(n2, "p2")]
    for sentinel in sentinels.sentinels:
        await sentinel.kill()
    async with device_on(n1, "p1", "probe", *probes[0]) as p1, device_on(n2, "p2", "probe", *probes[1]) as p2:
        await asyncio.sleep(12)  # longer than a node's liveness TTL (10 s): a stuck heartbeat gets a node reaped
        await asyncio.gather(first_live_probe(p1, p2, 0), first_live_probe(p2, p1, 0))
    for server in (n1, n2):
        async with server.http() as http:
            assert (await http.get("/healthz")).json()["redis"] == "ok"
        assert "cannot ask the Sentinels" in server.log()
        assert "is gone" not in server.log(), "no node thought the other dead"
