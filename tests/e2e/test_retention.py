"""Retention with a real server: old history goes in batches, what some device has not acked
stays up to ``offline_days``, heads stay, and a device asking for deleted events gets
``cursor_expired`` over MQTT (catch-up and ``sync_messages``) and over HTTP (sync, long-poll).

The pruner is run with a clock set days ahead (``run_once(now=...)``) rather than by aging rows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mqchat.bridge.retention import RetentionPruner
from mqchat.config import Settings
from mqchat.core.errors import CursorExpired
from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register
from tests.support.devices import Device, connect_device

pytestmark = pytest.mark.timeout(60)
DAY_MS = 86_400_000


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A batch of 2 rows: the three-entry prefixes below take several delete transactions.
    retention = settings.retention.model_copy(update={"days": 1, "offline_days": 2, "batch_size": 2})
    return settings.model_copy(update={"retention": retention})


def days_ahead(days: float) -> int:
    return time.time_ns() // 1_000_000 + int(days * DAY_MS)


async def send(server: RunningServer, token: str, client_msg_id: str, to: str = "bob") -> dict[str, Any]:
    async with http_client(server, token) as http:
        sent = await http.post("/v1/messages", json={"client_msg_id": client_msg_id, "to_user": to, "content": "hi"})
        assert sent.status_code == 200, sent.text
        return dict(sent.json())


async def next_of(device: Device, *kinds: str) -> dict[str, Any]:
    """The next event on the device topic, which must be one of ``kinds``."""
    while True:
        topic, event = await device.received.get()
        if topic.startswith("chat/device/"):
            assert event["type"] in kinds, event
            return event


async def test_old_history_goes_unacked_entries_wait_and_expired_cursors_are_told(server: RunningServer) -> None:
    store, pruner = server.services.store, server.services.ops.retention
    alice, bob = await register(server, "alice"), await register(server, "bob")
    for n in range(3):
        await send(server, alice, f"m{n}")
    # bob's "old" device has acked only his first entry; alice has no device with a cursor.
    async with connect_device(server, "bob", "old", bob) as old:
        assert len((await next_of(old, "sync_response"))["events"]) == 3
        await old.publish({"type": "ack", "seq": 1})
        for _ in range(50):
            if await store.get_cursor("bob", "old") == 1:
                break
            await _pause()

    # A day and a half later: everything is past retention.days, but bob's 2 and 3 are unacked
    # by a device and younger than offline_days. alice's four entries (her three messages and
    # the delivered receipt of bob's ack) go, and so does m0, which no stream holds any more.
    assert await pruner.run_once(now=days_ahead(1.5)) == (4 + 1, 1)
    with pytest.raises(CursorExpired) as expired:
        await store.read_stream("bob", 0, 10)
    assert (expired.value.oldest_seq, expired.value.latest_seq) == (2, 3)
    assert [e.seq for e in (await store.read_stream("bob", 1, 10)).events] == [2, 3]
    with pytest.raises(CursorExpired) as expired:
        await store.read_stream("alice", 0, 10)
    assert (expired.value.oldest_seq, expired.value.latest_seq) == (5, 4)  # nothing kept
    assert [m.client_msg_id for m in await store.history("bob", "user:alice", None, 10)] == ["m2", "m1"]

    # Past offline_days nothing holds them back.
    assert await pruner.run_once(now=days_ahead(3)) == (2, 2)
    assert await store.history("bob", "user:alice", None, 10) == []
    assert await pruner.run_once(now=days_ahead(3)) == (0, 0)  # nothing left to do

    # The heads stayed: seqs go on (alice 5, bob 4) as if nothing had been deleted.
    ack = await send(server, alice, "m3")
    assert ack["seq"] == 5 and ack["duplicate"] is False

    # MQTT: the catch-up from the cursor (1) is refused, and so is a sync from before the kept part.
    async with connect_device(server, "bob", "old", bob) as old:
        error = await next_of(old, "error")
        assert error["code"] == "cursor_expired"
        assert (error["oldest_seq"], error["latest_seq"], error["ref"]) == (4, 4, None)
        await old.publish({"type": "sync_messages", "since_seq": 2})
        error = await next_of(old, "error")
        assert (error["code"], error["oldest_seq"], error["latest_seq"]) == ("cursor_expired", 4, 4)
        # The reset the error asks for: read from oldest_seq - 1, ack what was read.
        await old.publish({"type": "sync_messages", "since_seq": 3})
        page = await next_of(old, "sync_response")
        assert [e["seq"] for e in page["events"]] == [4] and page["events"][0]["client_msg_id"] == "m3"
        await old.publish({"type": "ack", "seq": 4})
        for _ in range(50):
            if await store.get_cursor("bob", "old") == 4:
                break
            await _pause()
    async with connect_device(server, "bob", "old", bob) as old:
        page = await next_of(old, "sync_response")  # the cursor is past the gap again
        assert page == {"type": "sync_response", "events": [], "latest_seq": 4, "has_more": False}

    # HTTP: sync and long-poll answer 410 with the same fields.
    async with http_client(server, bob) as http:
        for path in ("/v1/sync?since_seq=0", "/v1/sync/long-poll?since_seq=2&timeout=1"):
            gone = await http.get(path)
            assert gone.status_code == 410, gone.text
            assert gone.json()["error"] | {"message": ""} == {
                "code": "cursor_expired",
                "message": "",
                "oldest_seq": 4,
                "latest_seq": 4,
            }
        kept = await http.get("/v1/sync?since_seq=3")
        assert kept.status_code == 200 and [e["seq"] for e in kept.json()["events"]] == [4]


async def test_without_retention_days_nothing_is_deleted(server: RunningServer, settings: Settings) -> None:
    store = server.services.store
    alice = await register(server, "alice")
    await register(server, "bob")
    await send(server, alice, "m0")
    forever = RetentionPruner(store, settings.retention.model_copy(update={"days": None}))  # type: ignore[arg-type]
    assert await forever.run_once(now=days_ahead(400)) == (0, 0)
    assert [e.seq for e in (await store.read_stream("bob", 0, 10)).events] == [1]


async def _pause() -> None:
    await asyncio.sleep(0.05)
