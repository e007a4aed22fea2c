"""The storage interfaces the chat service and the accounts talk to, and the values they exchange.

``AccountStore`` is what ``Accounts`` needs; ``MessageStore`` is the whole store. ``SqlStore``
(``mqchat.bridge.storage``) implements both, on SQLite or PostgreSQL. Every write that adds
stream events returns them as ``Emitted`` so the service can publish exactly what was
committed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, overload

from mqchat.core.errors import ChatError
from mqchat.core.ids import ConversationId
from mqchat.core.protocol import AnyStreamEvent, Attachment, MsgType, NewMessage, format_time

Emitted = Sequence[tuple[str, AnyStreamEvent]]
"""(user_id, event) pairs: new entries of users' streams, in seq order per user. A message's
entries come as one ``MessageEntries``."""


def with_seq(event: NewMessage, seq: int) -> NewMessage:
    """``event`` with another ``seq``: what ``model_copy(update={"seq": seq})`` returns, for
    the one field a message's per-stream events differ in, without pydantic's generic copy
    (about 2.6 times as long). The event is frozen, so sharing the other fields' values is
    safe. It has no extra fields and no private attributes, which is why both are None here
    (tests/bridge/test_streams.py fails if that changes)."""
    new = object.__new__(NewMessage)
    fields = event.__dict__.copy()
    fields["seq"] = seq
    object.__setattr__(new, "__dict__", fields)
    object.__setattr__(new, "__pydantic_fields_set__", set(event.__pydantic_fields_set__))
    object.__setattr__(new, "__pydantic_extra__", None)
    object.__setattr__(new, "__pydantic_private__", None)
    return new


class MessageEntries(Sequence[tuple[str, NewMessage]]):
    """One message's entries in several streams: ``users[i]`` got it at ``seqs[i]``.

    A group message lands in up to 1,000 streams, and its events differ only in ``seq``: each
    member's event is made (``with_seq``) only when an entry is read as a pair. The fan-out
    reads ``event``, ``users`` and ``seqs`` instead and makes none (fanout.py): making them
    was an eighth of a group message's time holding the GIL (py-spy, docs/performance.md)."""

    __slots__ = ("event", "seqs", "users")

    def __init__(self, event: NewMessage, users: Sequence[str], seqs: Sequence[int]) -> None:
        if len(users) != len(seqs):
            raise ValueError("one seq per user")
        self.event = event
        """The message as rendered for the first stream (any ``seq`` but that one is ignored)."""
        self.users = users
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.users)

    @overload
    def __getitem__(self, index: int) -> tuple[str, NewMessage]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[str, NewMessage]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, NewMessage] | Sequence[tuple[str, NewMessage]]:
        if isinstance(index, slice):
            return MessageEntries(self.event, self.users[index], self.seqs[index])
        return self.users[index], with_seq(self.event, self.seqs[index])

    def __iter__(self) -> Iterator[tuple[str, NewMessage]]:
        for user_id, seq in zip(self.users, self.seqs, strict=True):
            yield user_id, with_seq(self.event, seq)

    def __repr__(self) -> str:
        return f"MessageEntries(server_msg_id={self.event.server_msg_id}, {len(self)} streams)"


@dataclass(frozen=True, slots=True)
class SendRequest:
    sender: str
    client_msg_id: str
    content: str
    msg_type: MsgType
    to_user: str | None = None
    group_id: str | None = None
    attachment_id: str | None = None
    """A file the sender uploaded; the store refuses the send (``unknown_file``) otherwise."""


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
    attachment: Attachment | None = None

    def conversation_for(self, viewer: str) -> ConversationId:
        """The conversation as ``viewer`` sees it: ``group:{id}`` or ``user:{the other}``."""
        return ConversationId.for_viewer(viewer, sender=self.sender, to_user=self.to_user, group_id=self.group_id)

    def public_fields(self) -> dict[str, Any]:
        """The message as clients see it, the one definition of its rendering: the fields of
        a ``new_message`` event (without ``seq``) and of the HTTP API's ``MessagePublic``.
        A recalled message is a tombstone: no content and no attachment, with ``recalled_at``."""
        recalled = self.recalled_at is not None
        return {
            "attachment": None if recalled else self.attachment,
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
class StoredFile:
    """An uploaded file: who uploaded it, what it is, and the hash its bytes are kept under."""

    file_id: str
    owner: str
    name: str
    size: int
    content_type: str
    sha256: str
    created_at: datetime
    width: int | None = None
    height: int | None = None

    def public(self) -> Attachment:
        return Attachment(
            id=self.file_id,
            name=self.name,
            size=self.size,
            content_type=self.content_type,
            width=self.width,
            height=self.height,
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    user_id: str
    delivered_at: datetime | None
    read_at: datetime | None


@dataclass(frozen=True, slots=True)
class UserRecord:
    """An account as administrators see it."""

    user_id: str
    role: str
    created_at: datetime
    last_seq: int
    disabled_at_ms: int | None
    deleted_at_ms: int | None

    @property
    def status(self) -> str:
        if self.deleted_at_ms is not None:
            return "deleted"
        return "disabled" if self.disabled_at_ms is not None else "active"


@dataclass(frozen=True, slots=True)
class GroupSummary:
    group_id: str
    name: str
    owner: str
    members: int
    """Active members, owner included."""
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PruneTarget:
    """Retention: entries ``oldest .. upto`` of ``user_id``'s stream are to go."""

    user_id: str
    oldest: int
    upto: int


@dataclass(frozen=True, slots=True)
class TokenStanding:
    """The account behind a token, as the database says now."""

    refused_upto: int | None
    """Tokens issued at or before this time (ms) are refused: the later of the user's last "log
    out everywhere" (password change, disabling) and, for a device, its last revocation."""
    role: str
    """``user`` or ``admin``."""
    disabled: bool


@dataclass(frozen=True, slots=True)
class PushClaim:
    """A push event a worker has claimed for one delivery attempt."""

    id: int
    recipient: str
    attempt: int
    """1 for the first attempt."""
    message: StoredMessage | None
    """None when the message or the recipient's account no longer exists: drop the event."""
    message_id: int


class OfflineHook(Protocol):
    """Asked by ``save_messages`` about each recipient of each new message, inside the write
    transaction: a recipient it calls offline gets a push event in the same transaction
    (bridge/push.py). Runs on the database's worker thread for SQLite: quick and thread-safe."""

    def offline(self, user_id: str) -> bool: ...

    def queued(self) -> None:
        """Push events were written in the transaction about to commit."""


class AccountStore(Protocol):
    """Users, password hashes and token revocations."""

    async def create_user(self, user_id: str, password_hash: str) -> None:
        """Raise ``UserExists`` if the id is taken, also by an id that differs only in case."""

    async def get_password_hash(self, user_id: str) -> str | None: ...

    async def revoke_device(self, user_id: str, device_id: str, at_ms: int) -> None:
        """Refuse, from now on, the device's tokens issued at or before ``at_ms``."""

    async def device_revoked_at(self, user_id: str, device_id: str) -> int | None:
        """When the device was last revoked (ms since the epoch), or None."""

    async def token_standing(self, user_id: str, device_id: str | None) -> TokenStanding | None:
        """What a token of this user (for this device) is worth: None for no such user (or a
        deleted one). One query: it runs at every CONNECT and HTTP request."""

    async def revoke_all_tokens(self, user_id: str, at_ms: int) -> None:
        """Refuse, from now on, every token of the user issued at or before ``at_ms``."""

    async def set_password(self, user_id: str, password_hash: str, at_ms: int) -> None:
        """Replace the password hash and refuse every token issued at or before ``at_ms``."""

    async def create_users(self, password_hashes: dict[str, str]) -> None:
        """Create many users at once, skipping ids that exist (benchmarks and imports)."""


class FileRecords(Protocol):
    """The records of uploaded files (their bytes are in a ``FileStore``, bridge/files.py)."""

    async def add_file(self, record: StoredFile) -> None: ...

    async def readable_file(self, user_id: str, file_id: str) -> StoredFile | None:
        """The file if ``user_id`` uploaded it or has a message carrying it in their stream
        (the conversation's participants, group members at the time of the message)."""

    async def delete_unsent_files(self, uploaded_before: datetime) -> list[StoredFile]:
        """Delete the records of files uploaded before then that no message carries; returns them."""

    async def file_hash_in_use(self, sha256: str) -> bool:
        """Whether any file record still points at these bytes."""


class MessageStore(AccountStore, FileRecords, Protocol):
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
        self, user_id: str, conversation: ConversationId, before_id: int | None, limit: int
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
