"""The storage interface the chat service talks to, and the values it exchanges.

``SqlStore`` (sql.py) is the real implementation, on SQLite or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from mqchat.core.errors import ChatError
from mqchat.core.protocol import MsgType, StreamEvent


@dataclass(frozen=True, slots=True)
class SendRequest:
    sender: str
    client_msg_id: str
    to_user: str
    content: str
    msg_type: MsgType


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    sender: str
    client_msg_id: str
    to_user: str
    content: str
    msg_type: MsgType
    sender_seq: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What one send did. ``events`` holds the new stream entries (user_id, event), empty
    for a duplicate, whose stored original is returned as ``message``."""

    message: StoredMessage
    duplicate: bool
    events: tuple[tuple[str, StreamEvent], ...]


@dataclass(frozen=True, slots=True)
class StreamPage:
    events: list[StreamEvent]
    latest_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation_id: str
    peer: str
    last_message: StoredMessage
    unread_count: int


class MessageStore(Protocol):
    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` if the database cannot answer."""

    async def create_user(self, user_id: str, password_hash: str) -> None:
        """Raise ``UserExists`` if the id is taken."""

    async def get_password_hash(self, user_id: str) -> str | None: ...

    async def save_messages(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        """Store a batch in one transaction, one result per request, in order.

        Idempotent on ``(sender, client_msg_id)``: a repeat stores nothing and returns
        the original with ``duplicate=True``.
        """

    async def read_stream(self, user_id: str, since_seq: int, limit: int) -> StreamPage: ...

    async def latest_seq(self, user_id: str) -> int: ...

    async def advance_cursor(self, user_id: str, device_id: str, seq: int) -> int:
        """Move a device's cursor forward (never back); return the cursor now stored."""

    async def get_cursor(self, user_id: str, device_id: str) -> int: ...

    async def conversations(self, user_id: str, limit: int) -> list[ConversationSummary]: ...

    async def history(self, user_id: str, peer: str, before_id: int | None, limit: int) -> list[StoredMessage]:
        """Messages between ``user_id`` and ``peer``, newest first, ids below ``before_id``."""
