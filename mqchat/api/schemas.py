"""Request and response bodies of the HTTP API that are not protocol envelopes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from mqchat.bridge.auth import MAX_PASSWORD, MIN_PASSWORD
from mqchat.bridge.store import ConversationSummary, GroupInfo, Receipt, StoredMessage
from mqchat.config import Settings
from mqchat.core.protocol import (
    Attachment,
    Caption,
    ClientMsgId,
    FileId,
    MsgType,
    SendGroupMessage,
    SendMessage,
    UserIdStr,
    format_time,
    one_target,
    storable,
)

Password = Annotated[str, StringConstraints(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]


class Credentials(BaseModel):
    user_id: UserIdStr
    password: Password


class Registration(Credentials):
    registration_token: str | None = Field(default=None, max_length=256)
    """Needed when the server's ``auth.registration`` is ``token``."""


class PasswordChange(BaseModel):
    old_password: Annotated[str, StringConstraints(max_length=MAX_PASSWORD)]
    new_password: Password


class TokenRequest(Credentials):
    device_id: UserIdStr | None = None
    """Scope the token to this device: it then works only for the MQTT client id
    ``{user_id}:{device_id}`` (and over HTTP). Without it, the token works for any device."""


class UserPublic(BaseModel):
    user_id: str


class Token(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    device_id: str | None = None
    """The device the token is scoped to; null: any device of the user."""
    event_key: str
    """Base64url key that verifies the ``sig`` of every event on the user's stream and
    device topics (docs/protocol.md, "Event signatures")."""


class SendBody(BaseModel):
    """``send_message`` (with ``to_user``) or ``send_group_message`` (with ``group_id``) fields."""

    model_config = ConfigDict(extra="ignore")

    client_msg_id: ClientMsgId
    to_user: UserIdStr | None = None
    group_id: UserIdStr | None = None
    content: Caption = ""
    msg_type: MsgType = "text"
    attachment: FileId | None = None
    """A file id from ``POST /v1/files`` (yours); then ``content`` may be empty."""

    @model_validator(mode="after")
    def _one_target(self) -> SendBody:
        one_target(self.to_user, self.group_id)
        if not self.content and self.attachment is None:
            raise ValueError("content: give a non-empty content, or an attachment")
        return self

    def command(self) -> SendMessage | SendGroupMessage:
        if self.group_id is not None:
            return SendGroupMessage(
                client_msg_id=self.client_msg_id,
                group_id=self.group_id,
                content=self.content,
                msg_type=self.msg_type,
                attachment=self.attachment,
            )
        assert self.to_user is not None
        return SendMessage(
            client_msg_id=self.client_msg_id,
            to_user=self.to_user,
            content=self.content,
            msg_type=self.msg_type,
            attachment=self.attachment,
        )


class MessagePublic(BaseModel):
    """A stored message. A recalled one has no ``content`` and carries ``recalled_at``."""

    server_msg_id: int
    client_msg_id: str
    from_user: str
    to_user: str | None = None
    group_id: str | None = None
    content: str | None
    msg_type: MsgType
    created_at: str
    recalled_at: str | None = None
    attachment: Attachment | None = None

    @classmethod
    def of(cls, message: StoredMessage) -> MessagePublic:
        # The same fields as a ``new_message`` event, from the one definition.
        return cls(**message.public_fields())


class ConversationPublic(BaseModel):
    conversation_id: str
    """``user:{peer}`` or ``group:{group_id}``."""
    name: str | None
    """The group's name; null for 1:1 conversations."""
    last_message: MessagePublic | None
    unread_count: int
    """Messages from others after this user's read marker (recalled ones not counted)."""

    @classmethod
    def of(cls, summary: ConversationSummary) -> ConversationPublic:
        last = MessagePublic.of(summary.last_message) if summary.last_message else None
        return cls(
            conversation_id=summary.conversation_id,
            name=summary.name,
            last_message=last,
            unread_count=summary.unread_count,
        )


class ConversationList(BaseModel):
    conversations: list[ConversationPublic]


class GroupCreate(BaseModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(storable)]
    members: list[UserIdStr] = []


class MemberAdd(BaseModel):
    user_id: UserIdStr


class GroupPublic(BaseModel):
    group_id: str
    name: str
    owner: str
    members: list[str]
    created_at: str

    @classmethod
    def of(cls, group: GroupInfo) -> GroupPublic:
        return cls(
            group_id=group.group_id,
            name=group.name,
            owner=group.owner,
            members=list(group.members),
            created_at=format_time(group.created_at),
        )


class GroupList(BaseModel):
    groups: list[GroupPublic]


class ReadBody(BaseModel):
    message_id: Annotated[int, Field(ge=1, le=2**62)]


class ReceiptPublic(BaseModel):
    user_id: str
    delivered_at: str | None
    read_at: str | None

    @classmethod
    def of(cls, receipt: Receipt) -> ReceiptPublic:
        return cls(
            user_id=receipt.user_id,
            delivered_at=format_time(receipt.delivered_at) if receipt.delivered_at else None,
            read_at=format_time(receipt.read_at) if receipt.read_at else None,
        )


class ReceiptList(BaseModel):
    message_id: int
    receipts: list[ReceiptPublic]


class HistoryPage(BaseModel):
    conversation_id: str
    messages: list[MessagePublic]
    next_before_id: int | None
    """Pass as ``before_id`` for the next (older) page; null when this page is the last."""


class Health(BaseModel):
    """``GET /healthz``: 200 with ``status: ok`` (or ``degraded``: in cluster mode, Redis is
    unreachable; messages are still stored and acked), or 503 with ``status: unavailable`` and why."""

    status: Literal["ok", "degraded", "unavailable"] = "ok"
    database: Literal["ok", "unavailable"] = "ok"
    redis: Literal["ok", "unavailable"] | None = None
    """Cluster mode only: whether this node's Redis link works (live delivery across nodes)."""
    reason: Literal["storage_unavailable", "storage_timeout"] | None = None
    """Machine-readable: ``storage_unavailable`` (the health write failed: disk full, read-only,
    database refusing), ``storage_timeout`` (no answer within ``database.health_timeout_seconds``)."""
    detail: str | None = None


class ClientConfig(BaseModel):
    """What a browser needs to reach the broker: MQTT over WebSocket on the host it loaded the
    page from. A port is null when that listener does not run."""

    ws_port: int | None
    """Plain MQTT over WebSocket (``ws://``)."""
    wss_port: int | None
    """MQTT over secure WebSocket (``wss://``), with TLS configured."""
    ws_path: str = "/mqtt"
    """The path to connect to (the broker accepts any; this is the convention)."""
    recall_window_seconds: float | None = None
    """How long after sending a message its sender may recall it (``bridge.recall_window_seconds``)."""
    max_file_bytes: int | None = None
    """The largest upload ``POST /v1/files`` takes (``files.max_bytes``)."""

    @classmethod
    def of(cls, settings: Settings) -> ClientConfig:
        """The configured ports (the runner passes the bound ones instead, which differ for port 0)."""
        tls = settings.tls
        return cls.advertised(
            settings,
            ws_port=settings.mqtt.ws_port if tls.plain_listeners else None,
            wss_port=tls.wss_port if tls.enabled else None,
        )

    @classmethod
    def advertised(cls, settings: Settings, *, ws_port: int | None, wss_port: int | None) -> ClientConfig:
        """The ports a browser should use: this node's own, unless ``mqtt.public_ws_port`` /
        ``public_wss_port`` name a load balancer's (a listener that does not run stays null)."""
        mqtt = settings.mqtt
        return cls(
            ws_port=mqtt.public_ws_port or ws_port if ws_port is not None else None,
            wss_port=mqtt.public_wss_port or wss_port if wss_port is not None else None,
        )
