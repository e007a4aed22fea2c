"""``MessageStore`` on SQLAlchemy: SQLite (aiosqlite) or PostgreSQL (asyncpg), picked by URL.

Sequence allocation: every user row carries ``last_seq``. A write transaction locks
the rows of every user whose stream it will append to (``SELECT ... FOR UPDATE`` in
user-id order, so two writers never deadlock; SQLite gets the same effect from
``BEGIN IMMEDIATE``), hands out ``last_seq + 1, + 2 ...`` and writes the new heads
back. A second writer for the same user waits for the first to commit, so seqs follow
commit order and a rolled-back transaction leaves no gap. Because the sender's row is
locked before the duplicate check, two nodes retrying one ``client_msg_id`` at once
cannot both insert it.

When the set of streams depends on data (group members, senders covered by a receipt)
it is read first, then locked, then read again under the lock; if it grew meanwhile
the transaction starts over (``_Retry``), so locks are still taken in one sorted pass.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    event,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement

from mqchat.bridge.sqlite_threads import SqliteThreads, sync_url
from mqchat.bridge.store import (
    ConversationSummary,
    Emitted,
    GroupInfo,
    Receipt,
    SendOutcome,
    SendRequest,
    StoredMessage,
    StreamPage,
)
from mqchat.bridge.tables import (
    METADATA,
    conversation_marks,
    device_cursors,
    device_revocations,
    group_members,
    groups,
    messages,
    stream_events,
    users,
)
from mqchat.core.errors import (
    ChatError,
    GroupFull,
    InvalidCommand,
    NotAllowed,
    NotAMember,
    NotFound,
    RecallWindowPassed,
    StorageUnavailable,
    UnknownGroup,
    UnknownRecipient,
    UnknownUser,
    UserExists,
)
from mqchat.core.protocol import (
    STREAM_EVENTS,
    AnyStreamEvent,
    GroupAction,
    GroupUpdated,
    MessageDelivered,
    MessageRead,
    MessageRecalled,
    NewMessage,
    ReadMarker,
    format_time,
)

log = logging.getLogger(__name__)

NEW_MESSAGE = "new_message"
_RETRIES = 5
_T = TypeVar("_T")


class _Retry(Exception):
    """The set of rows to lock changed between the read and the lock: start over."""


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; everything we store is UTC.
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _row_to_message(row: Any) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        sender=row.sender,
        client_msg_id=row.client_msg_id,
        to_user=row.to_user,
        group_id=row.group_id,
        content=row.content,
        msg_type=row.msg_type,
        sender_seq=row.sender_seq,
        created_at=_utc(row.created_at) or datetime.now(UTC),
        recalled_at=_utc(row.recalled_at),
    )


def render_new_message(seq: int, message: StoredMessage) -> NewMessage:
    recalled = message.recalled_at is not None
    return NewMessage(
        seq=seq,
        server_msg_id=message.id,
        client_msg_id=message.client_msg_id,
        from_user=message.sender,
        to_user=message.to_user,
        group_id=message.group_id,
        content=None if recalled else message.content,
        msg_type=message.msg_type,
        created_at=format_time(message.created_at),
        recalled_at=format_time(message.recalled_at) if message.recalled_at else None,
    )


def create_engine(url: str) -> AsyncEngine:
    # hide_parameters: a driver error's text would otherwise quote the bound values (message
    # content, password hashes) into the WARNING that _tx logs.
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        _configure_sqlite(engine.sync_engine)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer. synchronous=FULL: a committed
        # transaction survives power loss, not only a crash of the process, which is
        # what an acked message promises. foreign_keys: SQLite's default is off.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction reads, then writes: it must take the write lock up front,
        # or a concurrent commit makes it fail with SQLITE_BUSY_SNAPSHOT.
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# Statements that run for every connecting device, built once: building one per call
# (and its cache key) cost more than SQLite took to answer it.
_REVOKED_AT = select(device_revocations.c.revoked_at_ms).where(
    device_revocations.c.user_id == bindparam("uid"), device_revocations.c.device_id == bindparam("did")
)
_CURSOR = select(device_cursors.c.acked_seq).where(
    device_cursors.c.user_id == bindparam("uid"), device_cursors.c.device_id == bindparam("did")
)
_LAST_SEQ = select(users.c.last_seq).where(users.c.user_id == bindparam("uid"))
_LOCK_HEADS = (
    select(users.c.user_id, users.c.last_seq)
    .where(users.c.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(users.c.user_id)
    .with_for_update()
)
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


# qmark style: SQLite only.
_EVENT_ROW = itemgetter("user_id", "seq", "kind", "message_id", "conversation_id", "payload")
_INSERT_EVENTS = (
    "INSERT INTO stream_events (user_id, seq, kind, message_id, conversation_id, payload) VALUES (?, ?, ?, ?, ?, ?)"
)
_UPDATE_HEAD = "UPDATE users SET last_seq = ? WHERE user_id = ?"


class _Streams:
    """Appends events to locked streams inside one transaction, then writes them out."""

    def __init__(self, conn: AsyncConnection, heads: dict[str, int]) -> None:
        self._conn = conn
        self.heads = heads
        self._start = dict(heads)
        self._rows: list[dict[str, Any]] = []
        self.emitted: list[tuple[str, AnyStreamEvent]] = []
        self._rendered: tuple[StoredMessage, NewMessage] | None = None

    def next_seq(self, user_id: str) -> int:
        self.heads[user_id] += 1
        return self.heads[user_id]

    def add_message_entry(self, user_id: str, seq: int, message: StoredMessage) -> None:
        self._rows.append(
            {
                "user_id": user_id,
                "seq": seq,
                "kind": NEW_MESSAGE,
                "message_id": message.id,
                "conversation_id": message.conversation_for(user_id),
                "payload": None,
            }
        )
        # Rendered once per message, copied per stream: a group message lands in up to
        # 1,000 streams, and validating the same fields again for each was a sixth of the
        # writer thread's time.
        if self._rendered is None or self._rendered[0] is not message:
            self._rendered = (message, render_new_message(seq, message))
        self.emitted.append((user_id, self._rendered[1].model_copy(update={"seq": seq})))

    def emit(self, user_id: str, event: AnyStreamEvent, conversation_id: str | None = None) -> None:
        """Append a non-message event; ``event.seq`` is replaced by the allocated one."""
        seq = self.next_seq(user_id)
        event = event.model_copy(update={"seq": seq})
        payload = event.model_dump_json(exclude={"seq", "type"})
        self._rows.append(
            {
                "user_id": user_id,
                "seq": seq,
                "kind": event.type,
                "message_id": None,
                "conversation_id": conversation_id,
                "payload": payload,
            }
        )
        self.emitted.append((user_id, event))

    async def flush(self) -> Emitted:
        changed = [(h, u) for u, h in self.heads.items() if h != self._start[u]]
        if self._conn.dialect.name == "sqlite":
            # Straight to the driver: SQLAlchemy's per-row parameter handling was a sixth of
            # the writer thread's time for a 500-member group, and these rows (text and
            # integers) need none.
            if self._rows:
                await self._conn.exec_driver_sql(_INSERT_EVENTS, [_EVENT_ROW(row) for row in self._rows])
            if changed:
                await self._conn.exec_driver_sql(_UPDATE_HEAD, changed)
            return tuple(self.emitted)
        if self._rows:
            await self._conn.execute(insert(stream_events), self._rows)
        if changed:
            stmt = update(users).where(users.c.user_id == bindparam("uid")).values(last_seq=bindparam("head"))
            await self._conn.execute(stmt, [{"uid": u, "head": h} for h, u in changed])
        return tuple(self.emitted)


def _unavailable(exc: SQLAlchemyError | OSError) -> StorageUnavailable:
    """A driver failure, as the storage error callers get (logged unless a constraint refused)."""
    if not isinstance(exc, IntegrityError):  # a constraint is an answer, not an outage
        log.warning("storage failure: %s: %s", exc.__class__.__name__, exc)
    return StorageUnavailable("the database is unavailable; nothing was stored")


class SqlStore:
    def __init__(self, engine: AsyncEngine, threads: SqliteThreads | None = None) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # SQLite file databases: the frequent transactions run whole on threads (sqlite_threads.py).
        self._threads = threads

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        direct = sync_url(url)
        return cls(create_engine(url), None if direct is None else SqliteThreads(direct, _configure_sqlite))

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @asynccontextmanager
    async def _tx(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        """A transaction; driver failures become ``StorageUnavailable``."""
        try:
            async with self._engine.connect() as conn:
                if write:
                    conn = await conn.execution_options(write=True)
                async with conn.begin():
                    yield conn
        except (ChatError, _Retry):
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def _run(self, work: Callable[[AsyncConnection], Coroutine[Any, Any, _T]], *, write: bool = False) -> _T:
        """``work`` in one transaction: on an SQLite thread where there is one, else on the
        async engine. ``work`` may await nothing but its connection's ``execute``."""
        if self._threads is None:
            async with self._tx(write=write) as conn:
                return await work(conn)
        try:
            return await self._threads.run(work, write=write)
        except (ChatError, _Retry):
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def create_schema(self) -> None:
        async with self._tx(write=True) as conn:
            await conn.run_sync(METADATA.create_all)

    async def close(self) -> None:
        if self._threads is not None:
            self._threads.close()
        await self._engine.dispose()

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(text("SELECT 1"))

    async def _lock(self, conn: AsyncConnection, user_ids: Iterable[str]) -> dict[str, int]:
        """Lock the stream heads of these users, in id order; returns the heads that exist."""
        wanted = sorted(set(user_ids))
        if not wanted:
            return {}
        return {row.user_id: row.last_seq for row in await conn.execute(_LOCK_HEADS, {"ids": wanted})}

    # ------------------------------------------------------------- users

    async def create_user(self, user_id: str, password_hash: str) -> None:
        try:
            async with self._tx(write=True) as conn:
                await conn.execute(
                    insert(users).values(
                        user_id=user_id, password_hash=password_hash, last_seq=0, created_at=datetime.now(UTC)
                    )
                )
        except StorageUnavailable as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise UserExists(f"user {user_id!r} already exists") from exc
            raise

    async def get_password_hash(self, user_id: str) -> str | None:
        async with self._tx() as conn:
            result = await conn.execute(select(users.c.password_hash).where(users.c.user_id == user_id))
            return result.scalar_one_or_none()

    async def revoke_device(self, user_id: str, device_id: str, at_ms: int) -> None:
        values = {"user_id": user_id, "device_id": device_id, "revoked_at_ms": at_ms}
        async with self._tx(write=True) as conn:
            await conn.execute(
                self._upsert(device_revocations, values, ["user_id", "device_id"], {"revoked_at_ms": ""})
            )

    async def device_revoked_at(self, user_id: str, device_id: str) -> int | None:
        async def read(conn: AsyncConnection) -> Any:
            return (await conn.execute(_REVOKED_AT, {"uid": user_id, "did": device_id})).scalar_one_or_none()

        found = await self._run(read)
        return None if found is None else int(found)

    # ---------------------------------------------------------- messages

    async def save_messages(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        if not requests:
            return []
        for _ in range(_RETRIES):
            try:
                return await self._run(lambda conn: self._save(conn, requests), write=True)
            except _Retry:
                continue
        raise StorageUnavailable("group membership kept changing; nothing was stored")

    async def _save(self, conn: AsyncConnection, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        group_ids = {r.group_id for r in requests if r.group_id is not None}
        members = await self._members(conn, group_ids)
        wanted = {r.sender for r in requests} | {r.to_user for r in requests if r.to_user is not None}
        wanted |= {u for group in members.values() for u in group}
        heads = await self._lock(conn, wanted)
        if await self._members(conn, group_ids) != members:
            raise _Retry
        existing = await self._find_existing(conn, requests)
        return await _BatchWriter(conn, _Streams(conn, heads), existing, members).write(requests)

    async def _members(self, conn: AsyncConnection, group_ids: set[str]) -> dict[str, frozenset[str]]:
        if not group_ids:
            return {}
        found: dict[str, set[str]] = {gid: set() for gid in group_ids}
        exists = select(groups.c.group_id).where(groups.c.group_id.in_(sorted(group_ids)))
        known = {row.group_id for row in await conn.execute(exists)}
        query = select(group_members.c.group_id, group_members.c.user_id).where(
            group_members.c.group_id.in_(sorted(group_ids)), group_members.c.active.is_(True)
        )
        for row in await conn.execute(query):
            found[row.group_id].add(row.user_id)
        return {gid: frozenset(us) for gid, us in found.items() if gid in known}

    async def _find_existing(
        self, conn: AsyncConnection, requests: Sequence[SendRequest]
    ) -> dict[tuple[str, str], StoredMessage]:
        keys = sorted({(r.sender, r.client_msg_id) for r in requests})
        if conn.dialect.name == "sqlite":
            params: dict[str, Any] = {"keys": json.dumps(keys)}
        else:
            params = {"senders": [k[0] for k in keys], "ids": [k[1] for k in keys]}
        rows = await conn.execute(_existing_query(conn.dialect.name), params)
        return {(row.sender, row.client_msg_id): _row_to_message(row) for row in rows}

    # ------------------------------------------------------------- reads

    async def read_stream(self, user_id: str, since_seq: int, limit: int) -> StreamPage:
        return await self._run(lambda conn: self._page(conn, user_id, since_seq, limit))

    async def read_from_cursor(self, user_id: str, device_id: str, limit: int) -> StreamPage:
        # One transaction for what every connecting device asks: two were a fifth of
        # the broker's CPU while 10,000 devices connected.
        async def read(conn: AsyncConnection) -> StreamPage:
            return await self._page(conn, user_id, await self._cursor(conn, user_id, device_id), limit)

        return await self._run(read)

    async def _page(self, conn: AsyncConnection, user_id: str, since_seq: int, limit: int) -> StreamPage:
        latest = await self._latest(conn, user_id)
        params = {"uid": user_id, "since": since_seq, "latest": latest, "limit": limit + 1}
        rows = list(await conn.execute(_STREAM_PAGE, params))
        events = [_render(row) for row in rows[:limit]]
        return StreamPage(events=events, latest_seq=latest, has_more=len(rows) > limit)

    async def latest_seq(self, user_id: str) -> int:
        return await self._run(lambda conn: self._latest(conn, user_id))

    async def _latest(self, conn: AsyncConnection, user_id: str) -> int:
        result = await conn.execute(_LAST_SEQ, {"uid": user_id})
        return int(result.scalar_one_or_none() or 0)

    # ------------------------------------------------- cursors and receipts

    async def _retrying(self, work: Callable[[AsyncConnection], Coroutine[Any, Any, _T]]) -> _T:
        """Run a write transaction, starting over while the set of streams to lock keeps changing."""
        for _ in range(_RETRIES):
            try:
                return await self._run(work, write=True)
            except _Retry:
                continue
        raise StorageUnavailable("concurrent changes kept interfering; nothing was changed, try again")

    async def advance_cursor(self, user_id: str, device_id: str, seq: int) -> tuple[int, Emitted]:
        return await self._retrying(lambda conn: self._advance_cursor(conn, user_id, device_id, seq))

    async def _advance_cursor(
        self, conn: AsyncConnection, user_id: str, device_id: str, seq: int
    ) -> tuple[int, Emitted]:
        seq = min(seq, await self._latest(conn, user_id))  # nobody has seen past the head
        covered = await self._newly_delivered(conn, user_id, seq)
        streams = _Streams(conn, await self._lock(conn, {user_id} | {s for _, s, _ in covered}))
        covered = await self._newly_delivered(conn, user_id, seq)  # under the lock
        _require_locked(streams, {s for _, s, _ in covered})
        await self._upsert_cursor(conn, user_id, device_id, seq)
        now = datetime.now(UTC)
        for conversation_id, sender, message_id in covered:
            await self._raise_mark(conn, user_id, conversation_id, delivered=(message_id, now))
            sender_view = conversation_id if conversation_id.startswith("group:") else f"user:{user_id}"
            streams.emit(
                sender,
                MessageDelivered(
                    seq=0,
                    message_id=message_id,
                    conversation_id=sender_view,
                    delivered_to=user_id,
                    delivered_at=format_time(now),
                ),
                sender_view,
            )
        emitted = await streams.flush()
        return await self._cursor(conn, user_id, device_id), emitted

    async def _newly_delivered(self, conn: AsyncConnection, user_id: str, upto: int) -> list[tuple[str, str, int]]:
        """(conversation, sender, highest message id) of messages from others in the user's
        stream after every device's cursor and up to ``upto``: those reach the user now."""
        reached = await self._max_cursor(conn, user_id)
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
        return sorted((row[0], row[1], int(row[2])) for row in await conn.execute(query))

    async def _max_cursor(self, conn: AsyncConnection, user_id: str) -> int:
        query = select(func.coalesce(func.max(device_cursors.c.acked_seq), 0)).where(
            device_cursors.c.user_id == user_id
        )
        return int((await conn.execute(query)).scalar_one())

    def _upsert(
        self, table: Any, values: dict[str, Any], keys: list[str], greatest: dict[str, str], plain: Sequence[str] = ()
    ) -> Any:
        """INSERT ... ON CONFLICT: the named columns only move up (max of old and new)."""
        dialect = postgresql if self._dialect == "postgresql" else sqlite
        stmt = dialect.insert(table).values(**values)
        grow = func.greatest if self._dialect == "postgresql" else func.max
        changes: dict[str, Any] = {col: grow(table.c[col], stmt.excluded[col]) for col in greatest}
        changes |= {col: stmt.excluded[col] for col in plain}
        return stmt.on_conflict_do_update(index_elements=keys, set_=changes)

    async def _upsert_cursor(self, conn: AsyncConnection, user_id: str, device_id: str, seq: int) -> None:
        values = {"user_id": user_id, "device_id": device_id, "acked_seq": seq, "updated_at": datetime.now(UTC)}
        await conn.execute(
            self._upsert(device_cursors, values, ["user_id", "device_id"], {"acked_seq": ""}, ["updated_at"])
        )

    async def _raise_mark(
        self,
        conn: AsyncConnection,
        user_id: str,
        conversation_id: str,
        *,
        delivered: tuple[int, datetime] | None = None,
        read: tuple[int, datetime] | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "user_id": user_id,
            "conversation_id": conversation_id,
            "delivered_upto": 0,
            "read_upto": 0,
        }
        dialect = postgresql if self._dialect == "postgresql" else sqlite
        grow = func.greatest if self._dialect == "postgresql" else func.max
        changes: dict[str, Any] = {}
        for name, mark in (("delivered", delivered), ("read", read)):
            if mark is None:
                continue
            values[f"{name}_upto"], values[f"{name}_at"] = mark
        stmt = dialect.insert(conversation_marks).values(**values)
        table = conversation_marks.c
        for name, mark in (("delivered", delivered), ("read", read)):
            if mark is None:
                continue
            upto, at = f"{name}_upto", f"{name}_at"
            changes[upto] = grow(table[upto], stmt.excluded[upto])
            # The time moves only with the watermark: reading an older message must not
            # make newer ones look delivered later than they were.
            changes[at] = case((stmt.excluded[upto] > table[upto], stmt.excluded[at]), else_=table[at])
        await conn.execute(stmt.on_conflict_do_update(index_elements=["user_id", "conversation_id"], set_=changes))

    async def get_cursor(self, user_id: str, device_id: str) -> int:
        return await self._run(lambda conn: self._cursor(conn, user_id, device_id))

    async def _cursor(self, conn: AsyncConnection, user_id: str, device_id: str) -> int:
        found = (await conn.execute(_CURSOR, {"uid": user_id, "did": device_id})).scalar_one_or_none()
        return int(found or 0)

    async def mark_read(self, user_id: str, message_id: int) -> Emitted:
        return await self._retrying(lambda conn: self._mark_read(conn, user_id, message_id))

    async def _mark_read(self, conn: AsyncConnection, user_id: str, message_id: int) -> Emitted:
        conversation_id = await self._conversation_of(conn, user_id, message_id)
        covered = await self._newly_read(conn, user_id, conversation_id, message_id)
        streams = _Streams(conn, await self._lock(conn, {user_id} | {s for s, _ in covered}))
        covered = await self._newly_read(conn, user_id, conversation_id, message_id)
        # With several writers ids do not follow commit order: a sender may appear now.
        _require_locked(streams, {s for s, _ in covered})
        if await self._read_upto(conn, user_id, conversation_id) >= message_id:
            return ()
        now = datetime.now(UTC)
        # Read implies delivered: a read message has certainly reached a device.
        await self._raise_mark(conn, user_id, conversation_id, delivered=(message_id, now), read=(message_id, now))
        for sender, highest in covered:
            sender_view = conversation_id if conversation_id.startswith("group:") else f"user:{user_id}"
            streams.emit(
                sender,
                MessageRead(
                    seq=0,
                    message_id=highest,
                    conversation_id=sender_view,
                    read_by=user_id,
                    read_at=format_time(now),
                ),
                sender_view,
            )
        streams.emit(
            user_id,
            ReadMarker(seq=0, message_id=message_id, conversation_id=conversation_id, read_at=format_time(now)),
            conversation_id,
        )
        return await streams.flush()

    async def _conversation_of(self, conn: AsyncConnection, user_id: str, message_id: int) -> str:
        """The conversation of a message in the user's stream, or ``NotFound`` if it never reached it."""
        query = select(stream_events.c.conversation_id).where(
            stream_events.c.user_id == user_id,
            stream_events.c.message_id == message_id,
            stream_events.c.kind == NEW_MESSAGE,
        )
        conversation_id = (await conn.execute(query)).scalar_one_or_none()
        if conversation_id is None:
            raise NotFound(f"message {message_id} is not in your conversations")
        return str(conversation_id)

    async def _read_upto(self, conn: AsyncConnection, user_id: str, conversation_id: str) -> int:
        query = select(conversation_marks.c.read_upto).where(
            conversation_marks.c.user_id == user_id, conversation_marks.c.conversation_id == conversation_id
        )
        return int((await conn.execute(query)).scalar_one_or_none() or 0)

    async def _newly_read(
        self, conn: AsyncConnection, user_id: str, conversation_id: str, upto: int
    ) -> list[tuple[str, int]]:
        after = await self._read_upto(conn, user_id, conversation_id)
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
        return sorted((row[0], int(row[1])) for row in await conn.execute(query))

    async def recall(self, user_id: str, message_id: int, window_seconds: float) -> Emitted:
        async with self._tx(write=True) as conn:
            row = (await conn.execute(select(messages).where(messages.c.id == message_id))).one_or_none()
            participants = await self._participants(conn, message_id)
            if row is None or user_id not in participants:
                raise NotFound(f"message {message_id} is not in your conversations")
            message = _row_to_message(row)
            if message.sender != user_id:
                raise NotAllowed("only the sender can recall a message")
            if message.recalled_at is not None:
                return ()  # already a tombstone: recalling again changes nothing
            now = datetime.now(UTC)
            if (now - message.created_at).total_seconds() > window_seconds:
                raise RecallWindowPassed(f"messages can be recalled for {window_seconds:g} s after sending")
            streams = _Streams(conn, await self._lock(conn, participants))
            await conn.execute(update(messages).where(messages.c.id == message_id).values(recalled_at=now))
            for participant, conversation_id in sorted(participants.items()):
                streams.emit(
                    participant,
                    MessageRecalled(
                        seq=0,
                        message_id=message_id,
                        conversation_id=conversation_id,
                        recalled_by=user_id,
                        recalled_at=format_time(now),
                    ),
                    conversation_id,
                )
            return await streams.flush()

    async def _participants(self, conn: AsyncConnection, message_id: int) -> dict[str, str]:
        """Users whose stream holds the message, with the conversation id each sees."""
        query = select(stream_events.c.user_id, stream_events.c.conversation_id).where(
            stream_events.c.message_id == message_id, stream_events.c.kind == NEW_MESSAGE
        )
        return {row.user_id: row.conversation_id for row in await conn.execute(query)}

    async def receipts(self, user_id: str, message_id: int) -> list[Receipt]:
        async with self._tx() as conn:
            participants = await self._participants(conn, message_id)
            sender = (await conn.execute(select(messages.c.sender).where(messages.c.id == message_id))).scalar()
            if user_id not in participants or sender is None:
                raise NotFound(f"message {message_id} is not in your conversations")
            others = {u: c for u, c in participants.items() if u != sender}
            if not others:
                return []
            keys = [(u, c) for u, c in others.items()]
            query = select(conversation_marks).where(
                tuple_(conversation_marks.c.user_id, conversation_marks.c.conversation_id).in_(keys)
            )
            marks = {row.user_id: row for row in await conn.execute(query)}
        receipts = []
        for other in sorted(others):
            mark = marks.get(other)
            delivered = _utc(mark.delivered_at) if mark is not None and mark.delivered_upto >= message_id else None
            read = _utc(mark.read_at) if mark is not None and mark.read_upto >= message_id else None
            receipts.append(Receipt(other, delivered, read))
        return receipts

    # ------------------------------------------------------- conversations

    async def conversations(self, user_id: str, limit: int) -> list[ConversationSummary]:
        async with self._tx() as conn:
            heads = await conn.execute(
                select(stream_events.c.conversation_id, func.max(stream_events.c.message_id).label("last_id"))
                .where(stream_events.c.user_id == user_id, stream_events.c.kind == NEW_MESSAGE)
                .group_by(stream_events.c.conversation_id)
                .order_by(func.max(stream_events.c.message_id).desc())
                .limit(limit)
            )
            last_ids = {row.conversation_id: int(row.last_id) for row in heads}
            rows = await conn.execute(select(messages).where(messages.c.id.in_(list(last_ids.values()))))
            by_id = {row.id: _row_to_message(row) for row in rows}
            unread = await self._unread(conn, user_id)
            names = {g.group_id: g.name for g in await self._groups_of(conn, user_id)}
        summaries = [
            ConversationSummary(cid, by_id[last_id], unread.get(cid, 0), names.get(cid.removeprefix("group:")))
            for cid, last_id in last_ids.items()
        ]
        quiet = [
            ConversationSummary(f"group:{gid}", None, 0, name)
            for gid, name in names.items()
            if f"group:{gid}" not in last_ids
        ]
        return (summaries + sorted(quiet, key=lambda s: s.conversation_id))[:limit]

    async def _unread(self, conn: AsyncConnection, user_id: str) -> dict[str, int]:
        """Messages from others after the read marker, per conversation, recalled ones excluded."""
        marks = conversation_marks.alias("marks")
        query = (
            select(stream_events.c.conversation_id, func.count())
            .select_from(
                stream_events.join(messages, messages.c.id == stream_events.c.message_id).outerjoin(
                    marks,
                    and_(
                        marks.c.user_id == stream_events.c.user_id,
                        marks.c.conversation_id == stream_events.c.conversation_id,
                    ),
                )
            )
            .where(
                stream_events.c.user_id == user_id,
                stream_events.c.kind == NEW_MESSAGE,
                messages.c.sender != user_id,
                messages.c.recalled_at.is_(None),
                messages.c.id > func.coalesce(marks.c.read_upto, 0),
            )
            .group_by(stream_events.c.conversation_id)
        )
        return {row[0]: int(row[1]) for row in await conn.execute(query)}

    async def history(
        self, user_id: str, conversation_id: str, before_id: int | None, limit: int
    ) -> list[StoredMessage]:
        query = (
            select(messages)
            .select_from(stream_events.join(messages, messages.c.id == stream_events.c.message_id))
            .where(
                stream_events.c.user_id == user_id,
                stream_events.c.conversation_id == conversation_id,
                stream_events.c.kind == NEW_MESSAGE,
            )
        )
        if before_id is not None:
            query = query.where(messages.c.id < before_id)
        query = query.order_by(messages.c.id.desc()).limit(limit)
        async with self._tx() as conn:
            return [_row_to_message(row) for row in await conn.execute(query)]

    # -------------------------------------------------------------- groups

    async def create_group(
        self, owner: str, name: str, members: Sequence[str], limit: int
    ) -> tuple[GroupInfo, Emitted]:
        everyone = {owner, *members}
        if len(everyone) > limit:
            raise GroupFull(f"a group has at most {limit} members")
        group_id = f"g{secrets.token_hex(8)}"
        async with self._tx(write=True) as conn:
            streams = _Streams(conn, await self._lock(conn, everyone))
            missing = sorted(everyone - set(streams.heads))
            if missing:
                raise UnknownUser(f"no such user(s): {', '.join(missing)}")
            now = datetime.now(UTC)
            await conn.execute(insert(groups).values(group_id=group_id, name=name, owner=owner, created_at=now))
            await conn.execute(
                insert(group_members),
                [{"group_id": group_id, "user_id": u, "active": True, "joined_at": now} for u in sorted(everyone)],
            )
            for member in sorted(everyone):
                self._group_event(streams, member, group_id, "created", owner, owner)
            emitted = await streams.flush()
        return GroupInfo(group_id, name, owner, tuple(sorted(everyone)), now), emitted

    @staticmethod
    def _group_event(streams: _Streams, to: str, group_id: str, action: GroupAction, user_id: str, by: str) -> None:
        streams.emit(
            to, GroupUpdated(seq=0, group_id=group_id, action=action, user_id=user_id, by=by), f"group:{group_id}"
        )

    async def add_member(self, group_id: str, by: str, user_id: str, limit: int) -> Emitted:
        return await self._retrying(lambda conn: self._add_member(conn, group_id, by, user_id, limit))

    async def _add_member(self, conn: AsyncConnection, group_id: str, by: str, user_id: str, limit: int) -> Emitted:
        group, members = await self._group_for_change(conn, group_id)
        if _check_add(group, members, by, user_id, limit):
            return ()
        streams = await self._lock_members(conn, group_id, members | {user_id})
        group, members = await self._group_for_change(conn, group_id)  # decide on what is locked
        if _check_add(group, members, by, user_id, limit):
            return ()
        if user_id not in streams.heads:
            raise UnknownUser(f"no such user {user_id!r}")
        values = {"group_id": group_id, "user_id": user_id, "active": True, "joined_at": datetime.now(UTC)}
        dialect = postgresql if self._dialect == "postgresql" else sqlite
        stmt = dialect.insert(group_members).values(**values)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["group_id", "user_id"], set_={"active": True, "joined_at": stmt.excluded.joined_at}
            )
        )
        for member in sorted(members | {user_id}):
            self._group_event(streams, member, group_id, "member_added", user_id, by)
        return await streams.flush()

    async def remove_member(self, group_id: str, by: str, user_id: str) -> Emitted:
        return await self._retrying(lambda conn: self._remove_member(conn, group_id, by, user_id))

    async def _remove_member(self, conn: AsyncConnection, group_id: str, by: str, user_id: str) -> Emitted:
        group, members = await self._group_for_change(conn, group_id)
        _check_remove(group, members, by, user_id)
        streams = await self._lock_members(conn, group_id, members)
        group, members = await self._group_for_change(conn, group_id)  # decide on what is locked
        _check_remove(group, members, by, user_id)
        await conn.execute(
            update(group_members)
            .where(group_members.c.group_id == group_id, group_members.c.user_id == user_id)
            .values(active=False)
        )
        action: GroupAction = "member_left" if by == user_id else "member_removed"
        for member in sorted(members):
            self._group_event(streams, member, group_id, action, user_id, by)
        return await streams.flush()

    async def _group_for_change(self, conn: AsyncConnection, group_id: str) -> tuple[GroupInfo, frozenset[str]]:
        group = await self._group(conn, group_id)
        return group, frozenset(group.members)

    async def _lock_members(self, conn: AsyncConnection, group_id: str, wanted: frozenset[str]) -> _Streams:
        streams = _Streams(conn, await self._lock(conn, wanted))
        now_members = (await self._members(conn, {group_id})).get(group_id, frozenset())
        if not now_members <= wanted:
            raise _Retry
        return streams

    async def get_group(self, group_id: str) -> GroupInfo:
        async with self._tx() as conn:
            return await self._group(conn, group_id)

    async def _group(self, conn: AsyncConnection, group_id: str) -> GroupInfo:
        row = (await conn.execute(select(groups).where(groups.c.group_id == group_id))).one_or_none()
        if row is None:
            raise UnknownGroup(f"no such group {group_id!r}")
        members = (await self._members(conn, {group_id}))[group_id]
        return GroupInfo(
            row.group_id, row.name, row.owner, tuple(sorted(members)), _utc(row.created_at) or datetime.now(UTC)
        )

    async def groups_of(self, user_id: str) -> list[GroupInfo]:
        async with self._tx() as conn:
            return await self._groups_of(conn, user_id)

    async def _groups_of(self, conn: AsyncConnection, user_id: str) -> list[GroupInfo]:
        query = select(group_members.c.group_id).where(
            group_members.c.user_id == user_id, group_members.c.active.is_(True)
        )
        ids = sorted(row.group_id for row in await conn.execute(query))
        return [await self._group(conn, gid) for gid in ids]

    async def active_members(self, group_id: str) -> frozenset[str]:
        async with self._tx() as conn:
            return (await self._members(conn, {group_id})).get(group_id, frozenset())

    async def are_contacts(self, user_id: str, other: str) -> bool:
        if user_id == other:
            return True
        async with self._tx() as conn:
            direct = (
                select(stream_events.c.seq)
                .where(stream_events.c.user_id == user_id, stream_events.c.conversation_id == f"user:{other}")
                .limit(1)
            )
            if (await conn.execute(direct)).first() is not None:
                return True
            mine = select(group_members.c.group_id).where(
                group_members.c.user_id == user_id, group_members.c.active.is_(True)
            )
            shared = (
                select(group_members.c.group_id)
                .where(
                    group_members.c.user_id == other,
                    group_members.c.active.is_(True),
                    group_members.c.group_id.in_(mine),
                )
                .limit(1)
            )
            return (await conn.execute(shared)).first() is not None


def _require_locked(streams: _Streams, users: set[str]) -> None:
    if not users <= set(streams.heads):
        raise _Retry


def _check_add(group: GroupInfo, members: frozenset[str], by: str, user_id: str, limit: int) -> bool:
    """Whether ``by`` may add ``user_id``; True if it is a member already (nothing to do)."""
    if group.owner != by:
        raise NotAllowed("only the group's owner adds members")
    if user_id in members:
        return True
    if len(members) + 1 > limit:
        raise GroupFull(f"a group has at most {limit} members")
    return False


def _check_remove(group: GroupInfo, members: frozenset[str], by: str, user_id: str) -> None:
    if by != user_id and group.owner != by:
        raise NotAllowed("only the group's owner removes members; members may leave")
    if user_id == group.owner:
        raise NotAllowed("the owner cannot leave or be removed")
    if user_id not in members:
        raise NotAMember(f"{user_id!r} is not a member of {group.group_id!r}")


def _render(row: Any) -> AnyStreamEvent:
    if row.kind == NEW_MESSAGE:
        return render_new_message(row.seq, _row_to_message(row))
    data = json.loads(row.payload)
    data.update(type=row.kind, seq=row.seq)
    event: AnyStreamEvent = STREAM_EVENTS[row.kind].model_validate(data)  # type: ignore[assignment]
    return event


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


class _BatchWriter:
    """Allocates seqs and writes one batch of sends inside an open, locked transaction."""

    def __init__(
        self,
        conn: AsyncConnection,
        streams: _Streams,
        existing: dict[tuple[str, str], StoredMessage],
        members: dict[str, frozenset[str]],
    ) -> None:
        self._conn = conn
        self._streams = streams
        self._existing = existing
        self._members = members

    async def write(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
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
        for (index, _, _), outcome in zip(fresh, await self._insert(fresh), strict=True):
            results[index] = outcome
        for index, request in enumerate(requests):
            if results[index] is None:
                original = results[firsts[(request.sender, request.client_msg_id)]]
                assert isinstance(original, SendOutcome)
                results[index] = SendOutcome(original.message, True, ())
        await self._streams.flush()
        return [r for r in results if r is not None]

    def _audience(self, request: SendRequest) -> list[str] | ChatError:
        """Whose streams get the message, sender first; or why it cannot be sent."""
        ref = request.client_msg_id
        if request.sender not in self._streams.heads:
            return UnknownUser(f"no such user {request.sender!r}", ref=ref)
        if request.group_id is not None:
            members = self._members.get(request.group_id)
            if members is None:
                return UnknownGroup(f"no such group {request.group_id!r}", ref=ref)
            if request.sender not in members:
                return NotAMember(f"you are not a member of {request.group_id!r}", ref=ref)
            return [request.sender, *sorted(members - {request.sender})]
        if request.to_user is None:
            return InvalidCommand("give to_user or group_id", ref=ref)
        if request.to_user not in self._streams.heads:
            return UnknownRecipient(f"no such user {request.to_user!r}", ref=ref)
        # A note to self has one stream entry.
        return [request.sender] if request.to_user == request.sender else [request.sender, request.to_user]

    async def _insert(self, fresh: list[tuple[int, SendRequest, list[str]]]) -> list[SendOutcome]:
        if not fresh:
            return []
        now = datetime.now(UTC)
        seqs = [[self._streams.next_seq(user) for user in audience] for _, _, audience in fresh]
        rows = [
            {
                "sender": r.sender,
                "client_msg_id": r.client_msg_id,
                "to_user": r.to_user,
                "group_id": r.group_id,
                "content": r.content,
                "msg_type": r.msg_type,
                "sender_seq": user_seqs[0],
                "created_at": now,
            }
            for (_, r, _), user_seqs in zip(fresh, seqs, strict=True)
        ]
        outcomes = []
        for message, (_, _, audience), user_seqs in zip(await self._insert_rows(rows), fresh, seqs, strict=True):
            before = len(self._streams.emitted)
            for user, seq in zip(audience, user_seqs, strict=True):
                self._streams.add_message_entry(user, seq, message)
            outcomes.append(SendOutcome(message, False, tuple(self._streams.emitted[before:])))
        return outcomes

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> list[StoredMessage]:
        """Insert the message rows; the stored messages, with their ids, in the same order."""
        if self._conn.dialect.name != "sqlite":
            statement = insert(messages).returning(messages, sort_by_parameter_order=True)
            return [_row_to_message(row) for row in await self._conn.execute(statement, rows)]
        # On SQLite, SQLAlchemy can only return ids in parameter order one INSERT per row
        # (500 statements for a full batch: most of the commit's time). The transaction
        # holds SQLite's write lock (BEGIN IMMEDIATE), so the ids SQLite would assign are
        # known: max(id) + 1 onwards. One executemany then inserts them all.
        last = (await self._conn.execute(select(func.coalesce(func.max(messages.c.id), 0)))).scalar_one()
        for offset, row in enumerate(rows, start=int(last) + 1):
            row["id"] = offset
        await self._conn.execute(insert(messages), rows)
        return [StoredMessage(**row) for row in rows]
