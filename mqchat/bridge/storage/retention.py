"""Retention: finding and deleting the oldest entries of streams, then the messages no stream holds.

Only a prefix of a stream is ever deleted (the entries up to a seq), and never its head
(``users.last_seq``): seq allocation goes on from the head as before, and a read that asks
for deleted entries is told so (``CursorExpired``, sends.py ``page``) instead of getting a gap.
Every deletion is its own short write transaction of at most ``batch`` rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, and_, bindparam, delete, exists, func, or_, select

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.store import PruneTarget
from mqchat.bridge.tables import device_cursors, messages, stream_events, users

_NO_CURSOR = 2**62  # a user with no device cursor holds nothing back


def _targets_query(days_cut_ms: int, offline_cut_ms: int) -> Select[Any]:
    # The smallest cursor of the user's devices: entries up to it are acked by every device.
    acked_by_all = (
        select(func.min(device_cursors.c.acked_seq))
        .where(device_cursors.c.user_id == stream_events.c.user_id)
        .scalar_subquery()
    )
    acked = stream_events.c.seq <= func.coalesce(acked_by_all, _NO_CURSOR)
    deletable = and_(stream_events.c.created_ms < days_cut_ms, or_(stream_events.c.created_ms < offline_cut_ms, acked))
    return (
        select(stream_events.c.user_id, func.min(stream_events.c.seq), func.max(stream_events.c.seq))
        .where(stream_events.c.user_id.in_(bindparam("ids", expanding=True)), deletable)
        .group_by(stream_events.c.user_id)
    )


class RetentionStore(StoreBase):
    async def user_ids_after(self, after: str, limit: int) -> list[str]:
        """User ids in order, after ``after`` (``""``: from the first)."""
        query = select(users.c.user_id).where(users.c.user_id > after).order_by(users.c.user_id).limit(limit)
        return await self.db.run("user_ids_after", lambda conn: [row[0] for row in conn.execute(query)])

    async def prune_targets(self, user_ids: list[str], days_cut_ms: int, offline_cut_ms: int) -> list[PruneTarget]:
        """For each of these users, the prefix of their stream that retention deletes: up to the
        newest entry appended before ``days_cut_ms`` that every device of the user has acked, or
        that was appended before ``offline_cut_ms`` anyway. Entries are appended in seq order, so
        everything before that entry is at least as old."""
        if not user_ids:
            return []
        query = _targets_query(days_cut_ms, offline_cut_ms)

        def txn(conn: Connection) -> list[PruneTarget]:
            rows = conn.execute(query, {"ids": user_ids})
            return [PruneTarget(row[0], int(row[1]), int(row[2])) for row in rows]

        return await self.db.run("prune_targets", txn)

    async def delete_stream_prefix(self, user_id: str, upto: int) -> int:
        """Delete the user's stream entries with ``seq <= upto``; how many went."""
        stmt = delete(stream_events).where(stream_events.c.user_id == user_id, stream_events.c.seq <= upto)
        return await self.db.run("delete_stream_prefix", lambda conn: int(conn.execute(stmt).rowcount), write=True)

    async def delete_unheld_messages(self, after_id: int, limit: int, older_than: datetime) -> tuple[int, int | None]:
        """Among the ``limit`` messages after ``after_id``, delete those older than ``older_than``
        that no stream holds any more. Returns how many went, and the id to continue after
        (None once a message at least as new as ``older_than`` was reached: ids follow time)."""
        page = select(messages.c.id, messages.c.created_at).where(messages.c.id > after_id).order_by(messages.c.id)
        held = exists().where(stream_events.c.message_id == messages.c.id)

        def txn(conn: Connection) -> tuple[int, int | None]:
            rows = list(conn.execute(page.limit(limit)))
            old = [row.id for row in rows if _naive(row.created_at) < _naive(older_than)]
            deleted = 0
            if old:
                stmt = delete(messages).where(messages.c.id.in_(old), ~held)
                deleted = int(conn.execute(stmt).rowcount)
            done = len(rows) < limit or len(old) < len(rows)
            return deleted, None if done else int(rows[-1].id)

        return await self.db.run("delete_unheld_messages", txn, write=True)


def _naive(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive (everything stored is UTC); PostgreSQL in its zone.
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)
