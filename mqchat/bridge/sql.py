"""``MessageStore`` on SQLAlchemy: SQLite (aiosqlite) or PostgreSQL (asyncpg), picked by URL.

Sequence allocation: every user row carries ``last_seq``. A write transaction locks
the rows of every user it touches (``SELECT ... FOR UPDATE`` in user-id order, so two
writers can never deadlock; SQLite gets the same effect from ``BEGIN IMMEDIATE``),
then hands out ``last_seq + 1, + 2 ...`` and writes the new heads back. A second
writer for the same user waits for the first to commit, so seqs follow commit order
and a rolled-back transaction leaves no gap. Because the sender's row is locked
before the duplicate check, two nodes retrying the same ``client_msg_id`` at once
cannot both insert it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, event, func, insert, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from mqchat.bridge.store import (
    ConversationSummary,
    SendOutcome,
    SendRequest,
    StoredMessage,
    StreamPage,
)
from mqchat.bridge.tables import METADATA, device_cursors, messages, stream_events, users
from mqchat.core.errors import ChatError, StorageUnavailable, UnknownRecipient, UserExists
from mqchat.core.protocol import NewMessage, StreamEvent, format_time

log = logging.getLogger(__name__)

NEW_MESSAGE = "new_message"


def _utc(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive; everything we store is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _row_to_message(row: Any) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        sender=row.sender,
        client_msg_id=row.client_msg_id,
        to_user=row.to_user,
        content=row.content,
        msg_type=row.msg_type,
        sender_seq=row.sender_seq,
        created_at=_utc(row.created_at),
    )


def render_new_message(seq: int, message: StoredMessage) -> NewMessage:
    return NewMessage(
        seq=seq,
        server_msg_id=message.id,
        client_msg_id=message.client_msg_id,
        from_user=message.sender,
        to_user=message.to_user,
        content=message.content,
        msg_type=message.msg_type,
        created_at=format_time(message.created_at),
    )


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
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

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction reads, then writes: it must take the write lock up front,
        # or a concurrent commit makes it fail with SQLITE_BUSY_SNAPSHOT.
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class SqlStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        return cls(create_engine(url))

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
        except ChatError:
            raise
        except (SQLAlchemyError, OSError) as exc:
            if not isinstance(exc, IntegrityError):  # a constraint is an answer, not an outage
                log.warning("storage failure: %s: %s", exc.__class__.__name__, exc)
            raise StorageUnavailable("the database is unavailable; nothing was stored") from exc

    async def create_schema(self) -> None:
        async with self._tx(write=True) as conn:
            await conn.run_sync(METADATA.create_all)

    async def close(self) -> None:
        await self._engine.dispose()

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(text("SELECT 1"))

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

    # ---------------------------------------------------------- messages

    async def save_messages(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        if not requests:
            return []
        async with self._tx(write=True) as conn:
            heads = await self._lock_heads(conn, {u for r in requests for u in (r.sender, r.to_user)})
            existing = await self._find_existing(conn, requests)
            return await _BatchWriter(conn, heads, existing).write(requests)

    async def _lock_heads(self, conn: AsyncConnection, user_ids: set[str]) -> dict[str, int]:
        query = (
            select(users.c.user_id, users.c.last_seq)
            .where(users.c.user_id.in_(sorted(user_ids)))
            .order_by(users.c.user_id)
            .with_for_update()
        )
        return {row.user_id: row.last_seq for row in await conn.execute(query)}

    async def _find_existing(
        self, conn: AsyncConnection, requests: Sequence[SendRequest]
    ) -> dict[tuple[str, str], StoredMessage]:
        keys = sorted({(r.sender, r.client_msg_id) for r in requests})
        found: dict[tuple[str, str], StoredMessage] = {}
        # Chunked so that a large batch stays under the drivers' bound-parameter limits.
        for start in range(0, len(keys), 400):
            chunk = keys[start : start + 400]
            query = select(messages).where(tuple_(messages.c.sender, messages.c.client_msg_id).in_(chunk))
            for row in await conn.execute(query):
                found[(row.sender, row.client_msg_id)] = _row_to_message(row)
        return found

    # ------------------------------------------------------------- reads

    async def read_stream(self, user_id: str, since_seq: int, limit: int) -> StreamPage:
        async with self._tx() as conn:
            latest = await self._latest(conn, user_id)
            query = (
                select(stream_events.c.seq, stream_events.c.kind, messages)
                .join(messages, messages.c.id == stream_events.c.message_id)
                .where(
                    stream_events.c.user_id == user_id,
                    stream_events.c.seq > since_seq,
                    stream_events.c.seq <= latest,
                )
                .order_by(stream_events.c.seq)
                .limit(limit + 1)
            )
            rows = list(await conn.execute(query))
        events: list[StreamEvent] = [render_new_message(row.seq, _row_to_message(row)) for row in rows[:limit]]
        return StreamPage(events=events, latest_seq=latest, has_more=len(rows) > limit)

    async def latest_seq(self, user_id: str) -> int:
        async with self._tx() as conn:
            return await self._latest(conn, user_id)

    async def _latest(self, conn: AsyncConnection, user_id: str) -> int:
        result = await conn.execute(select(users.c.last_seq).where(users.c.user_id == user_id))
        return int(result.scalar_one_or_none() or 0)

    async def advance_cursor(self, user_id: str, device_id: str, seq: int) -> int:
        async with self._tx(write=True) as conn:
            # A device cannot have seen past the head of its stream.
            seq = min(seq, await self._latest(conn, user_id))
            values = {"user_id": user_id, "device_id": device_id, "acked_seq": seq, "updated_at": datetime.now(UTC)}
            if self._dialect == "postgresql":
                pg = postgresql.insert(device_cursors).values(**values)
                stmt: Any = pg.on_conflict_do_update(
                    index_elements=["user_id", "device_id"],
                    set_={
                        "acked_seq": func.greatest(device_cursors.c.acked_seq, pg.excluded.acked_seq),
                        "updated_at": pg.excluded.updated_at,
                    },
                )
            else:
                lite = sqlite.insert(device_cursors).values(**values)
                stmt = lite.on_conflict_do_update(
                    index_elements=["user_id", "device_id"],
                    set_={
                        "acked_seq": func.max(device_cursors.c.acked_seq, lite.excluded.acked_seq),
                        "updated_at": lite.excluded.updated_at,
                    },
                )
            await conn.execute(stmt)
            return await self._cursor(conn, user_id, device_id)

    async def get_cursor(self, user_id: str, device_id: str) -> int:
        async with self._tx() as conn:
            return await self._cursor(conn, user_id, device_id)

    async def _cursor(self, conn: AsyncConnection, user_id: str, device_id: str) -> int:
        query = select(device_cursors.c.acked_seq).where(
            device_cursors.c.user_id == user_id, device_cursors.c.device_id == device_id
        )
        return int((await conn.execute(query)).scalar_one_or_none() or 0)

    async def conversations(self, user_id: str, limit: int) -> list[ConversationSummary]:
        async with self._tx() as conn:
            heads = await conn.execute(
                text(
                    "SELECT peer, MAX(id) AS last_id FROM ("
                    " SELECT to_user AS peer, id FROM messages WHERE sender = :me"
                    " UNION ALL SELECT sender AS peer, id FROM messages WHERE to_user = :me"
                    ") AS t GROUP BY peer ORDER BY last_id DESC LIMIT :limit"
                ),
                {"me": user_id, "limit": limit},
            )
            last_ids = {row.peer: row.last_id for row in heads}
            if not last_ids:
                return []
            rows = await conn.execute(select(messages).where(messages.c.id.in_(list(last_ids.values()))))
            by_id = {row.id: _row_to_message(row) for row in rows}
            unread = await self._unread_by_peer(conn, user_id)
        return [
            ConversationSummary(f"user:{peer}", peer, by_id[last_id], unread.get(peer, 0))
            for peer, last_id in last_ids.items()
        ]

    async def _unread_by_peer(self, conn: AsyncConnection, user_id: str) -> dict[str, int]:
        # Until read markers exist, "unread" means: not yet acked by any of the user's devices.
        seen = (
            select(func.coalesce(func.max(device_cursors.c.acked_seq), 0))
            .where(device_cursors.c.user_id == user_id)
            .scalar_subquery()
        )
        query = (
            select(messages.c.sender, func.count())
            .select_from(stream_events.join(messages, messages.c.id == stream_events.c.message_id))
            .where(stream_events.c.user_id == user_id, stream_events.c.seq > seen, messages.c.sender != user_id)
            .group_by(messages.c.sender)
        )
        return {row[0]: int(row[1]) for row in await conn.execute(query)}

    async def history(self, user_id: str, peer: str, before_id: int | None, limit: int) -> list[StoredMessage]:
        between = or_(
            and_(messages.c.sender == user_id, messages.c.to_user == peer),
            and_(messages.c.sender == peer, messages.c.to_user == user_id),
        )
        query = select(messages).where(between)
        if before_id is not None:
            query = query.where(messages.c.id < before_id)
        query = query.order_by(messages.c.id.desc()).limit(limit)
        async with self._tx() as conn:
            return [_row_to_message(row) for row in await conn.execute(query)]


class _BatchWriter:
    """Allocates seqs and writes one batch of sends inside an open, locked transaction."""

    def __init__(
        self, conn: AsyncConnection, heads: dict[str, int], existing: dict[tuple[str, str], StoredMessage]
    ) -> None:
        self._conn = conn
        self._heads = heads
        self._start = dict(heads)
        self._existing = existing

    async def write(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        results: list[SendOutcome | ChatError | None] = [None] * len(requests)
        fresh: list[tuple[int, SendRequest, dict[str, Any]]] = []
        batch_keys: dict[tuple[str, str], int] = {}
        now = datetime.now(UTC)
        for index, request in enumerate(requests):
            key = (request.sender, request.client_msg_id)
            if key in self._existing:
                results[index] = SendOutcome(self._existing[key], True, ())
            elif key in batch_keys:
                continue  # a repeat within this batch: answered from the first copy below
            elif request.to_user not in self._heads or request.sender not in self._heads:
                results[index] = UnknownRecipient(f"no such user {request.to_user!r}", ref=request.client_msg_id)
            else:
                batch_keys[key] = index
                fresh.append((index, request, self._allocate(request, now)))
        stored = await self._insert(fresh)
        for (index, request, row), message in zip(fresh, stored, strict=True):
            results[index] = SendOutcome(message, False, self._events_for(request, row, message))
        for index, request in enumerate(requests):
            if results[index] is None:
                original = results[batch_keys[(request.sender, request.client_msg_id)]]
                assert isinstance(original, SendOutcome)
                results[index] = SendOutcome(original.message, True, ())
        await self._write_heads()
        return [r for r in results if r is not None]

    def _allocate(self, request: SendRequest, now: datetime) -> dict[str, Any]:
        self._heads[request.sender] += 1
        row: dict[str, Any] = {
            "sender": request.sender,
            "client_msg_id": request.client_msg_id,
            "to_user": request.to_user,
            "content": request.content,
            "msg_type": request.msg_type,
            "sender_seq": self._heads[request.sender],
            "created_at": now,
        }
        if request.to_user != request.sender:  # a note to self has one stream entry
            self._heads[request.to_user] += 1
            row["_recipient_seq"] = self._heads[request.to_user]
        return row

    async def _insert(self, fresh: list[tuple[int, SendRequest, dict[str, Any]]]) -> list[StoredMessage]:
        if not fresh:
            return []
        rows = [{k: v for k, v in row.items() if not k.startswith("_")} for _, _, row in fresh]
        result = await self._conn.execute(insert(messages).returning(messages, sort_by_parameter_order=True), rows)
        stored = [_row_to_message(row) for row in result]
        entries = []
        for (_, request, row), message in zip(fresh, stored, strict=True):
            entries.append(
                {"user_id": request.sender, "seq": row["sender_seq"], "kind": NEW_MESSAGE, "message_id": message.id}
            )
            if "_recipient_seq" in row:
                entries.append(
                    {
                        "user_id": request.to_user,
                        "seq": row["_recipient_seq"],
                        "kind": NEW_MESSAGE,
                        "message_id": message.id,
                    }
                )
        await self._conn.execute(insert(stream_events), entries)
        return stored

    @staticmethod
    def _events_for(
        request: SendRequest, row: dict[str, Any], message: StoredMessage
    ) -> tuple[tuple[str, StreamEvent], ...]:
        events: list[tuple[str, StreamEvent]] = [(request.sender, render_new_message(row["sender_seq"], message))]
        if "_recipient_seq" in row:
            events.append((request.to_user, render_new_message(row["_recipient_seq"], message)))
        return tuple(events)

    async def _write_heads(self) -> None:
        changed = [
            {"uid": user_id, "head": head} for user_id, head in self._heads.items() if head != self._start[user_id]
        ]
        if changed:
            stmt = update(users).where(users.c.user_id == bindparam("uid")).values(last_seq=bindparam("head"))
            await self._conn.execute(stmt, changed)
