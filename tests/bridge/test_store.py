"""The SQL store under concurrent writers: seqs stay gapless and dedup holds.

Two ``SqlStore`` instances with their own engines and connection pools stand in for
two server processes sharing one database.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from sqlalchemy import Connection, text

from mqchat.bridge.storage import SqlStore
from mqchat.bridge.store import SendOutcome, SendRequest

USERS = ["ann", "ben", "cat", "dan"]


async def _stores(database_url: str, count: int) -> list[SqlStore]:
    stores = [SqlStore.from_url(database_url) for _ in range(count)]
    await stores[0].create_schema()
    for user in USERS:
        await stores[0].create_user(user, "not-a-real-hash")
    return stores


async def _writer(store: SqlStore, name: str, batches: int, rng: random.Random) -> list[SendOutcome]:
    outcomes: list[SendOutcome] = []
    for b in range(batches):
        batch = []
        for i in range(rng.randint(1, 8)):
            sender, recipient = rng.sample(USERS, 2)
            batch.append(SendRequest(sender, f"{name}-{b}-{i}", "x", "text", to_user=recipient))
        for result in await store.save_messages(batch):
            assert isinstance(result, SendOutcome)
            outcomes.append(result)
    return outcomes


async def test_concurrent_writers_keep_every_stream_gapless(database_url: str) -> None:
    stores = await _stores(database_url, 2)
    try:
        results = await asyncio.gather(*(_writer(stores[w % 2], f"w{w}", 25, random.Random(w)) for w in range(4)))
        messages = {o.message.id for outcomes in results for o in outcomes}
        for user in USERS:
            page = await stores[0].read_stream(user, 0, 500)
            seqs = [e.seq for e in page.events]
            assert seqs == list(range(1, len(seqs) + 1)) and page.latest_seq == len(seqs)
            assert not page.has_more
            ids = [e.server_msg_id for e in page.events]
            assert len(ids) == len(set(ids)) and set(ids) <= messages
        # every message is in exactly two streams: its sender's and its recipient's
        appearances: Counter[int] = Counter()
        for user in USERS:
            appearances.update(e.server_msg_id for e in (await stores[0].read_stream(user, 0, 500)).events)
        assert set(appearances.values()) == {2} and set(appearances) == messages
    finally:
        for store in stores:
            await store.close()


async def test_racing_duplicates_store_one_message(database_url: str) -> None:
    stores = await _stores(database_url, 2)
    try:
        request = SendRequest("ann", "same-id", "hello", "text", to_user="ben")
        results = await asyncio.gather(*(stores[i % 2].save_messages([request]) for i in range(10)))
        outcomes = [r[0] for r in results]
        assert all(isinstance(o, SendOutcome) for o in outcomes)
        created = [o for o in outcomes if isinstance(o, SendOutcome) and not o.duplicate]
        assert len(created) == 1
        assert {o.message.id for o in outcomes if isinstance(o, SendOutcome)} == {created[0].message.id}
        assert (await stores[0].latest_seq("ben")) == 1 and (await stores[0].latest_seq("ann")) == 1
    finally:
        for store in stores:
            await store.close()


async def test_cursor_only_moves_forward_and_stops_at_the_head(database_url: str) -> None:
    [store] = await _stores(database_url, 1)
    try:
        await store.save_messages([SendRequest("ann", f"m{i}", "x", "text", to_user="ben") for i in range(3)])
        assert (await store.advance_cursor("ben", "phone", 2))[0] == 2
        assert (await store.advance_cursor("ben", "phone", 1))[0] == 2
        assert (await store.advance_cursor("ben", "phone", 99))[0] == 3
        assert await store.get_cursor("ben", "laptop") == 0
    finally:
        await store.close()


async def test_a_batch_mixing_good_bad_and_repeated_sends(database_url: str) -> None:
    [store] = await _stores(database_url, 1)
    try:
        results = await store.save_messages(
            [
                SendRequest("ann", "a", "1", "text", to_user="ben"),
                SendRequest("ann", "b", "2", "text", to_user="nobody"),
                SendRequest("ann", "a", "1 again", "text", to_user="ben"),
                SendRequest("ann", "note", "to self", "text", to_user="ann"),
            ]
        )
        first, unknown, repeat, note = results
        assert isinstance(first, SendOutcome) and not first.duplicate and len(first.events) == 2
        assert not isinstance(unknown, SendOutcome) and unknown.code == "unknown_recipient"
        assert isinstance(repeat, SendOutcome) and repeat.duplicate and repeat.message == first.message
        assert isinstance(note, SendOutcome) and len(note.events) == 1 and note.message.sender_seq == 2
        assert [e.seq for e in (await store.read_stream("ann", 0, 10)).events] == [1, 2]
    finally:
        await store.close()


async def test_an_in_memory_sqlite_database_works_as_one() -> None:
    # One shared connection on one thread: a second connection would see another, empty database.
    store = SqlStore.from_url("sqlite+aiosqlite://")
    try:
        await store.create_schema()
        for user in USERS[:2]:
            await store.create_user(user, "not-a-real-hash")
        [sent] = await store.save_messages([SendRequest("ann", "m1", "hi", "text", to_user="ben")])
        assert isinstance(sent, SendOutcome) and not sent.duplicate
        assert [e.seq for e in (await store.read_from_cursor("ben", "phone", 10)).events] == [1]
        _, receipts = await store.advance_cursor("ben", "phone", 1)
        assert [user for user, _ in receipts] == ["ann"]
    finally:
        await store.close()


async def test_postgres_sessions_carry_the_idle_transaction_timeout_and_the_node(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        return  # PostgreSQL settings; SQLite has no sessions to name
    store = SqlStore.from_url(database_url, idle_in_transaction_timeout=2.5, node_id="n7")
    try:

        def session(conn: Connection) -> tuple[str, str]:
            timeout = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one()
            name = conn.execute(text("SHOW application_name")).scalar_one()
            return str(timeout), str(name)

        assert await store.db.run("show", session) == ("2500ms", "mqchat:n7")
    finally:
        await store.close()
