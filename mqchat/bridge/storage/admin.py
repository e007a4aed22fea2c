"""Administration: listing accounts and groups, roles, disabling and deleting accounts.

Deleting an account (docs/operations.md, "Admin") happens in two steps. One transaction
marks the account deleted (no password, every token refused, the id kept so that nobody else
can take it), takes it out of its groups (a ``member_left`` for the other members; a group it
owned passes to the member who joined first), forgets its devices, marks and pending push
events, and turns every
message it sent into a tombstone whose content is gone. Then its own stream, and the messages
of its that no stream holds any more, are deleted in small batches. Running the deletion again
finishes an interrupted second step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, exists, func, select, update

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.groups import members_of
from mqchat.bridge.storage.streams import lock_covering, utc
from mqchat.bridge.store import Emitted, GroupSummary, UserRecord
from mqchat.bridge.tables import (
    conversation_marks,
    device_cursors,
    device_revocations,
    group_members,
    groups,
    messages,
    push_outbox,
    stream_events,
    users,
)
from mqchat.core.errors import UnknownGroup, UnknownUser
from mqchat.core.protocol import GroupUpdated

_USER_COLUMNS = (
    users.c.user_id,
    users.c.role,
    users.c.created_at,
    users.c.last_seq,
    users.c.disabled_at_ms,
    users.c.deleted_at_ms,
)


def _record(row: Any) -> UserRecord:
    return UserRecord(
        user_id=row.user_id,
        role=row.role,
        created_at=utc(row.created_at) or datetime.now(UTC),
        last_seq=int(row.last_seq),
        disabled_at_ms=row.disabled_at_ms,
        deleted_at_ms=row.deleted_at_ms,
    )


def _live_user(conn: Connection, user_id: str) -> None:
    query = select(users.c.user_id).where(users.c.user_id == user_id, users.c.deleted_at_ms.is_(None))
    if conn.execute(query).first() is None:
        raise UnknownUser(f"no such user {user_id!r}")


class AdminStore(StoreBase):
    async def list_users(self, after: str, limit: int, *, include_deleted: bool = False) -> list[UserRecord]:
        query = select(*_USER_COLUMNS).where(users.c.user_id > after).order_by(users.c.user_id).limit(limit)
        if not include_deleted:
            query = query.where(users.c.deleted_at_ms.is_(None))
        return await self.db.run("list_users", lambda conn: [_record(row) for row in conn.execute(query)])

    async def get_user(self, user_id: str) -> UserRecord:
        """The account, deleted ones included; ``UnknownUser`` if there never was one."""
        query = select(*_USER_COLUMNS).where(users.c.user_id == user_id)

        def txn(conn: Connection) -> UserRecord:
            row = conn.execute(query).one_or_none()
            if row is None:
                raise UnknownUser(f"no such user {user_id!r}")
            return _record(row)

        return await self.db.run("get_user", txn)

    async def set_role(self, user_id: str, role: str) -> None:
        def txn(conn: Connection) -> None:
            _live_user(conn, user_id)
            conn.execute(update(users).where(users.c.user_id == user_id).values(role=role))

        await self.db.run("set_role", txn, write=True)

    async def set_disabled(self, user_id: str, at_ms: int | None) -> bool:
        """Disable the account at ``at_ms`` (refusing every token issued until then), or enable
        it with None. Returns whether anything changed."""

        def txn(conn: Connection) -> bool:
            _live_user(conn, user_id)
            disabled = users.c.disabled_at_ms.is_not(None)
            stmt = update(users).where(users.c.user_id == user_id)
            if at_ms is None:
                return bool(conn.execute(stmt.where(disabled).values(disabled_at_ms=None)).rowcount)
            tokens = self.sql.greatest(users.c.tokens_valid_after_ms, at_ms)
            changed = conn.execute(stmt.where(~disabled).values(disabled_at_ms=at_ms, tokens_valid_after_ms=tokens))
            return bool(changed.rowcount)

        return await self.db.run("set_disabled", txn, write=True)

    async def users_disabled_since(self, since_ms: int) -> list[str]:
        """Accounts disabled (or deleted) at or after ``since_ms`` and still so."""
        query = select(users.c.user_id).where(users.c.disabled_at_ms >= since_ms).order_by(users.c.user_id)
        return await self.db.run("users_disabled_since", lambda conn: [row[0] for row in conn.execute(query)])

    async def mark_deleted(self, user_id: str, at_ms: int) -> tuple[Emitted, list[str]]:
        """The first step of deleting an account, in one transaction (module docstring).
        Returns the ``member_left`` events and the groups the account left. Idempotent: an
        account deleted already gives no events."""
        at = datetime.fromtimestamp(at_ms / 1000, UTC)

        def read(conn: Connection) -> tuple[dict[str, frozenset[str]], set[str]]:
            mine = select(group_members.c.group_id).where(
                group_members.c.user_id == user_id, group_members.c.active.is_(True)
            )
            member_of = members_of(conn, {row[0] for row in conn.execute(mine)})
            return member_of, {u for members in member_of.values() for u in members}

        def txn(conn: Connection) -> tuple[Emitted, list[str]]:
            streams, member_of = lock_covering(conn, self.sql, lambda: read(conn), also=[user_id])
            if user_id in streams.gone:
                return (), []
            if user_id not in streams.heads:
                raise UnknownUser(f"no such user {user_id!r}")
            for group_id, members in sorted(member_of.items()):
                conn.execute(
                    update(group_members)
                    .where(group_members.c.group_id == group_id, group_members.c.user_id == user_id)
                    .values(active=False)
                )
                _hand_over(conn, group_id, user_id)
                for member in sorted(members - {user_id}):
                    event = GroupUpdated(seq=0, group_id=group_id, action="member_left", user_id=user_id, by=user_id)
                    streams.emit(member, event, f"group:{group_id}")
            conn.execute(
                update(users)
                .where(users.c.user_id == user_id)
                .values(
                    password_hash="",
                    role="user",
                    deleted_at_ms=at_ms,
                    disabled_at_ms=func.coalesce(users.c.disabled_at_ms, at_ms),
                    tokens_valid_after_ms=self.sql.greatest(users.c.tokens_valid_after_ms, at_ms),
                )
            )
            for table in (device_cursors, device_revocations, conversation_marks):
                conn.execute(delete(table).where(table.c.user_id == user_id))
            conn.execute(delete(push_outbox).where(push_outbox.c.recipient == user_id))
            # What others received stays in their streams, as a tombstone without content.
            conn.execute(
                update(messages)
                .where(messages.c.sender == user_id)
                .values(content="", recalled_at=func.coalesce(messages.c.recalled_at, at))
            )
            return streams.flush(), sorted(member_of)

        return await self.db.run("mark_deleted", txn, write=True)

    async def delete_stream_batch(self, user_id: str, limit: int) -> int:
        """Delete the ``limit`` oldest entries of the user's stream; how many went."""
        oldest = (
            select(stream_events.c.seq)
            .where(stream_events.c.user_id == user_id)
            .order_by(stream_events.c.seq)
            .limit(limit)
        )
        stmt = delete(stream_events).where(stream_events.c.user_id == user_id, stream_events.c.seq.in_(oldest))
        return await self.db.run("delete_stream_batch", lambda conn: int(conn.execute(stmt).rowcount), write=True)

    async def delete_unheld_messages_of(self, sender: str, limit: int) -> int:
        """Delete up to ``limit`` messages of ``sender`` that no stream holds; how many went."""
        held = exists().where(stream_events.c.message_id == messages.c.id)
        batch = select(messages.c.id).where(messages.c.sender == sender, ~held).limit(limit)
        stmt = delete(messages).where(messages.c.id.in_(batch))
        return await self.db.run("delete_unheld_messages_of", lambda conn: int(conn.execute(stmt).rowcount), write=True)

    async def list_groups(self, after: str, limit: int) -> list[GroupSummary]:
        count = (
            select(func.count())
            .where(group_members.c.group_id == groups.c.group_id, group_members.c.active.is_(True))
            .scalar_subquery()
        )
        query = (
            select(groups.c.group_id, groups.c.name, groups.c.owner, groups.c.created_at, count.label("members"))
            .where(groups.c.group_id > after)
            .order_by(groups.c.group_id)
            .limit(limit)
        )

        def txn(conn: Connection) -> list[GroupSummary]:
            found = []
            for row in conn.execute(query):
                created = utc(row.created_at) or datetime.now(UTC)
                found.append(GroupSummary(row.group_id, row.name, row.owner, int(row.members), created))
            return found

        return await self.db.run("list_groups", txn)


def _hand_over(conn: Connection, group_id: str, leaving: str) -> None:
    """A group whose owner leaves passes to the member who joined first (then by id)."""
    owner = conn.execute(select(groups.c.owner).where(groups.c.group_id == group_id)).scalar_one_or_none()
    if owner is None:
        raise UnknownGroup(f"no such group {group_id!r}")
    if owner != leaving:
        return
    heir = conn.execute(
        select(group_members.c.user_id)
        .where(group_members.c.group_id == group_id, group_members.c.active.is_(True))
        .order_by(group_members.c.joined_at, group_members.c.user_id)
        .limit(1)
    ).scalar_one_or_none()
    if heir is not None:  # else nobody is left: the group keeps its deleted owner, and no members
        conn.execute(update(groups).where(groups.c.group_id == group_id).values(owner=heir))
