"""The storage interfaces the chat service and the accounts talk to, and the values they exchange.

``AccountStore`` is what ``Accounts`` needs; ``MessageStore`` is the whole store. ``SqlStore``
(``mqchat.bridge.storage``) implements both, on SQLite or PostgreSQL. Every write that adds
stream events returns them as ``Emitted`` so the service can publish exactly what was
committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from mqchat.core.errors import ChatError
from mqchat.core.protocol import AnyStreamEvent, MsgType, format_time

Emitted = tuple[tuple[str, AnyStreamEvent], ...]
"""(user_id, event) pairs: new entries of users' streams, in seq order per user."""


@dataclass(frozen=True, slots=True)
class SendRequest:
    sender: str
    client_msg_id: str
    content: str
    msg_type: MsgType
    to_user: str | None = None
    group_id: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    sender: str
    client_msg_id: str
    to_user: str | None
    group_id: str | None
    content: str
    msg_type: MsgType
    sender_seq: int
    created_at: datetime
    recalled_at: datetime | None = None

    def conversation_for(self, viewer: str) -> str:
        """The conversation id as ``viewer`` sees it: ``group:{id}`` or ``user:{the other}``."""
        if self.group_id is not None:
            return f"group:{self.group_id}"
        return f"user:{self.to_user if viewer == self.sender else self.sender}"

    def public_fields(self) -> dict[str, Any]:
        """The message as clients see it, the one definition of its rendering: the fields of
        a ``new_message`` event (without ``seq``) and of the HTTP API's ``MessagePublic``.
        A recalled message is a tombstone: no content, with ``recalled_at``."""
        recalled = self.recalled_at is not None
        return {
            "server_msg_id": self.id,
            "client_msg_id": self.client_msg_id,
            "from_user": self.sender,
            "to_user": self.to_user,
            "group_id": self.group_id,
            "content": None if recalled else self.content,
            "msg_type": self.msg_type,
            "created_at": format_time(self.created_at),
            "recalled_at": format_time(self.recalled_at) if self.recalled_at is not None else None,
        }


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What one send did. ``events`` is empty for a duplicate, whose stored original is
    returned as ``message``."""

    message: StoredMessage
    duplicate: bool
    events: Emitted


@dataclass(frozen=True, slots=True)
class StreamPage:
    events: list[AnyStreamEvent]
    latest_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation_id: str
    last_message: StoredMessage | None
    unread_count: int
    name: str | None = None


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_id: str
    name: str
    owner: str
    members: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Receipt:
    user_id: str
    delivered_at: datetime | None
    read_at: datetime | None


class AccountStore(Protocol):
    """Users, password hashes and token revocations."""

    async def create_user(self, user_id: str, password_hash: str) -> None:
        """Raise ``UserExists`` if the id is taken, also by an id that differs only in case."""

    async def get_password_hash(self, user_id: str) -> str | None: ...

    async def revoke_device(self, user_id: str, device_id: str, at_ms: int) -> None:
        """Refuse, from now on, the device's tokens issued at or before ``at_ms``."""

    async def device_revoked_at(self, user_id: str, device_id: str) -> int | None:
        """When the device was last revoked (ms since the epoch), or None."""

    async def tokens_refused_upto(self, user_id: str, device_id: str | None) -> int | None:
        """Tokens issued at or before this time (ms) are refused: the later of the user's last
        "log out everywhere" (or password change) and, for a device, its last revocation.
        None when neither happened. One query: it runs at every CONNECT and HTTP request."""

    async def revoke_all_tokens(self, user_id: str, at_ms: int) -> None:
        """Refuse, from now on, every token of the user issued at or before ``at_ms``."""

    async def set_password(self, user_id: str, password_hash: str, at_ms: int) -> None:
        """Replace the password hash and refuse every token issued at or before ``at_ms``."""

    async def create_users(self, password_hashes: dict[str, str]) -> None:
        """Create many users at once, skipping ids that exist (benchmarks and imports)."""


class MessageStore(AccountStore, Protocol):
    async def create_schema(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` if the database cannot answer."""

    async def health_write(self, node_id: str) -> None:
        """Commit one tiny write (this node's row of ``health``); ``StorageUnavailable`` if it fails."""

    async def save_messages(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        """Store a batch in one transaction, one result per request, in order.

        Idempotent on ``(sender, client_msg_id)``: a repeat stores nothing and returns
        the original with ``duplicate=True``.
        """

    async def read_stream(self, user_id: str, since_seq: int, limit: int) -> StreamPage: ...

    async def read_from_cursor(self, user_id: str, device_id: str, limit: int) -> StreamPage:
        """The first page after the device's cursor, read with the cursor in one transaction."""
        ...

    async def latest_seq(self, user_id: str) -> int: ...

    async def advance_cursor(self, user_id: str, device_id: str, seq: int) -> tuple[int, Emitted]:
        """Move a device's cursor forward (never back). Messages that thereby reach the
        user's first device become delivered: returns the cursor and the receipts."""

    async def get_cursor(self, user_id: str, device_id: str) -> int: ...

    async def mark_read(self, user_id: str, message_id: int) -> Emitted: ...

    async def recall(self, user_id: str, message_id: int, window_seconds: float) -> Emitted: ...

    async def receipts(self, user_id: str, message_id: int) -> list[Receipt]: ...

    async def conversations(self, user_id: str, limit: int) -> list[ConversationSummary]: ...

    async def history(
        self, user_id: str, conversation_id: str, before_id: int | None, limit: int
    ) -> list[StoredMessage]:
        """The messages of a conversation that reached ``user_id``'s stream, newest first."""

    async def create_group(
        self, owner: str, name: str, members: Sequence[str], limit: int
    ) -> tuple[GroupInfo, Emitted]: ...

    async def add_member(self, group_id: str, by: str, user_id: str, limit: int) -> Emitted: ...

    async def remove_member(self, group_id: str, by: str, user_id: str) -> Emitted: ...

    async def get_group(self, group_id: str) -> GroupInfo: ...

    async def groups_of(self, user_id: str) -> list[GroupInfo]: ...

    async def active_members(self, group_id: str) -> frozenset[str]: ...

    async def are_contacts(self, user_id: str, other: str) -> bool:
        """Whether the two share a conversation or a group (who may see whose presence)."""
