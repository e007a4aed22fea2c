"""Every difference between SQLite and PostgreSQL the store knows about, in one place.

- **upsert**: both have ``INSERT ... ON CONFLICT DO UPDATE``, through each dialect's own
  ``insert``; "keep the larger value" is ``GREATEST`` on PostgreSQL and the two-argument
  scalar ``MAX`` on SQLite.
- **ids of inserted messages**: ``RETURNING`` in parameter order on PostgreSQL; on
  SQLite, allocated up front under the write lock (``insert_messages``).
- **stream rows and heads**: straight to ``sqlite3``'s ``executemany`` on SQLite.
- **a list of key pairs as one parameter** (``existing_messages``): a JSON array on
  SQLite, two arrays on PostgreSQL.
- **row locks**: ``FOR UPDATE`` on PostgreSQL; SQLAlchemy leaves it out on SQLite, where
  a write transaction holds the database's write lock from ``BEGIN IMMEDIATE`` instead
  (database.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ARRAY, Connection, Select, Table, Text, and_, bindparam, cast, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from mqchat.bridge.tables import messages, stream_events, users

# A stream row as ``Streams`` collects it: a tuple in this column order, which is what
# sqlite3's ``executemany`` takes as it is (a dict per row, then a tuple made of it, was a
# tenth of the writer thread for a 1,000-member group).
EVENT_COLUMNS = ("user_id", "seq", "kind", "message_id", "conversation_id", "payload", "created_ms")
EventRow = tuple[str, int, str, int | None, str | None, str | None, int]
# qmark style: SQLite only.
INSERT_EVENTS_SQL = (
    f"INSERT INTO stream_events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
)
UPDATE_HEAD_SQL = "UPDATE users SET last_seq = ? WHERE user_id = ?"
_UPDATE_HEADS = update(users).where(users.c.user_id == bindparam("uid")).values(last_seq=bindparam("head"))


class Dialect:
    name: str

    def insert(self, table: Table) -> Any:
        """An INSERT that can take ``.on_conflict_do_update`` / ``.on_conflict_do_nothing``."""
        raise NotImplementedError

    def greatest(self, left: Any, right: Any) -> ColumnElement[Any]:
        raise NotImplementedError

    def upsert_growing(
        self, table: Table, values: dict[str, Any], keys: list[str], grow: Sequence[str], replace: Sequence[str] = ()
    ) -> Any:
        """INSERT ... ON CONFLICT: the ``grow`` columns only move up (the larger of the old
        and new value), the ``replace`` columns take the new value."""
        stmt = self.insert(table).values(**values)
        changes: dict[str, Any] = {col: self.greatest(table.c[col], stmt.excluded[col]) for col in grow}
        changes |= {col: stmt.excluded[col] for col in replace}
        return stmt.on_conflict_do_update(index_elements=keys, set_=changes)

    def insert_messages(self, conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert message rows; returns them with their ``id``, in the same order."""
        raise NotImplementedError

    def write_stream(self, conn: Connection, rows: list[EventRow], heads: list[tuple[int, str]]) -> None:
        """Insert stream rows and set the new heads (``(last_seq, user_id)`` pairs)."""
        if rows:
            conn.execute(insert(stream_events), [dict(zip(EVENT_COLUMNS, row, strict=True)) for row in rows])
        if heads:
            conn.execute(_UPDATE_HEADS, [{"uid": u, "head": h} for h, u in heads])

    def existing_messages(self, conn: Connection, keys: list[tuple[str, str]]) -> Any:
        """The stored messages among these ``(sender, client_msg_id)`` keys (rows)."""
        raise NotImplementedError


class _Sqlite(Dialect):
    name = "sqlite"

    def insert(self, table: Table) -> Any:
        return sqlite.insert(table)

    def greatest(self, left: Any, right: Any) -> ColumnElement[Any]:
        return func.max(left, right)

    def insert_messages(self, conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # SQLAlchemy can only return ids in parameter order on SQLite one INSERT per row
        # (500 statements for a full batch: most of the commit's time). The transaction
        # holds SQLite's write lock (BEGIN IMMEDIATE), so the ids SQLite would assign are
        # known: max(id) + 1 onwards. One executemany then inserts them all.
        last = conn.execute(_MAX_MESSAGE_ID).scalar_one()
        for offset, row in enumerate(rows, start=int(last) + 1):
            row["id"] = offset
        conn.execute(insert(messages), rows)
        return rows

    def write_stream(self, conn: Connection, rows: list[EventRow], heads: list[tuple[int, str]]) -> None:
        # Straight to the driver: SQLAlchemy's per-row parameter handling was a sixth of the
        # writer thread's time for a 500-member group, and these rows (text and integers)
        # need none.
        if rows:
            conn.exec_driver_sql(INSERT_EVENTS_SQL, rows)
        if heads:
            conn.exec_driver_sql(UPDATE_HEAD_SQL, heads)

    def existing_messages(self, conn: Connection, keys: list[tuple[str, str]]) -> Any:
        return conn.execute(_existing_query("sqlite"), {"keys": json.dumps(keys)})


class _Postgres(Dialect):
    name = "postgresql"

    def insert(self, table: Table) -> Any:
        return postgresql.insert(table)

    def greatest(self, left: Any, right: Any) -> ColumnElement[Any]:
        return func.greatest(left, right)

    def insert_messages(self, conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        statement = insert(messages).returning(messages.c.id, sort_by_parameter_order=True)
        for row, (new_id,) in zip(rows, conn.execute(statement, rows), strict=True):
            row["id"] = new_id
        return rows

    def existing_messages(self, conn: Connection, keys: list[tuple[str, str]]) -> Any:
        params = {"senders": [k[0] for k in keys], "ids": [k[1] for k in keys]}
        return conn.execute(_existing_query("postgresql"), params)


_MAX_MESSAGE_ID = select(func.coalesce(func.max(messages.c.id), 0))
_DIALECTS: dict[str, Dialect] = {"sqlite": _Sqlite(), "postgresql": _Postgres()}


def dialect_for(name: str) -> Dialect:
    return _DIALECTS[name]


@functools.cache
def _existing_query(dialect: str) -> Select[Any]:
    """The stored messages among a batch's ``(sender, client_msg_id)`` keys.

    One statement whatever the batch: the keys arrive as one parameter (a JSON array on
    SQLite, two arrays on PostgreSQL) and are joined to the unique index, which both
    engines search once per key. An OR of one term per sender cost more to build and
    compile than the query took to run, and a row-value ``IN (VALUES ...)`` made SQLite
    scan the whole table.
    """
    sender: ColumnElement[Any]
    client_msg_id: ColumnElement[Any]
    if dialect == "sqlite":
        keys = func.json_each(bindparam("keys")).table_valued("value").alias("k")
        sender, client_msg_id = keys.c.value.op("->>")(0), keys.c.value.op("->>")(1)
    else:
        senders = cast(bindparam("senders"), ARRAY(Text))
        ids = cast(bindparam("ids"), ARRAY(Text))
        keys = func.unnest(senders, ids).table_valued("sender", "client_msg_id").render_derived(name="k")
        sender, client_msg_id = keys.c.sender, keys.c.client_msg_id
    on = and_(messages.c.sender == sender, messages.c.client_msg_id == client_msg_id)
    return select(messages).select_from(keys).join(messages, on)
