"""Per-user streams: locking their heads, allocating seqs, writing and rendering entries.

Every user row carries ``last_seq``, the head of the user's stream. A transaction that
appends to streams locks the heads of every user it will append to, in one statement in
user-id order (``SELECT ... FOR UPDATE``; the write lock of ``BEGIN IMMEDIATE`` on
SQLite), hands out ``last_seq + 1, + 2 ...`` and writes the new heads back with the new
rows. A second writer for the same user waits for the first to commit, so seqs follow
commit order and a rolled-back transaction leaves no gap.

When the set of streams depends on data that can change until the locks are held (group
members, the senders a receipt covers), ``lock_covering`` reads it, locks it, reads it
again under the locks and raises ``SetChanged`` (the runner starts over) if a stream it
now needs is not locked: locks are still taken in one sorted pass, so no deadlock.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, select

from mqchat.bridge.storage.database import SetChanged
from mqchat.bridge.storage.dialect import Dialect, EventRow
from mqchat.bridge.store import Emitted, MessageEntries, StoredMessage
from mqchat.bridge.tables import users
from mqchat.core.protocol import STREAM_EVENTS, AnyStreamEvent, Attachment, NewMessage

NEW_MESSAGE = "new_message"
_V = TypeVar("_V")
StreamWriter = Callable[[list[EventRow], list[tuple[int, str]]], None]
"""Writes a transaction's new stream rows and heads (``(last_seq, user_id)`` pairs)."""

# Statements that run for every send or connecting device, built once: building one per
# call (and its cache key) cost more than SQLite took to answer it.
LOCK_HEADS = (
    select(users.c.user_id, users.c.last_seq, users.c.deleted_at_ms)
    .where(users.c.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(users.c.user_id)
    .with_for_update()
)
LAST_SEQ = select(users.c.last_seq).where(users.c.user_id == bindparam("uid"))


def utc(moment: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; everything we store is UTC.
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def row_to_message(row: Any) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        sender=row.sender,
        client_msg_id=row.client_msg_id,
        to_user=row.to_user,
        group_id=row.group_id,
        content=row.content,
        msg_type=row.msg_type,
        sender_seq=row.sender_seq,
        created_at=utc(row.created_at) or datetime.now(UTC),
        recalled_at=utc(row.recalled_at),
        attachment=Attachment.model_validate_json(row.attachment) if row.attachment else None,
    )


def render_new_message(seq: int, message: StoredMessage) -> NewMessage:
    return NewMessage(seq=seq, **message.public_fields())


def render(row: Any) -> AnyStreamEvent:
    """A stream entry as its event: ``new_message`` from the joined message row (so a recall
    shows as a tombstone), any other kind from its stored JSON payload."""
    if row.kind == NEW_MESSAGE:
        return render_new_message(row.seq, row_to_message(row))
    data = json.loads(row.payload)
    data.update(type=row.kind, seq=row.seq)
    event: AnyStreamEvent = STREAM_EVENTS[row.kind].model_validate(data)  # type: ignore[assignment]
    return event


def latest(conn: Connection, user_id: str) -> int:
    return int(conn.execute(LAST_SEQ, {"uid": user_id}).scalar_one_or_none() or 0)


class Streams:
    """Appends events to locked streams inside one transaction, then writes them out."""

    def __init__(
        self,
        conn: Connection | None,
        dialect: Dialect | None,
        heads: dict[str, int],
        gone: frozenset[str] = frozenset(),
        writer: StreamWriter | None = None,
    ) -> None:
        # ``writer`` writes the rows and heads out (default: the dialect's, on ``conn``); the
        # send path on SQLite's own driver passes its own (sqlite_sends.py).
        if writer is None:
            assert conn is not None and dialect is not None
            writer = functools.partial(dialect.write_stream, conn)
        self._write = writer
        self.heads = heads
        # Deleted accounts: locked like the others (their rows order writers the same way), but
        # nothing is appended to their streams and they count as no user at all.
        self.gone = gone
        self._start = dict(heads)
        self._rows: list[EventRow] = []
        # One time for the whole transaction: what retention reads to tell old entries.
        self._now_ms = time.time_ns() // 1_000_000
        self.emitted: list[tuple[str, AnyStreamEvent]] = []

    @classmethod
    def lock(cls, conn: Connection, dialect: Dialect, user_ids: Iterable[str]) -> Streams:
        """Lock the heads of these users' streams, in id order; users that do not exist, or
        were deleted (``gone``), are left out of ``heads``."""
        wanted = sorted(set(user_ids))
        rows = list(conn.execute(LOCK_HEADS, {"ids": wanted})) if wanted else []
        heads = {row.user_id: row.last_seq for row in rows if row.deleted_at_ms is None}
        gone = frozenset(row.user_id for row in rows if row.deleted_at_ms is not None)
        return cls(conn, dialect, heads, gone)

    def next_seq(self, user_id: str) -> int:
        self.heads[user_id] += 1
        return self.heads[user_id]

    def add_message_entries(self, message: StoredMessage, audience: list[str], seqs: list[int]) -> MessageEntries:
        """The message's entry in each of these streams (at these seqs); returns their events,
        which ``flush`` does not return again (the send path publishes each outcome's own).

        A group message lands in up to 1,000 streams: the event is rendered once (the events
        are made per stream only if read as pairs, ``MessageEntries``), and a group's
        conversation id is the same for every member. Per member this was most of the writer
        thread's time."""
        entries = MessageEntries(render_new_message(seqs[0], message), audience, seqs)
        shared = None if message.group_id is None else str(message.conversation_for(message.sender))
        now_ms = self._now_ms
        rows = self._rows
        for user_id, seq in zip(audience, seqs, strict=True):
            conversation = shared if shared is not None else str(message.conversation_for(user_id))
            rows.append((user_id, seq, NEW_MESSAGE, message.id, conversation, None, now_ms))
        return entries

    def emit(self, user_id: str, event: AnyStreamEvent, conversation_id: str | None = None) -> None:
        """Append a non-message event; ``event.seq`` is replaced by the allocated one. A deleted
        user's stream gets nothing (a receipt for a message they sent, say)."""
        if user_id in self.gone:
            return
        seq = self.next_seq(user_id)
        event = event.model_copy(update={"seq": seq})
        payload = event.model_dump_json(exclude={"seq", "type"})
        self._rows.append((user_id, seq, event.type, None, conversation_id, payload, self._now_ms))
        self.emitted.append((user_id, event))

    def flush(self) -> Emitted:
        """Write the rows and heads; returns the events of ``emit``."""
        changed = [(h, u) for u, h in self.heads.items() if h != self._start[u]]
        self._write(self._rows, changed)
        return tuple(self.emitted)


def lock_covering(
    conn: Connection | None,
    dialect: Dialect | None,
    read: Callable[[], tuple[_V, set[str]]],
    also: Iterable[str] = (),
    lock: Callable[[set[str]], Streams] | None = None,
) -> tuple[Streams, _V]:
    """The lock / re-read / retry protocol, written once.

    ``read`` returns what the transaction decides on and the users whose streams it will
    append to. It runs once to learn whom to lock, the heads of those users (and ``also``)
    are locked in one pass, and it runs again under the locks: its second answer is the
    one to act on. If that answer needs a stream that was not locked (a member joined, a
    sender appeared), ``SetChanged`` makes the runner start the transaction over. A set
    that only shrank needs no retry: every stream it names is locked.
    """
    _, wanted = read()
    if lock is None:
        assert conn is not None and dialect is not None
        streams = Streams.lock(conn, dialect, wanted | set(also))
    else:
        streams = lock(wanted | set(also))
    value, needed = read()
    if not needed <= streams.heads.keys() | streams.gone:
        raise SetChanged
    return streams, value
