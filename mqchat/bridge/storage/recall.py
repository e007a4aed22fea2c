"""Recall: the sender turns a message into a tombstone within the recall window.

The row and its content stay for audit; ``recalled_at`` makes every later read render
the message without content (streams.py renders ``new_message`` from the message row).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, select, update

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.receipts import participants
from mqchat.bridge.storage.streams import Streams, row_to_message
from mqchat.bridge.store import Emitted
from mqchat.bridge.tables import messages
from mqchat.core.errors import NotAllowed, NotFound, RecallWindowPassed
from mqchat.core.protocol import MessageRecalled, format_time


class RecallStore(StoreBase):
    async def recall(self, user_id: str, message_id: int, window_seconds: float) -> Emitted:
        def txn(conn: Connection) -> Emitted:
            row = conn.execute(select(messages).where(messages.c.id == message_id)).one_or_none()
            # The participants of a stored message never change: no re-read needed.
            audience = participants(conn, message_id)
            if row is None or user_id not in audience:
                raise NotFound(f"message {message_id} is not in your conversations")
            message = row_to_message(row)
            if message.sender != user_id:
                raise NotAllowed("only the sender can recall a message")
            if message.recalled_at is not None:
                return ()  # already a tombstone: recalling again changes nothing
            now = datetime.now(UTC)
            if (now - message.created_at).total_seconds() > window_seconds:
                raise RecallWindowPassed(f"messages can be recalled for {window_seconds:g} s after sending")
            streams = Streams.lock(conn, self.sql, audience)
            conn.execute(update(messages).where(messages.c.id == message_id).values(recalled_at=now))
            for participant, conversation_id in sorted(audience.items()):
                event = MessageRecalled(
                    seq=0,
                    message_id=message_id,
                    conversation_id=conversation_id,
                    recalled_by=user_id,
                    recalled_at=format_time(now),
                )
                streams.emit(participant, event, conversation_id)
            return streams.flush()

        return await self.db.run("recall", txn, write=True)
