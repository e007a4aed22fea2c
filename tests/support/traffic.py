"""Continuous chat traffic across cluster nodes, and the count at the end.

``Traffic`` runs SDK clients (``ChatClient``: outbox, resends, cursor, catch-up), one per user,
each on the node the test put it on. Every client sends without pause, 1:1 to the user on the
next node and now and then to a group of everyone, and reads its own stream. ``count`` then
checks the guarantee of every fault test against PostgreSQL itself: every message a sender got
a ``message_ack`` for is stored exactly once and is in the stream of each of its recipients
exactly once; every stream is seqs 1..head without a gap; every client read exactly 1..head,
in order, nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from mqchat.clients import Backoff, ChatClient
from mqchat.core.errors import ChatError
from mqchat.core.protocol import AnyStreamEvent, NewMessage
from tests.support.processes import ServerProcess

FAST = Backoff(initial=0.05, maximum=0.5)


@dataclass
class Sent:
    sender: str
    client_msg_id: str
    server_msg_id: int
    recipients: frozenset[str]
    at: float
    """When the ack came (monotonic)."""
    took: float
    """From the call to ``send`` to its ack."""


@dataclass
class Member:
    user: str
    node: ServerProcess
    client: ChatClient
    events: list[AnyStreamEvent] = field(default_factory=list)


class Traffic:
    """``users[i]`` is served by ``nodes[i % len(nodes)]``; ``group`` holds every user."""

    def __init__(self, members: Sequence[Member], group: str, pause: float = 0.05) -> None:
        self.members = list(members)
        self.group = group
        self.pause = pause
        self.acked: list[Sent] = []
        self.refused: list[tuple[str, ChatError]] = []
        self._sending = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def build(
        cls, nodes: Sequence[ServerProcess], users: Sequence[tuple[str, str]], group: str, store_dir: Path
    ) -> Traffic:
        """``users``: (user id, token) pairs."""
        members = []
        for i, (user, token) in enumerate(users):
            node = nodes[i % len(nodes)]
            client = ChatClient(
                user, token=token, host="127.0.0.1", mqtt_port=node.mqtt_port, http_port=node.http_port,
                store_path=store_dir / f"{user}.sqlite3", device_id="sdk", backoff=FAST, probe_interval=3.0,
            )  # fmt: skip
            members.append(Member(user, node, client))
        return cls(members, group)

    async def start(self) -> None:
        for member in self.members:
            await member.client.start()
        async with asyncio.timeout(30):
            for member in self.members:
                await member.client.wait_connected()
        self._sending.set()
        users = [m.user for m in self.members]
        for i, member in enumerate(self.members):
            peer = users[(i + 1) % len(users)]  # on the next node: every 1:1 message crosses nodes
            self._tasks.append(asyncio.create_task(self._send_loop(member, peer, frozenset(users))))
            self._tasks.append(asyncio.create_task(self._read_loop(member)))

    async def _send_loop(self, member: Member, peer: str, everyone: frozenset[str]) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while self._sending.is_set():
            n += 1
            begun = loop.time()
            try:
                if n % 4 == 0:
                    ack = await member.client.send_to_group(self.group, f"{member.user} to all #{n}")
                    recipients = everyone
                else:
                    ack = await member.client.send(peer, f"{member.user} to {peer} #{n}")
                    recipients = frozenset({member.user, peer})
            except ChatError as exc:
                self.refused.append((member.user, exc))
                continue
            now = loop.time()
            self.acked.append(Sent(member.user, ack.client_msg_id, ack.server_msg_id, recipients, now, now - begun))
            await asyncio.sleep(self.pause)

    async def _read_loop(self, member: Member) -> None:
        async for event in member.client.events():
            member.events.append(event)

    def sent_since(self, moment: float) -> int:
        return sum(1 for sent in self.acked if sent.at >= moment)

    async def stop_sending(self, timeout: float = 60) -> None:
        """Let every send in flight finish (it is acked, or it raised), then stop."""
        self._sending.clear()
        senders = self._tasks[0::2]
        async with asyncio.timeout(timeout):
            await asyncio.gather(*senders)

    async def read_up_to(self, heads: dict[str, int], timeout: float = 60) -> None:
        """Wait until every client has read its stream up to its head."""
        async with asyncio.timeout(timeout):
            while any(_last_seq(m.events) < heads[m.user] for m in self.members):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything delivered twice would arrive now

    async def close(self) -> None:
        self._sending.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for member in self.members:
            with contextlib.suppress(Exception):
                await member.client.close()


def _last_seq(events: Sequence[AnyStreamEvent]) -> int:
    return events[-1].seq if events else 0


async def heads(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return {row["user_id"]: row["last_seq"] for row in await conn.fetch("SELECT user_id, last_seq FROM users")}
    finally:
        await conn.close()


async def count(database_url: str, traffic: Traffic) -> dict[str, int]:
    """Assert the guarantee (see the module's docstring); returns the totals for the report."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        messages = await conn.fetch("SELECT id, sender, client_msg_id FROM messages")
        streams = await conn.fetch("SELECT user_id, seq, message_id FROM stream_events ORDER BY user_id, seq")
        last = {r["user_id"]: r["last_seq"] for r in await conn.fetch("SELECT user_id, last_seq FROM users")}
    finally:
        await conn.close()
    stored = Counter((r["sender"], r["client_msg_id"]) for r in messages)
    ids = {(r["sender"], r["client_msg_id"]): r["id"] for r in messages}
    in_stream = Counter((r["user_id"], r["message_id"]) for r in streams if r["message_id"] is not None)
    seqs: dict[str, list[int]] = {}
    for r in streams:
        seqs.setdefault(r["user_id"], []).append(r["seq"])

    acked_keys = Counter((s.sender, s.client_msg_id) for s in traffic.acked)
    assert not [k for k, n in acked_keys.items() if n > 1], "one send acked twice by the SDK"
    for sent in traffic.acked:
        key = (sent.sender, sent.client_msg_id)
        assert stored[key] == 1, f"acked {key} stored {stored[key]} times"
        assert ids[key] == sent.server_msg_id, f"acked {key} as {sent.server_msg_id}, stored as {ids[key]}"
        for user in sent.recipients:
            assert in_stream[(user, sent.server_msg_id)] == 1, (
                f"{key} in {user}'s stream {in_stream[(user, ids[key])]}x"
            )
    assert not [k for k, n in stored.items() if n > 1], "a message stored twice"
    senders = {m.user for m in traffic.members}
    unacked = [k for k in stored if k[0] in senders and k not in acked_keys]
    assert not unacked, f"stored but never acked to the sender: {unacked[:10]}"
    for user, head in last.items():
        assert seqs.get(user, []) == list(range(1, head + 1)), f"{user}'s stream is not 1..{head}"
    for member in traffic.members:
        read = [event.seq for event in member.events]
        assert read == list(range(1, last[member.user] + 1)), (
            f"{member.user} read {len(read)} events, not 1..{last[member.user]} once each in order: "
            f"duplicates {[s for s, n in Counter(read).items() if n > 1][:10]}, "
            f"missing {sorted(set(range(1, last[member.user] + 1)) - set(read))[:10]}"
        )
        got = Counter(e.server_msg_id for e in member.events if isinstance(e, NewMessage))
        assert all(n == 1 for n in got.values()), f"{member.user} read a message twice"
    return {
        "acked": len(traffic.acked),
        "stored": len(messages),
        "stream_events": len(streams),
        "read": sum(len(m.events) for m in traffic.members),
    }
