"""Sends and stream reads: storing a batch of messages, reading a stream from a seq or a cursor.

``save_messages`` stores a whole batch in one write transaction (group commit). It locks
the heads of every sender, recipient and member of the batch's groups (``lock_covering``
re-reads the members under the locks), then deduplicates on ``(sender, client_msg_id)``:
the sender's row is locked before that check, so two nodes retrying one message at once
cannot both insert it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, func, insert, select

from mqchat.bridge.storage.attachments import files_for_send
from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.database import SqliteDatabase
from mqchat.bridge.storage.dialect import Dialect
from mqchat.bridge.storage.groups import members_of
from mqchat.bridge.storage.receipts import cursor
from mqchat.bridge.storage.sqlite_sends import RawSendSql
from mqchat.bridge.storage.streams import Streams, latest, lock_covering, render, row_to_message
from mqchat.bridge.store import OfflineHook, SendOutcome, SendRequest, StoredFile, StoredMessage, StreamPage
from mqchat.bridge.tables import messages, push_outbox, stream_events
from mqchat.core.errors import (
    ChatError,
    CursorExpired,
    InvalidCommand,
    NotAMember,
    UnknownFile,
    UnknownGroup,
    UnknownRecipient,
    UnknownUser,
)
from mqchat.core.protocol import MsgType

HERE_MAX_SENDS = 16
"""The largest batch of sends that may be stored on the event loop's own thread."""

_STREAM_PAGE = (
    select(stream_events.c.seq, stream_events.c.kind, stream_events.c.payload, messages)
    .select_from(stream_events.outerjoin(messages, messages.c.id == stream_events.c.message_id))
    .where(
        stream_events.c.user_id == bindparam("uid"),
        stream_events.c.seq > bindparam("since"),
        stream_events.c.seq <= bindparam("latest"),
    )
    .order_by(stream_events.c.seq)
    .limit(bindparam("limit"))
)


_OLDEST_SEQ = select(func.min(stream_events.c.seq)).where(stream_events.c.user_id == bindparam("uid"))


def page(conn: Connection, user_id: str, since_seq: int, limit: int) -> StreamPage:
    """Up to ``limit`` entries after ``since_seq``. The head is read first and nothing past
    it is served: every entry up to a head was committed with it, so a page has no holes.

    Retention deletes a stream's oldest entries (retention.py), never others: a page that
    does not start right after ``since_seq`` although the head is past it asks for deleted
    entries, and gets ``CursorExpired`` instead of a silent gap. (Checked on what was read,
    so it costs nothing, and holds even if the pruner ran between the two statements.)"""
    head = latest(conn, user_id)
    rows = list(conn.execute(_STREAM_PAGE, {"uid": user_id, "since": since_seq, "latest": head, "limit": limit + 1}))
    if head > since_seq and (not rows or rows[0].seq != since_seq + 1):
        raise expired(conn, user_id, since_seq, head)
    return StreamPage(events=[render(row) for row in rows[:limit]], latest_seq=head, has_more=len(rows) > limit)


def expired(conn: Connection, user_id: str, since_seq: int, head: int) -> CursorExpired:
    oldest = conn.execute(_OLDEST_SEQ, {"uid": user_id}).scalar_one_or_none()
    oldest = head + 1 if oldest is None else int(oldest)
    return CursorExpired(
        f"the events after seq {since_seq} up to {oldest - 1} were deleted (retention): "
        f"reset, then read from since_seq {oldest - 1}",
        oldest_seq=oldest,
        latest_seq=head,
    )


class SendSql(Protocol):
    """The statements of a batch of sends: on SQLAlchemy (``GenericSendSql``, every database),
    or straight on ``sqlite3`` for SQLite files (sqlite_sends.py, the hot path)."""

    def members(self, group_ids: set[str]) -> dict[str, frozenset[str]]: ...

    def lock(self, user_ids: set[str]) -> Streams: ...

    def existing(self, keys: list[tuple[str, str]]) -> list[StoredMessage]: ...

    def files(self, file_ids: set[str]) -> dict[str, StoredFile]: ...

    def insert_messages(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def insert_pushes(self, rows: list[dict[str, Any]]) -> None: ...


class GenericSendSql:
    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    def members(self, group_ids: set[str]) -> dict[str, frozenset[str]]:
        return members_of(self._conn, group_ids)

    def lock(self, user_ids: set[str]) -> Streams:
        return Streams.lock(self._conn, self._dialect, user_ids)

    def existing(self, keys: list[tuple[str, str]]) -> list[StoredMessage]:
        return [row_to_message(row) for row in self._dialect.existing_messages(self._conn, keys)]

    def files(self, file_ids: set[str]) -> dict[str, StoredFile]:
        return files_for_send(self._conn, file_ids)

    def insert_messages(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._dialect.insert_messages(self._conn, rows)

    def insert_pushes(self, rows: list[dict[str, Any]]) -> None:
        self._conn.execute(insert(push_outbox), [row | {"attempts": 0, "state": "pending"} for row in rows])


class SendsStore(StoreBase):
    async def save_messages(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        if not requests:
            return []
        if isinstance(self.db, SqliteDatabase) and self.db.raw_writes:
            # Everyday load is small batches: those may run on the loop's thread (run_raw). A
            # group's writes a row per member: the writer thread, never the loop's.
            here = len(requests) <= HERE_MAX_SENDS and all(r.group_id is None for r in requests)
            return await self.db.run_raw("save_messages", lambda raw: self._save(RawSendSql(raw), requests), here=here)
        return await self.db.run(
            "save_messages", lambda conn: self._save(GenericSendSql(conn, self.sql), requests), write=True
        )

    def _save(self, sql: SendSql, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        """One batch in one transaction: lock every stream it appends to (the members of its
        groups read again under the locks), find the duplicates, write the rest."""
        group_ids = {r.group_id for r in requests if r.group_id is not None}
        people = {r.sender for r in requests} | {r.to_user for r in requests if r.to_user is not None}

        def read() -> tuple[dict[str, frozenset[str]], set[str]]:
            members = sql.members(group_ids)
            return members, {u for group in members.values() for u in group}

        streams, members = lock_covering(None, None, read, also=people, lock=sql.lock)
        keys = sorted({(r.sender, r.client_msg_id) for r in requests})
        existing = {(m.sender, m.client_msg_id): m for m in sql.existing(keys)}
        attached = sql.files({r.attachment_id for r in requests if r.attachment_id is not None})
        return _BatchWriter(sql, streams, existing, members, self.push_hook, attached).write(requests)

    async def read_stream(self, user_id: str, since_seq: int, limit: int) -> StreamPage:
        return await self.db.run("read_stream", lambda conn: page(conn, user_id, since_seq, limit))

    async def read_from_cursor(self, user_id: str, device_id: str, limit: int) -> StreamPage:
        # One transaction for what every connecting device asks: two were a fifth of
        # the broker's CPU while 10,000 devices connected.
        def txn(conn: Connection) -> StreamPage:
            return page(conn, user_id, cursor(conn, user_id, device_id), limit)

        return await self.db.run("read_from_cursor", txn)

    async def latest_seq(self, user_id: str) -> int:
        return await self.db.run("latest_seq", lambda conn: latest(conn, user_id))


class _BatchWriter:
    """Allocates seqs and writes one batch of sends inside an open, locked transaction."""

    def __init__(
        self,
        sql: SendSql,
        streams: Streams,
        existing: dict[tuple[str, str], StoredMessage],
        members: dict[str, frozenset[str]],
        push_hook: OfflineHook | None = None,
        files: dict[str, StoredFile] | None = None,
    ) -> None:
        self._files = files or {}
        self._sql = sql
        self._streams = streams
        self._existing = existing
        self._members = members
        self._push_hook = push_hook

    def write(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        results: list[SendOutcome | ChatError | None] = [None] * len(requests)
        fresh: list[tuple[int, SendRequest, list[str]]] = []
        firsts: dict[tuple[str, str], int] = {}
        for index, request in enumerate(requests):
            key = (request.sender, request.client_msg_id)
            if key in self._existing:
                results[index] = SendOutcome(self._existing[key], True, ())
            elif key in firsts:
                continue  # a repeat within this batch: answered from the first copy below
            else:
                audience = self._audience(request)
                if isinstance(audience, ChatError):
                    results[index] = audience
                else:
                    firsts[key] = index
                    fresh.append((index, request, audience))
        for (index, _, _), outcome in zip(fresh, self._insert(fresh), strict=True):
            results[index] = outcome
        for index, request in enumerate(requests):
            if results[index] is None:
                original = results[firsts[(request.sender, request.client_msg_id)]]
                assert isinstance(original, SendOutcome)
                results[index] = SendOutcome(original.message, True, ())
        self._streams.flush()
        return [r for r in results if r is not None]

    def _audience(self, request: SendRequest) -> list[str] | ChatError:
        """Whose streams get the message, sender first; or why it cannot be sent."""
        ref = request.client_msg_id
        if request.sender not in self._streams.heads:
            return UnknownUser(f"no such user {request.sender!r}", ref=ref)
        if request.attachment_id is not None:
            found = self._files.get(request.attachment_id)
            if found is None or found.owner != request.sender:
                # Another user's file id, or none at all: the same answer, so ids cannot be probed.
                return UnknownFile(
                    f"attachment {request.attachment_id!r} is not a file you uploaded (POST /v1/files)", ref=ref
                )
        if request.group_id is not None:
            members = self._members.get(request.group_id)
            if members is None:
                return UnknownGroup(f"no such group {request.group_id!r}", ref=ref)
            if request.sender not in members:
                return NotAMember(f"you are not a member of {request.group_id!r}", ref=ref)
            # A deleted account is no longer an active member; ``gone`` only matters mid-deletion.
            return [request.sender, *sorted(members - {request.sender} - self._streams.gone)]
        if request.to_user is None:
            return InvalidCommand("give to_user or group_id", ref=ref)
        if request.to_user not in self._streams.heads:
            return UnknownRecipient(f"no such user {request.to_user!r}", ref=ref)
        # A note to self has one stream entry.
        return [request.sender] if request.to_user == request.sender else [request.sender, request.to_user]

    def _msg_type(self, request: SendRequest) -> MsgType:
        """A message with a file and the default ``text`` label is labelled by the file's type."""
        if request.attachment_id is None or request.msg_type != "text":
            return request.msg_type
        kind = self._files[request.attachment_id].content_type.partition("/")[0]
        return "image" if kind == "image" else "video" if kind == "video" else "file"

    def _attachment_json(self, request: SendRequest) -> str | None:
        if request.attachment_id is None:
            return None
        return self._files[request.attachment_id].public().model_dump_json(exclude_none=True)

    def _insert(self, fresh: list[tuple[int, SendRequest, list[str]]]) -> list[SendOutcome]:
        if not fresh:
            return []
        now = datetime.now(UTC)
        seqs = [[self._streams.next_seq(user) for user in audience] for _, _, audience in fresh]
        rows: list[dict[str, Any]] = [
            {
                "sender": r.sender,
                "client_msg_id": r.client_msg_id,
                "to_user": r.to_user,
                "group_id": r.group_id,
                "content": r.content,
                "msg_type": self._msg_type(r),
                "sender_seq": user_seqs[0],
                "created_at": now,
                "attachment_id": r.attachment_id,
                "attachment": self._attachment_json(r),
            }
            for (_, r, _), user_seqs in zip(fresh, seqs, strict=True)
        ]
        stored = [row_to_message(_Row(row)) for row in self._sql.insert_messages(rows)]
        outcomes = []
        for message, (_, _, audience), user_seqs in zip(stored, fresh, seqs, strict=True):
            events = self._streams.add_message_entries(message, audience, user_seqs)
            outcomes.append(SendOutcome(message, False, events))
        if self._push_hook is not None:
            self._queue_pushes(self._push_hook, stored, [audience for _, _, audience in fresh])
        return outcomes

    def _queue_pushes(self, hook: OfflineHook, stored: list[StoredMessage], audiences: list[list[str]]) -> None:
        """A push event per recipient that the hook calls offline, in this transaction: it
        commits with the message or not at all (the sender, first in the audience, gets none)."""
        now = time.time_ns() // 1_000_000
        rows = [
            {"message_id": message.id, "recipient": user, "created_ms": now, "next_attempt_ms": now}
            for message, audience in zip(stored, audiences, strict=True)
            for user in audience[1:]
            if hook.offline(user)
        ]
        if rows:
            self._sql.insert_pushes(rows)
            hook.queued()


class _Row:
    """A dict of column values read as a row (``row.name``), for ``row_to_message``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
        self.__dict__.setdefault("recalled_at", None)
