"""Request and response bodies of the HTTP API that are not protocol envelopes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, StringConstraints

from mqchat.bridge.auth import MAX_PASSWORD, MIN_PASSWORD
from mqchat.bridge.store import ConversationSummary, StoredMessage
from mqchat.core.ids import ID_PATTERN
from mqchat.core.protocol import MsgType, format_time

UserIdStr = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN}$")]
Password = Annotated[str, StringConstraints(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]


class Credentials(BaseModel):
    user_id: UserIdStr
    password: Password


class UserPublic(BaseModel):
    user_id: str


class Token(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class MessagePublic(BaseModel):
    server_msg_id: int
    client_msg_id: str
    from_user: str
    to_user: str
    content: str
    msg_type: MsgType
    created_at: str

    @classmethod
    def of(cls, message: StoredMessage) -> MessagePublic:
        return cls(
            server_msg_id=message.id,
            client_msg_id=message.client_msg_id,
            from_user=message.sender,
            to_user=message.to_user,
            content=message.content,
            msg_type=message.msg_type,
            created_at=format_time(message.created_at),
        )


class ConversationPublic(BaseModel):
    conversation_id: str
    peer: str
    last_message: MessagePublic
    unread_count: int

    @classmethod
    def of(cls, summary: ConversationSummary) -> ConversationPublic:
        return cls(
            conversation_id=summary.conversation_id,
            peer=summary.peer,
            last_message=MessagePublic.of(summary.last_message),
            unread_count=summary.unread_count,
        )


class ConversationList(BaseModel):
    conversations: list[ConversationPublic]


class HistoryPage(BaseModel):
    conversation_id: str
    messages: list[MessagePublic]
    next_before_id: int | None
    """Pass as ``before_id`` for the next (older) page; null when this page is the last."""


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    database: Literal["ok"] = "ok"
