"""The send path straight on ``sqlite3`` (storage/sqlite_sends.py) against the SQLAlchemy one:
the same batches must give the same answers and leave the same rows."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqchat.bridge.metrics import Metrics
from mqchat.bridge.storage import SqlStore, database
from mqchat.bridge.storage.database import SqliteDatabase
from mqchat.bridge.storage.sends import HERE_MAX_SENDS
from mqchat.bridge.store import SendOutcome, SendRequest, StoredFile
from mqchat.core.errors import ChatError

USERS = ["ann", "ben", "cat", "dan"]


class _NoRaw(SqliteDatabase):
    raw_writes = False  # type: ignore[assignment]


async def _store(path: Path, *, raw: bool) -> SqlStore:
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{path}")
    if not raw:
        store.db.__class__ = _NoRaw
    await store.create_schema()
    for user in USERS:
        await store.create_user(user, "not-a-real-hash")
    return store


def _batches(group_id: str) -> list[list[SendRequest]]:
    one = SendRequest("ann", "a-1", "hello", "text", to_user="ben")
    return [
        [one],
        [one, SendRequest("ben", "b-1", "back", "text", to_user="ann"), one],  # a duplicate, twice in one batch
        [SendRequest("cat", "c-1", "to myself", "text", to_user="cat")],  # a note to self: one stream entry
        [SendRequest("ann", "g-1", "to the group", "text", group_id=group_id)],
        [SendRequest("dan", "g-2", "not a member", "text", group_id=group_id)],
        [SendRequest("ann", "x-1", "nobody", "text", to_user="nobody")],
        [SendRequest("ann", "x-2", "no group", "text", group_id="gnone")],
        [SendRequest("ben", "f-1", "", "text", to_user="ann", attachment_id="file-1")],
        [SendRequest("cat", "f-2", "", "text", to_user="ann", attachment_id="file-1")],  # someone else's file
    ]


def _answer(result: SendOutcome | ChatError) -> Any:
    if isinstance(result, ChatError):
        return (result.code, result.ref)
    m = result.message
    events = [(user, event.seq, event.type) for user, event in result.events]
    attachment = None if m.attachment is None else m.attachment.model_dump()
    return (m.id, m.sender, m.client_msg_id, m.to_user, m.group_id, m.content, m.msg_type, m.sender_seq,
            attachment, result.duplicate, events)  # fmt: skip


def _renamed(value: Any, group_id: str) -> Any:
    if isinstance(value, str):
        return value.replace(group_id, "GROUP")
    if isinstance(value, list | tuple):
        return type(value)(_renamed(item, group_id) for item in value)
    if isinstance(value, dict):
        return {key: _renamed(item, group_id) for key, item in value.items()}
    return value


def _rows(path: Path) -> dict[str, list[Any]]:
    with sqlite3.connect(path) as db:
        return {
            "messages": list(db.execute(
                "SELECT id, sender, client_msg_id, to_user, group_id, content, msg_type, sender_seq, recalled_at,"
                " attachment_id, attachment, typeof(created_at), length(created_at) FROM messages ORDER BY id"
            )),
            "stream_events": list(db.execute(
                "SELECT user_id, seq, kind, conversation_id, message_id, payload FROM stream_events"
                " ORDER BY user_id, seq"
            )),
            "heads": list(db.execute("SELECT user_id, last_seq FROM users ORDER BY user_id")),
        }  # fmt: skip


@pytest.mark.parametrize("raw", [True, False], ids=["sqlite3", "sqlalchemy"])
async def test_both_send_paths_answer_and_write_alike(tmp_path: Path, raw: bool) -> None:
    reference = await _run(tmp_path / "reference.db", raw=False)
    assert await _run(tmp_path / "under-test.db", raw=raw) == reference


async def _run(path: Path, *, raw: bool) -> tuple[list[Any], dict[str, list[Any]]]:
    store = await _store(path, raw=raw)
    try:
        assert isinstance(store.db, SqliteDatabase) and store.db.raw_writes is raw
        group, _ = await store.create_group("ann", "trip", ["ben", "cat"], 10)
        await store.add_file(
            StoredFile("file-1", "ben", "a.txt", 3, "text/plain", "00" * 32, datetime(2026, 1, 1, tzinfo=UTC))
        )
        answers = []
        for batch in _batches(group.group_id):
            answers += [_answer(result) for result in await store.save_messages(batch)]
        # Group ids are random: the same group under one name in both runs.
        return _renamed((answers, _rows(path)), group.group_id)
    finally:
        await store.close()


async def test_every_connection_gets_the_page_cache_and_checkpoint_size(tmp_path: Path) -> None:
    """The writer's own ``sqlite3`` connection and SQLAlchemy's pool are set up alike."""
    from mqchat.bridge.storage.database import SQLITE_CACHE_KIB, SQLITE_CHECKPOINT_PAGES

    store = await _store(tmp_path / "pragmas.db", raw=True)

    def read(execute: Any) -> tuple[int, int]:
        return (execute("PRAGMA cache_size").fetchone()[0], execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    raw = await store.db.run_raw("pragmas", lambda conn: read(conn.execute))  # type: ignore[attr-defined]
    pooled = await store.db.run("pragmas", lambda conn: read(conn.exec_driver_sql))
    assert raw == pooled == (-SQLITE_CACHE_KIB, SQLITE_CHECKPOINT_PAGES)
    await store.close()


# ------------------------------------------------- sends on the event loop's thread


def _send(n: int, group_id: str | None = None) -> list[SendRequest]:
    if group_id is not None:
        return [SendRequest("ann", f"g-{n}", "hi all", "text", group_id=group_id)]
    return [SendRequest("ann", f"m-{n}", "hello", "text", to_user="ben")]


def _stored(results: list[SendOutcome | ChatError]) -> int:
    (outcome,) = results
    assert isinstance(outcome, SendOutcome) and not outcome.duplicate, outcome
    return outcome.message.id


async def test_a_send_without_a_group_runs_on_the_loop_thread_a_group_s_on_the_writer(tmp_path: Path) -> None:
    store = await _store(tmp_path / "here.db", raw=True)
    db = store.db
    assert isinstance(db, SqliteDatabase)
    try:
        group, _ = await store.create_group("ann", "trip", ["ben", "cat"], 10)
        _stored(await store.save_messages(_send(1)))
        assert db.ran_here == 1
        _stored(await store.save_messages(_send(2, group.group_id)))
        assert db.ran_here == 1  # a row per member: not on the loop's thread
        big = [request for n in range(3, 3 + HERE_MAX_SENDS + 1) for request in _send(n)]
        assert all(isinstance(r, SendOutcome) for r in await store.save_messages(big))
        assert db.ran_here == 1  # a large batch: the writer thread
        # joined, the message, the group message, the large batch
        assert (await store.read_stream("ben", 0, 10)).latest_seq == 3 + HERE_MAX_SENDS + 1
    finally:
        await store.close()


async def test_a_lock_held_elsewhere_is_waited_for_on_the_writer_thread_not_on_the_loop(tmp_path: Path) -> None:
    """Another process (a backup, an admin command) holding the write lock must not stall the
    event loop: the send goes to the writer thread, which waits for the lock."""
    path = tmp_path / "locked.db"
    store = await _store(path, raw=True)
    db = store.db
    assert isinstance(db, SqliteDatabase)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        sending = asyncio.ensure_future(store.save_messages(_send(1)))
        started = time.monotonic()
        for _ in range(20):  # the loop keeps turning while the lock is held
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 2, "the event loop waited for the lock"
        assert not sending.done()
        other.execute("COMMIT")
        _stored(await asyncio.wait_for(sending, 10))
        assert db.ran_here == 0
        _stored(await store.save_messages(_send(2)))  # the lock is free again: on the loop's thread
        assert db.ran_here == 1
    finally:
        other.close()
        await store.close()


async def test_while_the_writer_thread_is_busy_a_send_queues_behind_it(tmp_path: Path) -> None:
    store = await _store(tmp_path / "busy.db", raw=True)
    db = store.db
    assert isinstance(db, SqliteDatabase)
    try:
        slow = asyncio.ensure_future(db.run("slow", lambda conn: time.sleep(0.3), write=True))
        await asyncio.sleep(0.05)
        _stored(await store.save_messages(_send(1)))
        assert db.ran_here == 0 and slow.done()  # it waited for the slow one, on the writer thread
    finally:
        await store.close()


async def _stalling(path: Path, monkeypatch: pytest.MonkeyPatch, stalls: int) -> tuple[SqlStore, SqliteDatabase]:
    """A store whose first ``stalls`` transactions on the loop's thread take 0.3 s longer (a
    slow fsync), where 30 ms counts as slow and a real commit here is far below."""
    store = await _store(path, raw=True)
    assert isinstance(store.db, SqliteDatabase)
    monkeypatch.setattr(database, "HERE_BUDGET_S", 0.03)
    commit = database._commit_after
    left = [stalls]

    def slow(raw: sqlite3.Connection, fn: Callable[[sqlite3.Connection], object]) -> object:
        if left[0] > 0:
            left[0] -= 1
            time.sleep(0.3)
        return commit(raw, fn)

    monkeypatch.setattr(database, "_commit_after", slow)
    return store, store.db


async def _send_all(store: SqlStore, numbers: range) -> None:
    for n in numbers:
        _stored(await store.save_messages(_send(n)))


async def test_after_two_slow_commits_here_the_next_sends_go_to_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk (fsync) would hold the loop on every send: two slow commits among the last
    few send the next ones to the writer thread for a while."""
    store, db = await _stalling(tmp_path / "slow.db", monkeypatch, stalls=2)
    metrics = Metrics("n1")
    metrics.watch_send_threads(db)
    try:
        await _send_all(store, range(1, 4))
        assert db.ran_here == 2  # the third went to the writer thread
        db._thread_until = 0.0  # the while is over
        await _send_all(store, range(4, 5))
        assert db.ran_here == 3
    finally:
        await store.close()
    samples = {
        (s.name, s.labels.get("thread")): s.value
        for f in text_string_to_metric_families(metrics.exposition().decode())
        for s in f.samples
    }
    assert samples["mqchat_send_transactions_total", "loop"] == 3
    assert samples["mqchat_send_transactions_total", "writer"] == 1
    assert samples["mqchat_send_transactions_moved_total", None] == 1


async def test_one_stall_alone_keeps_the_sends_on_the_loop_s_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single slow fsync (every 15-35 s on a VM's disk) has stalled the loop already; moving
    would only cost the next sends the hand-off."""
    store, db = await _stalling(tmp_path / "one-stall.db", monkeypatch, stalls=1)
    try:
        await _send_all(store, range(1, 6))
        assert db.ran_here == 5
    finally:
        await store.close()


async def test_after_the_while_on_the_writer_thread_quick_commits_keep_the_sends_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow commits that caused a move are forgotten with it: when the while is over, quick
    commits keep the sends on the loop's thread (they do not have to outweigh the slow ones)."""
    store, db = await _stalling(tmp_path / "recover.db", monkeypatch, stalls=2)
    try:
        await _send_all(store, range(1, 3))
        db._thread_until = 0.0  # the while is over
        await _send_all(store, range(3, 6))
        assert db.ran_here == 5, "quick commits after the while did not bring the sends back"
    finally:
        await store.close()


async def test_the_loop_s_connection_leaves_checkpoints_to_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying the WAL back (up to 40 MiB and an fsync) must not stall the event loop."""
    store = await _store(tmp_path / "checkpoint.db", raw=True)
    db = store.db
    assert isinstance(db, SqliteDatabase)
    monkeypatch.setattr(database, "HERE_CHECKPOINT_EVERY", 3)
    ran_on: list[str] = []
    checkpoint = SqliteDatabase._checkpoint

    def spy(self: SqliteDatabase) -> None:
        ran_on.append(threading.current_thread().name)
        checkpoint(self)

    monkeypatch.setattr(SqliteDatabase, "_checkpoint", spy)
    try:
        for n in range(7):
            _stored(await store.save_messages(_send(n)))
        assert db.ran_here == 7
        await asyncio.gather(*db._checkpoints)
        assert len(ran_on) == 2 and all(name.startswith("mqchat-sqlite-write") for name in ran_on), ran_on
        assert db._here is not None
        settings = [db._here.execute(f"PRAGMA {name}").fetchone()[0] for name in ("wal_autocheckpoint", "busy_timeout")]
        assert settings == [0, 0]
    finally:
        await store.close()


def test_a_commit_that_fails_is_rolled_back_and_frees_the_lock(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT, which leaves the transaction open: left so, the
    connection would keep the write lock."""
    path = tmp_path / "deferred.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA foreign_keys=ON")
    raw.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    raw.execute("CREATE TABLE child (id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    raw.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.IntegrityError):
        database._commit_after(raw, lambda conn: conn.execute("INSERT INTO child VALUES (1)"))
    assert not raw.in_transaction
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # the lock is free
    other.execute("ROLLBACK")
    assert raw.execute("SELECT count(*) FROM child").fetchone() == (0,)
    other.close()
    raw.close()
