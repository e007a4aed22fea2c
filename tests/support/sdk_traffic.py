"""SDK devices sending to each other through a load balancer while the test breaks something,
and the counts every such test makes afterwards:

- every send resolved with a ``message_ack`` and every acked ``(sender, client_msg_id)`` is
  stored exactly once, as the acked ``server_msg_id``; nothing else is stored;
- every user's stream in PostgreSQL is seqs 1..head, and holds each of its messages (its own
  1:1 sends and receipts, its groups' messages) exactly once;
- every device received exactly seqs 1..head of its user's stream, in order, each once.

Each message's content carries the test's clock at the send (``at=``), so a device can tell
which of the messages it received were sent after a given instant (recovery times)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as redis

from mqchat.clients import Backoff, ChatClient
from mqchat.clients.errors import ClientClosed
from mqchat.core.protocol import MessageAck, NewMessage
from tests.support.accounts import PASSWORD

SENT_AT = re.compile(r" at=(\d+\.\d+)$")


@dataclass(eq=False)
class SdkDevice:
    """One ``ChatClient`` and what it saw."""

    user_id: str
    device_id: str
    client: ChatClient
    seqs: list[int] = field(default_factory=list)
    received: list[tuple[float, float]] = field(default_factory=list)
    """``(sent at, received at)`` of every ``new_message`` this device took, on the test's clock."""
    acks: list[MessageAck] = field(default_factory=list)
    ack_times: list[tuple[float, float]] = field(default_factory=list)
    """``(sent at, acked at)`` of every acknowledged send."""
    failures: list[BaseException] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.user_id}/{self.device_id}"

    def first_received_sent_after(self, instant: float) -> float | None:
        """When this device first received a message sent after ``instant`` (None: not yet)."""
        times = [received for sent, received in self.received if sent > instant]
        return min(times) if times else None

    def first_ack_of_send_after(self, instant: float) -> float | None:
        """When a send this device made after ``instant`` was first acknowledged (None: not yet)."""
        times = [acked for sent, acked in self.ack_times if sent > instant]
        return min(times) if times else None


async def register(http_url: str, user_ids: Sequence[str]) -> dict[str, str]:
    """Accounts over HTTP (through the balancer): user id -> access token."""
    tokens = {}
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        for user_id in user_ids:
            created = await http.post("/v1/users", json={"user_id": user_id, "password": PASSWORD})
            assert created.status_code == 201, created.text
            login = await http.post("/v1/token", json={"user_id": user_id, "password": PASSWORD})
            assert login.status_code == 200, login.text
            tokens[user_id] = str(login.json()["access_token"])
    return tokens


async def create_group(http_url: str, token: str, members: Sequence[str]) -> str:
    async with httpx.AsyncClient(base_url=http_url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as http:
        created = await http.post("/v1/groups", json={"name": "everyone", "members": list(members)})
        assert created.status_code in (200, 201), created.text
        return str(created.json()["group_id"])


def sdk_device(
    user_id: str, device_id: str, token: str, *, mqtt_port: int, http_port: int, store_dir: Path
) -> SdkDevice:
    """A device as an application would make it: the SDK's own back-off and timeouts."""
    client = ChatClient(
        user_id, token=token, host="127.0.0.1", mqtt_port=mqtt_port, http_port=http_port,
        store_path=store_dir / f"{user_id}-{device_id}.sqlite3", device_id=device_id, backoff=Backoff(),
    )  # fmt: skip
    return SdkDevice(user_id, device_id, client)


class Traffic:
    """Every device sends every ``interval`` seconds (jittered): to the next user in turn, and
    every fourth message to the group if its user is a member. Sends are not awaited one by
    one: while a device is cut off they pile up in its outbox, as an application's would."""

    def __init__(self, devices: Sequence[SdkDevice], group_id: str, members: set[str], interval: float) -> None:
        self.devices = list(devices)
        self.group_id = group_id
        self.members = members
        self.interval = interval
        self.users = sorted({d.user_id for d in devices})
        self.tokens: dict[str, str] = {}
        """Access tokens by user, for the test's own HTTP requests."""
        self._sending = True
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: list[asyncio.Task[MessageAck]] = []

    async def start(self, connect_within: float = 60) -> None:
        for device in self.devices:
            await device.client.start()
        async with asyncio.timeout(connect_within):
            await asyncio.gather(*(d.client.wait_connected() for d in self.devices))
        for device in self.devices:
            self._tasks.append(asyncio.create_task(self._consume(device)))
            self._tasks.append(asyncio.create_task(self._send_loop(device)))

    async def _consume(self, device: SdkDevice) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ClientClosed):
            async for event in device.client.events():
                device.seqs.append(event.seq)
                if isinstance(event, NewMessage) and event.content and (sent := SENT_AT.search(event.content)):
                    device.received.append((float(sent.group(1)), loop.time()))

    async def _send_loop(self, device: SdkDevice) -> None:
        loop = asyncio.get_running_loop()
        others = [u for u in self.users if u != device.user_id]
        rng = random.Random(device.name)
        n = rng.randrange(len(others))
        await asyncio.sleep(rng.uniform(0, self.interval))
        while self._sending:
            n += 1
            content = f"{device.name} #{n} at={loop.time():.3f}"
            if n % 4 == 0 and device.user_id in self.members:
                send = device.client.send_to_group(self.group_id, content)
            else:
                send = device.client.send(others[n % len(others)], content)
            task = asyncio.create_task(send)
            task.add_done_callback(functools.partial(_record, device, sent_at=loop.time()))
            self._sends.append(task)
            await asyncio.sleep(rng.uniform(0.5, 1.5) * self.interval)

    @property
    def sent(self) -> int:
        return len(self._sends)

    async def stop_sending_and_drain(self, timeout: float) -> list[MessageAck]:
        """Stop the senders and wait until every send so far is acked; all the acks."""
        self._sending = False
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._sends, return_exceptions=True)
        failures = [f for d in self.devices for f in d.failures]
        assert not failures, f"{len(failures)} sends failed: {failures[:5]}"
        return [a for d in self.devices for a in d.acks]

    async def close(self) -> None:
        self._sending = False
        for device in self.devices:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(device.client.close(), 10)
        for task in self._tasks + self._sends:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sends, return_exceptions=True)


def _record(device: SdkDevice, task: asyncio.Task[MessageAck], *, sent_at: float) -> None:
    if task.cancelled():
        return
    if (error := task.exception()) is not None:
        device.failures.append(error)
    else:
        device.acks.append(task.result())
        device.ack_times.append((sent_at, asyncio.get_running_loop().time()))


async def placement(redis_url: str, devices: Sequence[SdkDevice]) -> dict[SdkDevice, str]:
    """The node holding each device now, from cluster mode's presence hashes in Redis."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        where = {}
        for device in devices:
            value = await client.hget(f"mqchat:dev:{device.user_id}", device.device_id)
            assert value, f"{device.name} is not registered on any node"
            where[device] = str(value).split(":")[0]
        return where
    finally:
        await client.aclose()


async def recovery_time(devices: Sequence[SdkDevice], instant: float, timeout: float) -> float:
    """Seconds from ``instant`` until every one of ``devices`` has received a message sent
    after it (so it is connected to a live node and gets live traffic again)."""
    async with asyncio.timeout(timeout):
        while True:
            firsts = [d.first_received_sent_after(instant) for d in devices]
            if all(t is not None for t in firsts):
                return max(t for t in firsts if t is not None) - instant
            await asyncio.sleep(0.1)


def libpq(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def check_counts(
    database_url: str,
    devices: Sequence[SdkDevice],
    acks: Sequence[MessageAck],
    also_acked: dict[tuple[str, str], int] | None = None,
) -> str:
    """The counts of the module docstring; a one-line summary. ``also_acked``: messages the
    test sent itself, ``(sender, client_msg_id) -> server_msg_id``."""
    lagging = await _settle(database_url, devices)
    assert not lagging, f"devices never reached their stream's head: {lagging}"
    conn = await asyncpg.connect(libpq(database_url))
    try:
        messages = await conn.fetch("SELECT id, sender, client_msg_id, to_user, group_id FROM messages")
        members: dict[str, set[str]] = {}
        for row in await conn.fetch("SELECT group_id, user_id FROM group_members WHERE active"):
            members.setdefault(row["group_id"], set()).add(row["user_id"])
        streams: dict[str, list[tuple[int, int | None]]] = {}
        for row in await conn.fetch("SELECT user_id, seq, message_id FROM stream_events ORDER BY user_id, seq"):
            streams.setdefault(row["user_id"], []).append((row["seq"], row["message_id"]))
        heads = {r["user_id"]: r["last_seq"] for r in await conn.fetch("SELECT user_id, last_seq FROM users")}
    finally:
        await conn.close()

    by_key = Counter((m["sender"], m["client_msg_id"]) for m in messages)
    assert max(by_key.values(), default=1) == 1, [k for k, n in by_key.items() if n > 1][:5]
    stored = {(m["sender"], m["client_msg_id"]): m["id"] for m in messages}
    by_sender = {}
    for device in devices:
        for ack in device.acks:
            by_sender[(device.user_id, ack.client_msg_id)] = ack.server_msg_id
    assert len(by_sender) == len(acks), "an ack came twice for one client_msg_id"
    by_sender |= also_acked or {}
    missing = [k for k in by_sender if k not in stored]
    assert not missing, f"{len(missing)} acked messages are not stored: {missing[:5]}"
    wrong = [k for k, msg_id in by_sender.items() if stored[k] != msg_id]
    assert not wrong, f"acked with another server_msg_id than stored: {wrong[:5]}"
    unacked = set(stored) - set(by_sender)
    assert not unacked, f"{len(unacked)} stored messages were never acked to their sender: {sorted(unacked)[:5]}"

    for user_id, head in heads.items():
        seqs = [seq for seq, _ in streams.get(user_id, [])]
        assert seqs == list(range(1, head + 1)), f"{user_id}'s stream is not 1..{head}"
        doubled = [m for m, n in Counter(m for _, m in streams.get(user_id, []) if m is not None).items() if n > 1]
        assert not doubled, f"{user_id}'s stream holds messages {doubled[:5]} more than once"
    held = {user: {m for _, m in entries if m is not None} for user, entries in streams.items()}
    for m in messages:
        readers = {m["sender"], m["to_user"]} if m["group_id"] is None else members[m["group_id"]]
        absent = [u for u in readers if m["id"] not in held.get(u, set())]
        assert not absent, f"message {m['id']} is missing from the streams of {absent}"

    for device in devices:
        head = heads[device.user_id]
        assert device.seqs == list(range(1, head + 1)), (
            f"{device.name} got {len(device.seqs)} events for seqs 1..{head}: "
            f"doubled {[s for s, n in Counter(device.seqs).items() if n > 1][:5]}, "
            f"missing {sorted(set(range(1, head + 1)) - set(device.seqs))[:5]}"
        )
    return (
        f"{len(messages)} messages stored = acked, {sum(heads.values())} stream entries in {len(heads)} streams, "
        f"{sum(len(d.seqs) for d in devices)} events on {len(devices)} devices"
    )


async def _heads(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(libpq(database_url))
    try:
        return {r["user_id"]: r["last_seq"] for r in await conn.fetch("SELECT user_id, last_seq FROM users")}
    finally:
        await conn.close()


async def _settle(database_url: str, devices: Sequence[SdkDevice], timeout: float = 90) -> list[str]:
    """Wait until every device has reached its stream's head and the heads stayed put for 2 s
    (receipts of the last deliveries still append to senders' streams after sending stopped).
    Generous: catch-up after a reconnect is paged. Returns the devices still lagging."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    lagging: list[SdkDevice] = list(devices)
    heads: dict[str, int] = {}
    while loop.time() < deadline:
        heads = await _heads(database_url)
        lagging = [d for d in devices if (d.seqs[-1] if d.seqs else 0) < heads[d.user_id]]
        if not lagging:
            await asyncio.sleep(2)
            if await _heads(database_url) == heads:
                return []
            continue
        await asyncio.sleep(0.2)
    return [f"{d.name} at {d.seqs[-1] if d.seqs else 0} of {heads.get(d.user_id)}" for d in lagging]
