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
groups = Group.__table__  # type: ignore[attr-defined]
group_members = GroupMember.__table__  # type: ignore[attr-defined]
messages = Message.__table__  # type: ignore[attr-defined]
stream_events = StreamEventRow.__table__  # type: ignore[attr-defined]
device_cursors = DeviceCursor.__table__  # type: ignore[attr-defined]
conversation_marks = ConversationMark.__table__  # type: ignore[attr-defined]
device_revocations = DeviceRevocation.__table__  # type: ignore[attr-defined]
health = HealthCheck.__table__  # type: ignore[attr-defined]
