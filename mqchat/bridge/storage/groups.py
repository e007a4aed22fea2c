"""Groups: creation, membership changes (each a stream event for every member), lookups.

Membership changes lock the streams of the members they read (plus the user added) with
``lock_covering``, so they serialize with group sends, which lock the same heads: a group
message is stored into the streams of exactly the members active when it commits.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select, update

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.streams import Streams, lock_covering, utc
from mqchat.bridge.store import Emitted, GroupInfo
from mqchat.bridge.tables import group_members, groups, stream_events
from mqchat.core.errors import GroupFull, NotAllowed, NotAMember, UnknownGroup, UnknownUser
from mqchat.core.ids import ConversationId
from mqchat.core.protocol import GroupAction, GroupUpdated


def members_of(conn: Connection, group_ids: set[str]) -> dict[str, frozenset[str]]:
    """The active members of each of these groups that exists."""
    if not group_ids:
        return {}
    found: dict[str, set[str]] = {gid: set() for gid in group_ids}
    exists = select(groups.c.group_id).where(groups.c.group_id.in_(sorted(group_ids)))
    known = {row.group_id for row in conn.execute(exists)}
    query = select(group_members.c.group_id, group_members.c.user_id).where(
        group_members.c.group_id.in_(sorted(group_ids)), group_members.c.active.is_(True)
    )
    for row in conn.execute(query):
        found[row.group_id].add(row.user_id)
    return {gid: frozenset(us) for gid, us in found.items() if gid in known}


def group(conn: Connection, group_id: str) -> GroupInfo:
    row = conn.execute(select(groups).where(groups.c.group_id == group_id)).one_or_none()
    if row is None:
        raise UnknownGroup(f"no such group {group_id!r}")
    members = members_of(conn, {group_id})[group_id]
    created = utc(row.created_at) or datetime.now(UTC)
    return GroupInfo(row.group_id, row.name, row.owner, tuple(sorted(members)), created)


def groups_of(conn: Connection, user_id: str) -> list[GroupInfo]:
    query = select(group_members.c.group_id).where(group_members.c.user_id == user_id, group_members.c.active.is_(True))
    return [group(conn, gid) for gid in sorted(row.group_id for row in conn.execute(query))]


def _group_event(streams: Streams, to: str, group_id: str, action: GroupAction, user_id: str, by: str) -> None:
    event = GroupUpdated(seq=0, group_id=group_id, action=action, user_id=user_id, by=by)
    streams.emit(to, event, str(ConversationId.group(group_id)))


def _check_add(info: GroupInfo, by: str, user_id: str, limit: int) -> bool:
    """Whether ``by`` may add ``user_id``; True if it is a member already (nothing to do)."""
    if info.owner != by:
        raise NotAllowed("only the group's owner adds members")
    if user_id in info.members:
        return True
    if len(info.members) + 1 > limit:
        raise GroupFull(f"a group has at most {limit} members")
    return False


def _check_remove(info: GroupInfo, by: str, user_id: str) -> None:
    if by != user_id and info.owner != by:
        raise NotAllowed("only the group's owner removes members; members may leave")
    if user_id == info.owner:
        raise NotAllowed("the owner cannot leave or be removed")
    if user_id not in info.members:
        raise NotAMember(f"{user_id!r} is not a member of {info.group_id!r}")


class GroupsStore(StoreBase):
    async def create_group(
        self, owner: str, name: str, members: Sequence[str], limit: int
    ) -> tuple[GroupInfo, Emitted]:
        everyone = sorted({owner, *members})
        if len(everyone) > limit:
            raise GroupFull(f"a group has at most {limit} members")
        group_id = f"g{secrets.token_hex(8)}"
        now = datetime.now(UTC)

        def txn(conn: Connection) -> Emitted:
            streams = Streams.lock(conn, self.sql, everyone)
            missing = sorted(set(everyone) - set(streams.heads))
            if missing:
                raise UnknownUser(f"no such user(s): {', '.join(missing)}")
            conn.execute(insert(groups).values(group_id=group_id, name=name, owner=owner, created_at=now))
            rows = [{"group_id": group_id, "user_id": u, "active": True, "joined_at": now} for u in everyone]
            conn.execute(insert(group_members), rows)
            for member in everyone:
                _group_event(streams, member, group_id, "created", owner, owner)
            return streams.flush()

        emitted = await self.db.run("create_group", txn, write=True)
        return GroupInfo(group_id, name, owner, tuple(everyone), now), emitted

    async def add_member(self, group_id: str, by: str, user_id: str, limit: int) -> Emitted:
        def read(conn: Connection) -> tuple[GroupInfo, set[str]]:
            info = group(conn, group_id)
            return info, set(info.members)

        def txn(conn: Connection) -> Emitted:
            streams, info = lock_covering(conn, self.sql, lambda: read(conn), also=[user_id])
            if _check_add(info, by, user_id, limit):
                return ()
            if user_id not in streams.heads:
                raise UnknownUser(f"no such user {user_id!r}")
            values = {"group_id": group_id, "user_id": user_id, "active": True, "joined_at": datetime.now(UTC)}
            stmt = self.sql.insert(group_members).values(**values)
            set_ = {"active": True, "joined_at": stmt.excluded.joined_at}
            conn.execute(stmt.on_conflict_do_update(index_elements=["group_id", "user_id"], set_=set_))
            for member in sorted({*info.members, user_id}):
                _group_event(streams, member, group_id, "member_added", user_id, by)
            return streams.flush()

        return await self.db.run("add_member", txn, write=True)

    async def remove_member(self, group_id: str, by: str, user_id: str) -> Emitted:
        def read(conn: Connection) -> tuple[GroupInfo, set[str]]:
            info = group(conn, group_id)
            _check_remove(info, by, user_id)
            return info, set(info.members)

        def txn(conn: Connection) -> Emitted:
            streams, info = lock_covering(conn, self.sql, lambda: read(conn))
            conn.execute(
                update(group_members)
                .where(group_members.c.group_id == group_id, group_members.c.user_id == user_id)
                .values(active=False)
            )
            action: GroupAction = "member_left" if by == user_id else "member_removed"
            for member in info.members:
                _group_event(streams, member, group_id, action, user_id, by)
            return streams.flush()

        return await self.db.run("remove_member", txn, write=True)

    async def get_group(self, group_id: str) -> GroupInfo:
        return await self.db.run("get_group", lambda conn: group(conn, group_id))

    async def groups_of(self, user_id: str) -> list[GroupInfo]:
        return await self.db.run("groups_of", lambda conn: groups_of(conn, user_id))

    async def active_members(self, group_id: str) -> frozenset[str]:
        def txn(conn: Connection) -> frozenset[str]:
            return members_of(conn, {group_id}).get(group_id, frozenset())

        return await self.db.run("active_members", txn)

    async def are_contacts(self, user_id: str, other: str) -> bool:
        """Whether the two share a conversation or an active group membership."""
        if user_id == other:
            return True
        conversation = str(ConversationId.user(other))
        direct = (
            select(stream_events.c.seq)
            .where(stream_events.c.user_id == user_id, stream_events.c.conversation_id == conversation)
            .limit(1)
        )
        mine = select(group_members.c.group_id).where(
            group_members.c.user_id == user_id, group_members.c.active.is_(True)
        )
        shared = (
            select(group_members.c.group_id)
            .where(
                group_members.c.user_id == other, group_members.c.active.is_(True), group_members.c.group_id.in_(mine)
            )
            .limit(1)
        )

        def txn(conn: Connection) -> bool:
            return conn.execute(direct).first() is not None or conn.execute(shared).first() is not None

        return await self.db.run("are_contacts", txn)
