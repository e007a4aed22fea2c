"""Database tables (SQLModel). The hot paths in ``sql.py`` use SQLAlchemy Core on them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlmodel import Field, SQLModel

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class User(SQLModel, table=True):
    __tablename__ = "users"

    user_id: str = Field(primary_key=True, max_length=64)
    password_hash: str
    # The head of the user's event stream. Writers lock this row to allocate the next
    # seq, which is what keeps seqs gapless and in commit order across processes.
    last_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # "Log out everywhere" and a password change: every token issued at or before this
    # moment (ms since the epoch, compared with the token's iat_ms) is refused.
    tokens_valid_after_ms: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0")
    )
    # "user" or "admin" (the administration API and commands; docs/operations.md, "Admin").
    role: str = Field(
        default="user", sa_column=Column(String(16), nullable=False, default="user", server_default="user")
    )
    # Set while an administrator has the account disabled (ms since the epoch): no login, no token.
    disabled_at_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # Set once the account is deleted. The row stays, without a password, so that the id (a
    # topic level, named in other users' conversations) is never given to someone else.
    deleted_at_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class Group(SQLModel, table=True):
    __tablename__ = "groups"

    group_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=100)
    owner: str = Field(max_length=64, foreign_key="users.user_id")
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class GroupMember(SQLModel, table=True):
    """Membership. A removed member's row stays, inactive: history is read from the
    member's own stream, which simply stops at the removal."""

    __tablename__ = "group_members"
    __table_args__ = (Index("ix_group_members_user", "user_id", "active"),)

    group_id: str = Field(primary_key=True, max_length=64, foreign_key="groups.group_id")
    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    active: bool = Field(sa_column=Column(Boolean, nullable=False))
    joined_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("sender", "client_msg_id", name="uq_messages_sender_client_msg_id"),)

    id: int | None = Field(default=None, sa_column=Column(_BigId, primary_key=True, autoincrement=True))
    sender: str = Field(max_length=64, foreign_key="users.user_id")
    client_msg_id: str = Field(max_length=64)
    to_user: str | None = Field(default=None, max_length=64, foreign_key="users.user_id")
    group_id: str | None = Field(default=None, max_length=64, foreign_key="groups.group_id")
    content: str = Field(sa_column=Column(Text, nullable=False))
    msg_type: str = Field(max_length=16)
    # The message's seq in the sender's own stream, returned again on a duplicate send.
    sender_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # A recalled message is kept for audit; history and sync stop serving its content.
    recalled_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    # The file the message carries (``files.file_id``; indexed: downloads are authorized by it),
    # and its public description as JSON, copied in when the message is stored (a file never
    # changes), so that rendering a message needs no join.
    attachment_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True, index=True))
    attachment: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class FileRow(SQLModel, table=True):
    """An uploaded file. The bytes live in the ``FileStore`` under ``sha256`` (several uploads of
    the same bytes share them). One that no message carries is deleted after
    ``files.unsent_ttl_seconds``."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_created_at", "created_at"),)

    file_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=64, foreign_key="users.user_id")
    name: str = Field(max_length=255)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    content_type: str = Field(max_length=100)
    sha256: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    width: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    height: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class StreamEventRow(SQLModel, table=True):
    """One entry of a user's stream. Message events are rendered from the message row (so
    a recall turns them into tombstones); other events keep their JSON ``payload``."""

    __tablename__ = "stream_events"
    __table_args__ = (
        Index("ix_stream_events_conversation", "user_id", "conversation_id", "message_id"),
        Index("ix_stream_events_message", "message_id"),
    )

    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    kind: str = Field(max_length=32)
    # From the stream owner's point of view: "user:{peer}" or "group:{group_id}".
    conversation_id: str | None = Field(default=None, sa_column=Column(String(72), nullable=True))
    message_id: int | None = Field(default=None, sa_column=Column(_BigId, ForeignKey("messages.id"), nullable=True))
    payload: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # When the entry was appended (ms since the epoch): retention deletes a stream's oldest
    # entries by it. Entries from before migration 0003 carry the time of that upgrade.
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class DeviceCursor(SQLModel, table=True):
    __tablename__ = "device_cursors"

    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    device_id: str = Field(primary_key=True, max_length=64)
    acked_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ConversationMark(SQLModel, table=True):
    """Per user and conversation: delivered and read watermarks (message ids)."""

    __tablename__ = "conversation_marks"

    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    conversation_id: str = Field(primary_key=True, max_length=72)
    delivered_upto: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    delivered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    read_upto: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    read_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class DeviceRevocation(SQLModel, table=True):
    """A revoked device: tokens issued before ``revoked_at`` no longer work for it.

    Checked at MQTT CONNECT and by the HTTP auth dependency. A later login issues fresh
    tokens, so a revoked device id can be used again by whoever knows the password."""

    __tablename__ = "device_revocations"

    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    device_id: str = Field(primary_key=True, max_length=64)
    # Milliseconds since the epoch, compared with the token's ``iat_ms``: a plain integer
    # compares the same on SQLite and PostgreSQL, with no time zone to lose.
    revoked_at_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class PushEvent(SQLModel, table=True):
    """The push outbox: one row per message and recipient that had no device connected when
    the message was stored, written in the same transaction (docs/operations.md, "Push hooks").
    Delivered rows are deleted; ``dead`` ones stay until they expire or are queued again."""

    __tablename__ = "push_outbox"
    __table_args__ = (
        UniqueConstraint("message_id", "recipient", name="uq_push_outbox_message_recipient"),
        Index("ix_push_outbox_due", "state", "next_attempt_ms"),
    )

    id: int | None = Field(default=None, sa_column=Column(_BigId, primary_key=True, autoincrement=True))
    # No foreign key: a message deleted by retention or with its sender's account leaves its
    # event to be dropped at delivery time, instead of blocking the deletion.
    message_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    recipient: str = Field(max_length=64)
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    # When it is due next; while a worker delivers it, when its claim lapses (then it is due again).
    next_attempt_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: str = Field(default="pending", max_length=16)
    """``pending`` or ``dead`` (gave up after ``push.max_attempts``)."""
    last_error: str | None = Field(default=None, max_length=200)


class HealthCheck(SQLModel, table=True):
    """One row per node, rewritten by its health check (bridge/health.py): a node reports
    healthy only while this write commits in time, so a full or read-only disk shows."""

    __tablename__ = "health"

    node_id: str = Field(primary_key=True, max_length=255)
    checked_at_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


METADATA = SQLModel.metadata
users = User.__table__  # type: ignore[attr-defined]
# Ids are case-sensitive (they are topic levels), but two that differ only in case would be
# one person to a reader: the database refuses the second (ASCII ids, so lower() suffices).
Index("uq_users_user_id_lower", func.lower(users.c.user_id), unique=True)
# Every node looks for accounts disabled since its last look, to close their connections.
Index("ix_users_disabled_at_ms", users.c.disabled_at_ms)
groups = Group.__table__  # type: ignore[attr-defined]
group_members = GroupMember.__table__  # type: ignore[attr-defined]
messages = Message.__table__  # type: ignore[attr-defined]
stream_events = StreamEventRow.__table__  # type: ignore[attr-defined]
device_cursors = DeviceCursor.__table__  # type: ignore[attr-defined]
conversation_marks = ConversationMark.__table__  # type: ignore[attr-defined]
device_revocations = DeviceRevocation.__table__  # type: ignore[attr-defined]
push_outbox = PushEvent.__table__  # type: ignore[attr-defined]
files = FileRow.__table__  # type: ignore[attr-defined]
health = HealthCheck.__table__  # type: ignore[attr-defined]
