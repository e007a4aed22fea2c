"""The push outbox: claiming due events, recording what became of them, expiring old ones.

Events are written by ``save_messages`` in the message's own transaction (sends.py). A worker
claims due ones in a short write transaction: their attempt is counted and their due time
moved past the delivery's deadline (a lease), so a worker that dies mid-delivery leaves them
due again, never lost; on PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets several nodes claim side
by side without taking the same event.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, delete, func, select, update

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.streams import row_to_message
from mqchat.bridge.store import PushClaim
from mqchat.bridge.tables import messages, push_outbox, users

PENDING = "pending"
DEAD = "dead"


class PushStore(StoreBase):
    async def claim_push_events(self, now_ms: int, limit: int, lease_ms: int) -> list[PushClaim]:
        """Up to ``limit`` due events, oldest due first, each with its message (None when the
        message, or the recipient's account, is gone: the event is to be dropped)."""
        due = (
            select(push_outbox.c.id, push_outbox.c.message_id, push_outbox.c.recipient, push_outbox.c.attempts)
            .where(push_outbox.c.state == PENDING, push_outbox.c.next_attempt_ms <= now_ms)
            .order_by(push_outbox.c.next_attempt_ms, push_outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        def txn(conn: Connection) -> list[PushClaim]:
            rows = list(conn.execute(due))
            if not rows:
                return []
            ids = [row.id for row in rows]
            conn.execute(
                update(push_outbox)
                .where(push_outbox.c.id.in_(ids))
                .values(attempts=push_outbox.c.attempts + 1, next_attempt_ms=now_ms + lease_ms)
            )
            found = conn.execute(select(messages).where(messages.c.id.in_({row.message_id for row in rows})))
            by_id = {row.id: row_to_message(row) for row in found}
            live = conn.execute(
                select(users.c.user_id).where(
                    users.c.user_id.in_({row.recipient for row in rows}), users.c.deleted_at_ms.is_(None)
                )
            )
            recipients = {row[0] for row in live}
            return [
                PushClaim(
                    row.id,
                    row.recipient,
                    row.attempts + 1,
                    by_id.get(row.message_id) if row.recipient in recipients else None,
                    row.message_id,
                )
                for row in rows
            ]

        return await self.db.run("claim_push_events", txn, write=True)

    async def push_delivered(self, event_id: int) -> None:
        await self._write("push_delivered", delete(push_outbox).where(push_outbox.c.id == event_id))

    async def push_failed(self, event_id: int, error: str, retry_at_ms: int | None) -> None:
        """A failed attempt: due again at ``retry_at_ms``, or dead (None)."""
        values: dict[str, Any] = {"last_error": error[:200]}
        values |= {"state": DEAD} if retry_at_ms is None else {"next_attempt_ms": retry_at_ms}
        await self._write("push_failed", update(push_outbox).where(push_outbox.c.id == event_id).values(**values))

    async def expire_push_events(self, created_before_ms: int) -> int:
        """Delete the events (pending or dead) written before this time; how many went."""
        stmt = delete(push_outbox).where(push_outbox.c.created_ms < created_before_ms)
        return await self.db.run("expire_push_events", lambda conn: int(conn.execute(stmt).rowcount), write=True)

    async def requeue_dead_push_events(self, now_ms: int) -> int:
        """Make every dead event due again, with its attempts counted from zero."""
        stmt = (
            update(push_outbox)
            .where(push_outbox.c.state == DEAD)
            .values(state=PENDING, attempts=0, next_attempt_ms=now_ms, last_error=None)
        )
        return await self.db.run("requeue_dead", lambda conn: int(conn.execute(stmt).rowcount), write=True)

    async def push_depths(self) -> dict[str, int]:
        """Events by state: ``pending`` (waiting or being delivered) and ``dead``."""
        query = select(push_outbox.c.state, func.count()).group_by(push_outbox.c.state)

        def txn(conn: Connection) -> dict[str, int]:
            return {PENDING: 0, DEAD: 0} | {row[0]: int(row[1]) for row in conn.execute(query)}

        return await self.db.run("push_depths", txn)

    async def next_push_due(self) -> int | None:
        """When the next pending event is due (ms since the epoch), None if there is none."""
        query = select(func.min(push_outbox.c.next_attempt_ms)).where(push_outbox.c.state == PENDING)

        def txn(conn: Connection) -> int | None:
            found = conn.execute(query).scalar_one_or_none()
            return None if found is None else int(found)

        return await self.db.run("next_push_due", txn)

    async def _write(self, name: str, stmt: Any) -> None:
        await self.db.run(name, lambda conn: conn.execute(stmt), write=True)
