"""The SDK and retention: a device offline past ``retention.days`` is answered ``cursor_expired``
(docs/protocol.md, "cursor_expired: resetting a device"); the client resets to ``oldest_seq - 1``,
yields a ``HistoryGap``, reads the kept events once each and stays live.

A real ``mqchat serve`` (SQLite and PostgreSQL). Retention is run by this test on the server's
database while the server is stopped, with a clock set one day after a moment between the
messages that go and those that stay (``run_once(now=...)``, as tests/e2e/test_retention.py does):
entries are not aged for real, and nothing is pruned at a moment the test does not choose.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from mqchat.bridge.retention import RetentionPruner
from mqchat.bridge.storage import SqlStore
from mqchat.clients import ChatClient, HistoryGap
from mqchat.config import RetentionSettings
from mqchat.core.errors import CursorExpired
from mqchat.core.protocol import NewMessage
from tests.clients.support import event_log, make_client, messages, quiet, started, until
from tests.support.accounts import http_client
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

DAY_MS = 86_400_000
READ_BEFORE, DELETED, KEPT, LIVE = range(0, 3), range(3, 10), range(10, 15), range(15, 20)
"""alice's messages m0..m19, which are bob's seqs 1..20: bob reads m0-m2 before going away;
retention deletes m3-m9 (seqs 4-10) and keeps m10-m14 (seqs 11-15); m15-m19 come live after."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def send(server: ServerProcess, token: str, numbers: range) -> None:
    async with http_client(server, token) as http:
        for n in numbers:
            body = {"client_msg_id": f"c{n}", "to_user": "bob", "content": f"m{n}"}
            sent = await http.post("/v1/messages", json=body)
            assert sent.status_code == 200, sent.text


async def prune(database_url: str, now: int) -> None:
    """One retention pass over the (stopped) server's database, at ``now``, keeping one day."""
    store = SqlStore.from_url(database_url)
    try:
        pruner = RetentionPruner(store, RetentionSettings(days=1, offline_days=1, batch_size=3))
        entries, _ = await pruner.run_once(now=now)
        assert entries > 0
        # What the server will answer: bob's seqs 1-10 are gone, 11-15 kept.
        with pytest.raises(CursorExpired) as gone:
            await store.read_stream("bob", 3, 10)
        assert (gone.value.oldest_seq, gone.value.latest_seq) == (11, 15)
    finally:
        await store.close()


class Bob:
    """bob's one device: the same SQLite file (outbox and cursor) every time it comes back."""

    def __init__(self, server: ServerProcess, token: str, tmp_path: Path) -> None:
        self.server, self.token, self.path = server, token, tmp_path / "bob.sqlite3"

    def client(self) -> ChatClient:
        return make_client(
            "bob", self.path, token=self.token, mqtt_port=self.server.mqtt_port, http_port=self.server.http_port
        )


async def offline_past_retention(server: ServerProcess, database_url: str, tmp_path: Path) -> tuple[Bob, str]:
    """bob reads m0-m2 and goes away; m3-m9 are deleted by retention while he is, m10-m14 kept."""
    alice_token, bob = await server.register("alice"), Bob(server, await server.register("bob"), tmp_path)
    await send(server, alice_token, READ_BEFORE)
    client = bob.client()
    async with started(client):
        assert [m.content for m in await messages(client.events(), 3)] == [f"m{n}" for n in READ_BEFORE]
    assert client.cursor == 3  # closing committed and acked the last one taken
    await send(server, alice_token, DELETED)
    await asyncio.sleep(0.2)  # entry times are milliseconds: keep the cut clear of both sides
    cut = now_ms()
    await asyncio.sleep(0.2)
    await send(server, alice_token, KEPT)
    await server.stop()
    await prune(database_url, now=cut + DAY_MS)
    await server.start()
    return bob, alice_token


def contents(items: list[Any]) -> list[str | None]:
    return [item.content for item in items if isinstance(item, NewMessage)]


async def test_a_device_offline_past_retention_is_told_gets_the_kept_events_once_and_stays_live(
    server_process: ServerProcess, database_url: str, tmp_path: Path
) -> None:
    bob, alice_token = await offline_past_retention(server_process, database_url, tmp_path)
    client = bob.client()
    async with started(client), event_log(client) as log:
        # The gap comes first, in its place in the stream, then exactly the kept events.
        gap = await asyncio.wait_for(log.queue.get(), 30)
        assert gap == HistoryGap("bob", previous_cursor=3, oldest_seq=11, latest_seq=15)
        kept = [await asyncio.wait_for(log.queue.get(), 30) for _ in KEPT]
        assert [(e.seq, e.content) for e in kept] == [(11 + i, f"m{n}") for i, n in enumerate(KEPT)]

        await send(server_process, alice_token, LIVE)  # and it is live again
        live = [await asyncio.wait_for(log.queue.get(), 30) for _ in LIVE]
        assert [(e.seq, e.content) for e in live] == [(16 + i, f"m{n}") for i, n in enumerate(LIVE)]
        await asyncio.sleep(1.5)  # past a few ack batches and a stream probe (3 s in tests)
        assert log.queue.empty(), log.queue.get_nowait()  # no duplicate, no second gap
        await until(lambda: client.cursor == 20)
    assert client._machine is not None and client._machine.cursor_expired == 1

    # Its acks moved the server's cursor past the gap: the next start is an ordinary catch-up.
    again = bob.client()
    async with started(again):
        await until(lambda: again.heard_from_server, timeout=30)
        assert await quiet(again.events(), 2) == []
        assert again._machine is not None and again._machine.cursor_expired == 0
        assert again.cursor == 20


async def test_a_gap_not_taken_yet_is_refused_at_every_connection_without_looping_or_repeating(
    server_process: ServerProcess, database_url: str, tmp_path: Path
) -> None:
    """Until the application takes the ``HistoryGap``, nothing acks past the gap, so every
    catch-up is refused again with the same ``oldest_seq``: one refusal per connection, one sync
    from past the gap each, and the application still sees the gap once."""
    bob, _ = await offline_past_retention(server_process, database_url, tmp_path)
    client = bob.client()
    async with started(client):
        machine = client._machine
        assert machine is not None
        await until(lambda: machine.cursor_expired == 1 and machine.sequencer.contiguous == 15, timeout=30)
        for connection in (2, 3):
            assert client.drop_connection()
            await until(lambda: client.connections == connection and client.connected, timeout=30)  # noqa: B023
            await until(lambda: machine.cursor_expired == connection, timeout=30)  # noqa: B023
        await asyncio.sleep(3)  # a loop would show here
        assert machine.cursor_expired == client.connections == 3
        items = await quiet(client.events(), 3)
    assert [type(i).__name__ for i in items] == ["HistoryGap", *["NewMessage"] * len(KEPT)]
    assert [i.seq for i in items] == list(range(10, 16))
    assert contents(items) == [f"m{n}" for n in KEPT]
