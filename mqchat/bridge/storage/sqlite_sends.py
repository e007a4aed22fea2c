"""The queries of a batch of sends on SQLite, straight on the standard library's ``sqlite3``.

Every send runs one write transaction. Measured one send at a time (docs/performance.md),
SQLAlchemy's statement machinery around it (connection checkout and reset, execution
contexts, cache keys, type processing) cost several times what SQLite took to answer: the
send path on SQLite therefore runs on the writer thread's own connection
(``SqliteDatabase.run_raw``) with these hand-written statements, which ``sqlite3`` prepares
once and keeps. They must read and write exactly what the SQLAlchemy path does (sends.py's
``GenericSendSql``); tests/bridge/test_store.py runs both and compares.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime
from operator import itemgetter
from typing import Any

from mqchat.bridge.storage.dialect import INSERT_EVENTS_SQL, UPDATE_HEAD_SQL, EventRow
from mqchat.bridge.storage.streams import Streams, row_to_message
from mqchat.bridge.store import StoredFile, StoredMessage

_MESSAGE_COLUMNS = (
    "id",
    "sender",
    "client_msg_id",
    "to_user",
    "group_id",
    "content",
    "msg_type",
    "sender_seq",
    "created_at",
    "recalled_at",
    "attachment_id",
    "attachment",
)
_SELECT_MESSAGE = ", ".join(f"m.{column}" for column in _MESSAGE_COLUMNS)
_EXISTING = (
    f"SELECT {_SELECT_MESSAGE} FROM json_each(?) AS k"
    " JOIN messages AS m ON m.sender = k.value ->> 0 AND m.client_msg_id = k.value ->> 1"
)
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({', '.join(_MESSAGE_COLUMNS)}) VALUES ({', '.join('?' * len(_MESSAGE_COLUMNS))})"
)
_MESSAGE_VALUES = itemgetter(*_MESSAGE_COLUMNS)
_INSERT_PUSH = (
    "INSERT INTO push_outbox (message_id, recipient, created_ms, next_attempt_ms, attempts, state)"
    " VALUES (?, ?, ?, ?, 0, 'pending')"
)
_FILE_COLUMNS = ("file_id", "owner", "name", "size", "content_type", "sha256", "width", "height", "created_at")


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def sqlite_time(moment: datetime) -> str:
    """A datetime as SQLAlchemy stores it in SQLite (naive UTC text with microseconds)."""
    return moment.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class _Row:
    """Column values read as a row (``row.name``)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


class RawSendSql:
    """``SendSql`` on a ``sqlite3`` connection inside ``BEGIN IMMEDIATE`` (the write lock is
    held, so no row lock is needed and message ids can be allocated up front)."""

    def __init__(self, raw: sqlite3.Connection) -> None:
        self._raw = raw

    def members(self, group_ids: set[str]) -> dict[str, frozenset[str]]:
        if not group_ids:
            return {}
        ordered = sorted(group_ids)
        marks = _placeholders(len(ordered))
        known = {
            row[0] for row in self._raw.execute(f"SELECT group_id FROM groups WHERE group_id IN ({marks})", ordered)
        }
        found: dict[str, set[str]] = {gid: set() for gid in ordered}
        rows = self._raw.execute(
            f"SELECT group_id, user_id FROM group_members WHERE group_id IN ({marks}) AND active = 1", ordered
        )
        for group_id, user_id in rows:
            found[group_id].add(user_id)
        return {gid: frozenset(users) for gid, users in found.items() if gid in known}

    def lock(self, user_ids: Iterable[str]) -> Streams:
        wanted = sorted(set(user_ids))
        rows = (
            self._raw.execute(
                "SELECT user_id, last_seq, deleted_at_ms FROM users"
                f" WHERE user_id IN ({_placeholders(len(wanted))}) ORDER BY user_id",
                wanted,
            ).fetchall()
            if wanted
            else []
        )
        heads = {user_id: last_seq for user_id, last_seq, deleted in rows if deleted is None}
        gone = frozenset(user_id for user_id, _, deleted in rows if deleted is not None)
        return Streams(None, None, heads, gone, writer=self.write_stream)

    def existing(self, keys: list[tuple[str, str]]) -> list[StoredMessage]:
        rows = self._raw.execute(_EXISTING, (json.dumps(keys),))
        return [row_to_message(self._message_row(values)) for values in rows]

    def files(self, file_ids: set[str]) -> dict[str, StoredFile]:
        if not file_ids:
            return {}
        ordered = sorted(file_ids)
        rows = self._raw.execute(
            f"SELECT {', '.join(_FILE_COLUMNS)} FROM files WHERE file_id IN ({_placeholders(len(ordered))})", ordered
        )
        found = {}
        for values in rows:
            record = dict(zip(_FILE_COLUMNS, values, strict=True))
            record["created_at"] = _time(record["created_at"])
            found[record["file_id"]] = StoredFile(**record)
        return found

    def insert_messages(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        (last,) = self._raw.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        for offset, row in enumerate(rows, start=int(last) + 1):
            row["id"] = offset
        stored = [{**row, "created_at": sqlite_time(row["created_at"]), "recalled_at": None} for row in rows]
        self._raw.executemany(_INSERT_MESSAGE, [_MESSAGE_VALUES(row) for row in stored])
        return rows

    def write_stream(self, rows: list[EventRow], heads: list[tuple[int, str]]) -> None:
        if rows:
            self._raw.executemany(INSERT_EVENTS_SQL, rows)
        if heads:
            self._raw.executemany(UPDATE_HEAD_SQL, heads)

    def insert_pushes(self, rows: list[dict[str, Any]]) -> None:
        self._raw.executemany(
            _INSERT_PUSH, [(r["message_id"], r["recipient"], r["created_ms"], r["next_attempt_ms"]) for r in rows]
        )

    @staticmethod
    def _message_row(values: tuple[Any, ...]) -> _Row:
        record = dict(zip(_MESSAGE_COLUMNS, values, strict=True))
        record["created_at"] = _time(record["created_at"])
        record["recalled_at"] = _time(record["recalled_at"])
        return _Row(record)
