"""The pruner over the store: batches no larger than ``retention.batch_size``, sends going on
between them, and an entry kept exactly while a device still needs it (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, update

from mqchat.bridge.retention import RetentionPruner
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.store import SendOutcome, SendRequest
from mqchat.bridge.tables import messages, stream_events
from mqchat.config import RetentionSettings
from mqchat.core.errors import CursorExpired

DAY_MS = 86_400_000


class RecordingStore(SqlStore):
    """The real store, noting how many rows each delete transaction removed."""

    deletes: list[int]

    async def delete_stream_prefix(self, user_id: str, upto: int) -> int:
        count = await super().delete_stream_prefix(user_id, upto)
        self.deletes.append(count)
        return count


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RecordingStore]:
    store = RecordingStore.from_url(database_url)
    assert isinstance(store, RecordingStore)
    store.deletes = []
    await store.migrate()
    await store.create_users({"ann": "h", "ben": "h"})
    try:
        yield store
    finally:
        await store.close()


async def send(store: SqlStore, client_msg_id: str) -> SendOutcome:
    [outcome] = await store.save_messages([SendRequest("ann", client_msg_id, "x", "text", to_user="ben")])
    assert isinstance(outcome, SendOutcome)
    return outcome


async def age_everything(store: SqlStore, days: float) -> None:
    """Make every stream entry and message so far look ``days`` old."""
    then = time.time_ns() // 1_000_000 - int(days * DAY_MS)

    def txn(conn: Connection) -> None:
        conn.execute(update(stream_events).values(created_ms=then))
        conn.execute(update(messages).values(created_at=datetime.fromtimestamp(then / 1000, UTC)))

    await store.database.run("age", txn, write=True)


async def test_deletions_are_small_transactions_and_sends_go_on_between_them(store: RecordingStore) -> None:
    for n in range(25):
        await send(store, f"old-{n}")
    await age_everything(store, 2)
    pruner = RetentionPruner(store, RetentionSettings(days=1, batch_size=4))

    # Sends race the pass; each gets the next seq, none waits for the whole pass.
    async def keep_sending() -> list[int]:
        return [(await send(store, f"new-{n}")).message.sender_seq for n in range(10)]

    (entries, messages), seqs = await asyncio.gather(pruner.run_once(), keep_sending())
    assert seqs == list(range(26, 36))
    assert entries == 50 and messages == 25
    assert max(store.deletes) <= 4 and sum(store.deletes) == 50
    # Only the old prefix went: ben's stream now starts at 26, its head is 35.
    assert [e.seq for e in (await store.read_stream("ben", 25, 100)).events] == list(range(26, 36))
    with pytest.raises(CursorExpired) as expired:
        await store.read_stream("ben", 24, 100)
    assert (expired.value.oldest_seq, expired.value.latest_seq) == (26, 35)
    assert len(await store.history("ben", "user:ann", None, 100)) == 10


async def test_an_entry_waits_for_every_device_until_offline_days(store: RecordingStore) -> None:
    for n in range(4):
        await send(store, f"m{n}")
    await store.advance_cursor("ben", "phone", 3)
    await store.advance_cursor("ben", "tablet", 1)  # the laggard decides
    pruner = RetentionPruner(store, RetentionSettings(days=1, offline_days=3))
    now = time.time_ns() // 1_000_000

    await pruner.run_once(now=now + 2 * DAY_MS)
    assert [e.seq for e in (await store.read_stream("ben", 1, 100)).events] == [2, 3, 4]
    await store.advance_cursor("ben", "tablet", 3)
    await pruner.run_once(now=now + 2 * DAY_MS)
    assert [e.seq for e in (await store.read_stream("ben", 3, 100)).events] == [4]
    await pruner.run_once(now=now + 4 * DAY_MS)  # past offline_days: the last one goes too
    assert (await store.read_stream("ben", 4, 100)).events == []
    with pytest.raises(CursorExpired):
        await store.read_stream("ben", 3, 100)
