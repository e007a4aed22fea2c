"""Database tables (SQLModel). The hot paths in ``sql.py`` use SQLAlchemy Core on them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Index, Integer, Text, UniqueConstraint
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


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("sender", "client_msg_id", name="uq_messages_sender_client_msg_id"),
        Index("ix_messages_sender_to", "sender", "to_user", "id"),
        Index("ix_messages_to_sender", "to_user", "sender", "id"),
    )

    id: int | None = Field(default=None, sa_column=Column(_BigId, primary_key=True, autoincrement=True))
    sender: str = Field(max_length=64, foreign_key="users.user_id")
    client_msg_id: str = Field(max_length=64)
    to_user: str = Field(max_length=64, foreign_key="users.user_id")
    content: str = Field(sa_column=Column(Text, nullable=False))
    msg_type: str = Field(max_length=16)
    # The message's seq in the sender's own stream, returned again on a duplicate send.
    sender_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class StreamEventRow(SQLModel, table=True):
    """One entry of a user's stream. Events are rendered from the rows they point at,
    so that sync replays them exactly as they were published live."""

    __tablename__ = "stream_events"

    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    kind: str = Field(max_length=32)
    message_id: int | None = Field(default=None, sa_column=Column(_BigId, ForeignKey("messages.id"), nullable=True))


class DeviceCursor(SQLModel, table=True):
    __tablename__ = "device_cursors"

    user_id: str = Field(primary_key=True, max_length=64, foreign_key="users.user_id")
    device_id: str = Field(primary_key=True, max_length=64)
    acked_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


METADATA = SQLModel.metadata
users = User.__table__  # type: ignore[attr-defined]
messages = Message.__table__  # type: ignore[attr-defined]
stream_events = StreamEventRow.__table__  # type: ignore[attr-defined]
device_cursors = DeviceCursor.__table__  # type: ignore[attr-defined]
