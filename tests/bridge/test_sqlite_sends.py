"""The send path straight on ``sqlite3`` (storage/sqlite_sends.py) against the SQLAlchemy one:
the same batches must give the same answers and leave the same rows."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mqchat.bridge.storage import SqlStore
from mqchat.bridge.storage.database import SqliteDatabase
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
