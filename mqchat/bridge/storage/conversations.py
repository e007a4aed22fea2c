"""Conversations, history and unread counts, all read from the user's own stream."""

from __future__ import annotations

from sqlalchemy import Connection, and_, func, select

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.groups import groups_of
from mqchat.bridge.storage.streams import NEW_MESSAGE, row_to_message
from mqchat.bridge.store import ConversationSummary, StoredMessage
from mqchat.bridge.tables import conversation_marks, messages, stream_events
from mqchat.core.ids import ConversationId


def _unread(conn: Connection, user_id: str) -> dict[str, int]:
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
    return {row[0]: int(row[1]) for row in conn.execute(query)}


class ConversationsStore(StoreBase):
    async def conversations(self, user_id: str, limit: int) -> list[ConversationSummary]:
        last_id = func.max(stream_events.c.message_id)
        heads_query = (
            select(stream_events.c.conversation_id, last_id.label("last_id"))
            .where(stream_events.c.user_id == user_id, stream_events.c.kind == NEW_MESSAGE)
            .group_by(stream_events.c.conversation_id)
            .order_by(last_id.desc())
            .limit(limit)
        )

        def txn(conn: Connection) -> list[ConversationSummary]:
            last_ids = {row.conversation_id: int(row.last_id) for row in conn.execute(heads_query)}
            rows = conn.execute(select(messages).where(messages.c.id.in_(list(last_ids.values()))))
            by_id = {row.id: row_to_message(row) for row in rows}
            unread = _unread(conn, user_id)
            names = {str(ConversationId.group(g.group_id)): g.name for g in groups_of(conn, user_id)}
            summaries = [
                ConversationSummary(cid, by_id[mid], unread.get(cid, 0), names.get(cid))
                for cid, mid in last_ids.items()
            ]
            quiet = [ConversationSummary(cid, None, 0, name) for cid, name in names.items() if cid not in last_ids]
            return (summaries + sorted(quiet, key=lambda s: s.conversation_id))[:limit]

        return await self.db.run("conversations", txn)

    async def history(
        self, user_id: str, conversation: ConversationId, before_id: int | None, limit: int
    ) -> list[StoredMessage]:
        query = (
            select(messages)
            .select_from(stream_events.join(messages, messages.c.id == stream_events.c.message_id))
            .where(
                stream_events.c.user_id == user_id,
                stream_events.c.conversation_id == str(conversation),
                stream_events.c.kind == NEW_MESSAGE,
            )
        )
        if before_id is not None:
            query = query.where(messages.c.id < before_id)
        query = query.order_by(messages.c.id.desc()).limit(limit)
        return await self.db.run("history", lambda conn: [row_to_message(row) for row in conn.execute(query)])
