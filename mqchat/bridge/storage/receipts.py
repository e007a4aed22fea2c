"""Cursors and receipts: device cursors, delivered and read watermarks, their stream events.

Receipts are watermarks (message ids) in ``conversation_marks`` that only grow. A device's
``ack`` moves its cursor; messages that thereby reach the user's first device become
delivered. ``mark_read`` raises the read (and delivered) watermark. Both lock the reader's
stream and the streams of the senders they notify with ``lock_covering``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, select, tuple_

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.dialect import Dialect
from mqchat.bridge.storage.streams import NEW_MESSAGE, latest, lock_covering, utc
from mqchat.bridge.store import Emitted, Receipt
from mqchat.bridge.tables import conversation_marks, device_cursors, messages, stream_events
from mqchat.core.errors import NotFound
from mqchat.core.ids import ConversationId
from mqchat.core.protocol import MessageDelivered, MessageRead, ReadMarker, format_time

_CURSOR = select(device_cursors.c.acked_seq).where(
    device_cursors.c.user_id == bindparam("uid"), device_cursors.c.device_id == bindparam("did")
)


def cursor(conn: Connection, user_id: str, device_id: str) -> int:
    return int(conn.execute(_CURSOR, {"uid": user_id, "did": device_id}).scalar_one_or_none() or 0)


def participants(conn: Connection, message_id: int) -> dict[str, str]:
    """Users whose stream holds the message, with the conversation id each sees."""
    query = select(stream_events.c.user_id, stream_events.c.conversation_id).where(
        stream_events.c.message_id == message_id, stream_events.c.kind == NEW_MESSAGE
    )
    return {row.user_id: row.conversation_id for row in conn.execute(query)}


def _sender_view(conversation_id: str, reader: str) -> str:
    """The reader's conversation as the sender sees it."""
    return str(ConversationId.parse(conversation_id).for_peer(reader))


def _newly_delivered(conn: Connection, user_id: str, upto: int) -> list[tuple[str, str, int]]:
    """(conversation, sender, highest message id) of messages from others in the user's
    stream after every device's cursor and up to ``upto``: those reach the user now."""
    reached_query = select(func.coalesce(func.max(device_cursors.c.acked_seq), 0)).where(
        device_cursors.c.user_id == user_id
    )
    reached = int(conn.execute(reached_query).scalar_one())
    if upto <= reached:
        return []
    query = (
        select(stream_events.c.conversation_id, messages.c.sender, func.max(messages.c.id))
        .select_from(stream_events.join(messages, messages.c.id == stream_events.c.message_id))
        .where(
            stream_events.c.user_id == user_id,
            stream_events.c.kind == NEW_MESSAGE,
            stream_events.c.seq > reached,
            stream_events.c.seq <= upto,
            messages.c.sender != user_id,
        )
        .group_by(stream_events.c.conversation_id, messages.c.sender)
    )
    return sorted((row[0], row[1], int(row[2])) for row in conn.execute(query))


def _read_upto(conn: Connection, user_id: str, conversation_id: str) -> int:
    query = select(conversation_marks.c.read_upto).where(
        conversation_marks.c.user_id == user_id, conversation_marks.c.conversation_id == conversation_id
    )
    return int(conn.execute(query).scalar_one_or_none() or 0)


def _newly_read(conn: Connection, user_id: str, conversation_id: str, upto: int) -> list[tuple[str, int]]:
    """(sender, highest message id) of messages from others in the conversation between the
    reader's read watermark and ``upto``."""
    after = _read_upto(conn, user_id, conversation_id)
    query = (
        select(messages.c.sender, func.max(messages.c.id))
        .select_from(stream_events.join(messages, messages.c.id == stream_events.c.message_id))
        .where(
            stream_events.c.user_id == user_id,
            stream_events.c.conversation_id == conversation_id,
            stream_events.c.kind == NEW_MESSAGE,
            messages.c.id > after,
            messages.c.id <= upto,
            messages.c.sender != user_id,
        )
        .group_by(messages.c.sender)
    )
    return sorted((row[0], int(row[1])) for row in conn.execute(query))


def _conversation_of(conn: Connection, user_id: str, message_id: int) -> str:
    """The conversation of a message in the user's stream, or ``NotFound`` if it never reached it."""
    query = select(stream_events.c.conversation_id).where(
        stream_events.c.user_id == user_id,
        stream_events.c.message_id == message_id,
        stream_events.c.kind == NEW_MESSAGE,
    )
    conversation_id = conn.execute(query).scalar_one_or_none()
    if conversation_id is None:
        raise NotFound(f"message {message_id} is not in your conversations")
    return str(conversation_id)


def _raise_mark(
    conn: Connection,
    dialect: Dialect,
    user_id: str,
    conversation_id: str,
    *,
    delivered: tuple[int, datetime] | None = None,
    read: tuple[int, datetime] | None = None,
) -> None:
    """Raise the user's delivered and/or read watermark of the conversation (never lower it)."""
    values: dict[str, Any] = {"user_id": user_id, "conversation_id": conversation_id}
    values |= {"delivered_upto": 0, "read_upto": 0}
    marks = {name: mark for name, mark in (("delivered", delivered), ("read", read)) if mark is not None}
    for name, (mark_upto, mark_at) in marks.items():
        values[f"{name}_upto"], values[f"{name}_at"] = mark_upto, mark_at
    stmt = dialect.insert(conversation_marks).values(**values)
    table = conversation_marks.c
    changes: dict[str, Any] = {}
    for name in marks:
        upto, at = f"{name}_upto", f"{name}_at"
        changes[upto] = dialect.greatest(table[upto], stmt.excluded[upto])
        # The time moves only with the watermark: reading an older message must not
        # make newer ones look delivered later than they were.
        changes[at] = case((stmt.excluded[upto] > table[upto], stmt.excluded[at]), else_=table[at])
    conn.execute(stmt.on_conflict_do_update(index_elements=["user_id", "conversation_id"], set_=changes))


class ReceiptsStore(StoreBase):
    async def get_cursor(self, user_id: str, device_id: str) -> int:
        return await self.db.run("get_cursor", lambda conn: cursor(conn, user_id, device_id))

    async def advance_cursor(self, user_id: str, device_id: str, seq: int) -> tuple[int, Emitted]:
        def txn(conn: Connection) -> tuple[int, Emitted]:
            upto = min(seq, latest(conn, user_id))  # nobody has seen past the head

            def read() -> tuple[list[tuple[str, str, int]], set[str]]:
                covered = _newly_delivered(conn, user_id, upto)
                return covered, {sender for _, sender, _ in covered}

            streams, covered = lock_covering(conn, self.sql, read, also=[user_id])
            values = {"user_id": user_id, "device_id": device_id, "acked_seq": upto, "updated_at": datetime.now(UTC)}
            keys = ["user_id", "device_id"]
            conn.execute(self.sql.upsert_growing(device_cursors, values, keys, ["acked_seq"], ["updated_at"]))
            now = datetime.now(UTC)
            for conversation_id, sender, message_id in covered:
                _raise_mark(conn, self.sql, user_id, conversation_id, delivered=(message_id, now))
                view = _sender_view(conversation_id, user_id)
                event = MessageDelivered(
                    seq=0,
                    message_id=message_id,
                    conversation_id=view,
                    delivered_to=user_id,
                    delivered_at=format_time(now),
                )
                streams.emit(sender, event, view)
            emitted = streams.flush()
            return cursor(conn, user_id, device_id), emitted

        return await self.db.run("advance_cursor", txn, write=True)

    async def mark_read(self, user_id: str, message_id: int) -> Emitted:
        def txn(conn: Connection) -> Emitted:
            conversation_id = _conversation_of(conn, user_id, message_id)

            def read() -> tuple[list[tuple[str, int]], set[str]]:
                # With several writers ids do not follow commit order: a sender may appear
                # between the two reads, which ``lock_covering`` turns into a retry.
                covered = _newly_read(conn, user_id, conversation_id, message_id)
                return covered, {sender for sender, _ in covered}

            streams, covered = lock_covering(conn, self.sql, read, also=[user_id])
            if _read_upto(conn, user_id, conversation_id) >= message_id:
                return ()
            now = datetime.now(UTC)
            # Read implies delivered: a read message has certainly reached a device.
            _raise_mark(conn, self.sql, user_id, conversation_id, delivered=(message_id, now), read=(message_id, now))
            for sender, highest in covered:
                view = _sender_view(conversation_id, user_id)
                event = MessageRead(
                    seq=0, message_id=highest, conversation_id=view, read_by=user_id, read_at=format_time(now)
                )
                streams.emit(sender, event, view)
            marker = ReadMarker(seq=0, message_id=message_id, conversation_id=conversation_id, read_at=format_time(now))
            streams.emit(user_id, marker, conversation_id)
            return streams.flush()

        return await self.db.run("mark_read", txn, write=True)

    async def receipts(self, user_id: str, message_id: int) -> list[Receipt]:
        def txn(conn: Connection) -> tuple[dict[str, str], dict[str, Any]]:
            found = participants(conn, message_id)
            sender = conn.execute(select(messages.c.sender).where(messages.c.id == message_id)).scalar()
            if user_id not in found or sender is None:
                raise NotFound(f"message {message_id} is not in your conversations")
            others = {u: c for u, c in found.items() if u != sender}
            if not others:
                return others, {}
            keys = tuple_(conversation_marks.c.user_id, conversation_marks.c.conversation_id)
            query = select(conversation_marks).where(keys.in_(list(others.items())))
            return others, {row.user_id: row for row in conn.execute(query)}

        others, marks = await self.db.run("receipts", txn)
        receipts = []
        for other in sorted(others):
            mark = marks.get(other)
            delivered = utc(mark.delivered_at) if mark is not None and mark.delivered_upto >= message_id else None
            read = utc(mark.read_at) if mark is not None and mark.read_upto >= message_id else None
            receipts.append(Receipt(other, delivered, read))
        return receipts
