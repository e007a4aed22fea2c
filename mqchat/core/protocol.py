"""Protocol v1 envelopes, sans-IO: bytes in, typed commands out; typed events in, bytes out.

The broker, the HTTP API, the clients and the tests all go through this
module, so every field is defined exactly once. docs/protocol.md is the prose
version of this file and must stay in step with it.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from mqchat.core.errors import (
    ChatError,
    CursorExpired,
    InvalidCommand,
    InvalidJson,
    PayloadTooLarge,
    RateLimited,
    UnknownCommand,
)
from mqchat.core.ids import ID_PATTERN

PROTOCOL_VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_CONTENT_CHARS = 16_000
MAX_CLIENT_MSG_ID = 64
SYNC_DEFAULT_LIMIT = 100
SYNC_MAX_LIMIT = 500


def storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and a lone surrogate (legal as a JSON escape)
    # cannot be encoded as UTF-8: refuse both here, not in the database.
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (no lone surrogates)") from exc
    return text


UserIdStr = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN}$")]
"""A user, group or device id in an envelope or an HTTP body (the pattern of ``core.ids``)."""
ClientMsgId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLIENT_MSG_ID), AfterValidator(storable)]
Content = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTENT_CHARS), AfterValidator(storable)]
Caption = Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS), AfterValidator(storable)]
"""The content of a message that carries an attachment: it may be empty."""
FileId = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN}$")]
MsgType = Literal["text", "image", "video", "file"]
Seq = Annotated[int, Field(ge=0, le=2**62)]


def one_target(to_user: str | None, group_id: str | None) -> None:
    """A send over HTTP and a ``typing`` name one recipient or one group: never both, never neither."""
    if (to_user is None) == (group_id is None):
        raise ValueError("give exactly one of to_user and group_id")


class _Envelope(BaseModel):
    # Unknown fields are ignored so that newer clients can talk to older servers.
    # Strict: a seq sent as "7" is a client bug worth reporting, not something to guess at.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


# ---------------------------------------------------------------- commands


class _Send(_Envelope):
    client_msg_id: ClientMsgId
    content: Caption = ""
    msg_type: MsgType = "text"
    attachment: FileId | None = None
    """The id of a file the sender uploaded (``POST /v1/files``); then ``content`` may be empty."""

    @model_validator(mode="after")
    def _content_or_attachment(self) -> _Send:
        if not self.content and self.attachment is None:
            raise ValueError("content: give a non-empty content, or an attachment")
        return self


class SendMessage(_Send):
    type: Literal["send_message"] = "send_message"
    to_user: UserIdStr


class SendGroupMessage(_Send):
    type: Literal["send_group_message"] = "send_group_message"
    group_id: UserIdStr


class SyncMessages(_Envelope):
    type: Literal["sync_messages"] = "sync_messages"
    since_seq: Seq = 0
    limit: Annotated[int, Field(ge=1, le=SYNC_MAX_LIMIT)] = SYNC_DEFAULT_LIMIT


class Ack(_Envelope):
    """The device has every event of its stream up to ``seq``: its cursor."""

    type: Literal["ack"] = "ack"
    seq: Seq


class MarkAsRead(_Envelope):
    """The message and everything before it in its conversation are read."""

    type: Literal["mark_as_read"] = "mark_as_read"
    message_id: Annotated[int, Field(ge=1, le=2**62)]


class RecallMessage(_Envelope):
    type: Literal["recall_message"] = "recall_message"
    message_id: Annotated[int, Field(ge=1, le=2**62)]


class Typing(_Envelope):
    """Ephemeral: relayed to the peer or the group topic, never stored. Exactly one target."""

    type: Literal["typing"] = "typing"
    to_user: UserIdStr | None = None
    group_id: UserIdStr | None = None
    state: Literal["started", "stopped"]

    @model_validator(mode="after")
    def _one_target(self) -> Typing:
        one_target(self.to_user, self.group_id)
        return self


Command = SendMessage | SendGroupMessage | SyncMessages | Ack | MarkAsRead | RecallMessage | Typing

COMMANDS: dict[str, type[Command]] = {
    "send_message": SendMessage,
    "send_group_message": SendGroupMessage,
    "sync_messages": SyncMessages,
    "ack": Ack,
    "mark_as_read": MarkAsRead,
    "recall_message": RecallMessage,
    "typing": Typing,
}


def parse_command(payload: bytes | bytearray | str, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Command:
    """Turn a published payload into a command or raise a typed ``InvalidCommand``."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        # pydantic-core's parser (Rust) on the hot path: every command a device publishes
        # comes through here.
        data = pydantic_core.from_json(bytes(payload))
    except ValueError:
        # It also refuses JSON that the standard library reads (a lone surrogate escape): let
        # that one decide, so that a readable command is refused by its own validation,
        # naming the message (its ``ref``).
        try:
            data = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidJson(f"payload is not UTF-8 JSON: {exc}") from exc
    return command_from_dict(data)


def command_from_dict(data: Any) -> Command:
    if not isinstance(data, dict):
        raise InvalidCommand("payload must be a JSON object with a 'type'")
    ref = _echoable(data.get("client_msg_id"))
    kind = data.get("type")
    model = COMMANDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnknownCommand(f"unknown command type {kind!r}; expected one of {sorted(COMMANDS)}", ref=ref)
    try:
        command: Command = model.model_validate(data)
    except ValidationError as exc:
        raise InvalidCommand(_describe(exc), ref=ref) from exc
    return command


def _echoable(ref: Any) -> str | None:
    """A client_msg_id that can go back in an error's ``ref``: one that could be stored.

    A lone surrogate (legal as a JSON escape) cannot be encoded: echoing it made the error
    itself fail to encode, so the device got no answer at all."""
    if not isinstance(ref, str) or len(ref) > MAX_CLIENT_MSG_ID:
        return None
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return ref


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"


# ------------------------------------------------------------------ events


@functools.lru_cache(maxsize=4096)
def format_time(moment: datetime) -> str:
    """UTC, ISO 8601 with milliseconds and a ``Z``, e.g. ``2026-01-15T10:30:00.123Z``.

    Cached: a message is rendered once per recipient stream (500 times for a large group).
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MessageAck(_Envelope):
    """Sent to the sending device only after the message is durably stored."""

    type: Literal["message_ack"] = "message_ack"
    client_msg_id: str
    server_msg_id: int
    seq: int
    status: Literal["sent"] = "sent"
    created_at: str
    duplicate: bool = False


class Attachment(_Envelope):
    """A file a message carries (``GET /v1/files/{id}`` downloads it). ``width`` and ``height``
    only for images."""

    id: str
    name: str
    size: int
    content_type: str
    width: int | None = None
    height: int | None = None


class NewMessage(_Envelope):
    """A message in a stream. 1:1 messages carry ``to_user``, group messages ``group_id``.

    A recalled message is served as a tombstone: no ``content`` and no ``attachment``, with
    ``recalled_at``.
    """

    type: Literal["new_message"] = "new_message"
    seq: int
    server_msg_id: int
    client_msg_id: str
    from_user: str
    to_user: str | None = None
    group_id: str | None = None
    content: str | None = None
    msg_type: MsgType
    created_at: str
    recalled_at: str | None = None
    attachment: Attachment | None = None


GroupAction = Literal["created", "member_added", "member_removed", "member_left"]


class GroupUpdated(_Envelope):
    type: Literal["group_updated"] = "group_updated"
    seq: int
    group_id: str
    action: GroupAction
    user_id: str
    by: str


class MessageDelivered(_Envelope):
    """Watermark: everything up to ``message_id`` in the conversation reached a device of ``delivered_to``."""

    type: Literal["message_delivered"] = "message_delivered"
    seq: int
    message_id: int
    conversation_id: str
    delivered_to: str
    delivered_at: str


class MessageRead(_Envelope):
    type: Literal["message_read"] = "message_read"
    seq: int
    message_id: int
    conversation_id: str
    read_by: str
    read_at: str


class ReadMarker(_Envelope):
    """The stream owner has read ``conversation_id`` up to ``message_id`` (on some device)."""

    type: Literal["read_marker"] = "read_marker"
    seq: int
    message_id: int
    conversation_id: str
    read_at: str


class MessageRecalled(_Envelope):
    type: Literal["message_recalled"] = "message_recalled"
    seq: int
    message_id: int
    conversation_id: str
    recalled_by: str
    recalled_at: str


AnyStreamEvent = NewMessage | GroupUpdated | MessageDelivered | MessageRead | ReadMarker | MessageRecalled
StreamEvent = Annotated[
    NewMessage | GroupUpdated | MessageDelivered | MessageRead | ReadMarker | MessageRecalled,
    Field(discriminator="type"),
]
STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "new_message": NewMessage,
    "group_updated": GroupUpdated,
    "message_delivered": MessageDelivered,
    "message_read": MessageRead,
    "read_marker": ReadMarker,
    "message_recalled": MessageRecalled,
}


class SyncResponse(_Envelope):
    type: Literal["sync_response"] = "sync_response"
    events: list[StreamEvent]
    latest_seq: int
    has_more: bool


class ErrorEvent(_Envelope):
    type: Literal["error"] = "error"
    code: str
    message: str
    ref: str | None = None
    retry_after: float | None = None
    """Seconds to wait before retrying; only with ``rate_limited`` (absent otherwise)."""
    oldest_seq: int | None = None
    """Only with ``cursor_expired``: the oldest seq the stream still holds (absent otherwise)."""
    latest_seq: int | None = None
    """Only with ``cursor_expired``: the head of the stream (absent otherwise)."""


class TypingEvent(_Envelope):
    """Ephemeral (no ``seq``): on the peer's stream topic or on the group topic."""

    type: Literal["typing"] = "typing"
    from_user: str
    to_user: str | None = None
    group_id: str | None = None
    state: Literal["started", "stopped"]


class Presence(_Envelope):
    """Retained on ``chat/presence/{user_id}``."""

    user_id: str
    status: Literal["online", "offline"]
    last_seen: str | None = None


Event = (
    MessageAck
    | NewMessage
    | GroupUpdated
    | MessageDelivered
    | MessageRead
    | ReadMarker
    | MessageRecalled
    | SyncResponse
    | ErrorEvent
    | TypingEvent
)

EVENTS: dict[str, type[Event]] = {
    "message_ack": MessageAck,
    **STREAM_EVENTS,  # type: ignore[dict-item]
    "sync_response": SyncResponse,
    "error": ErrorEvent,
    "typing": TypingEvent,
}

# Optional fields that are absent rather than null on the wire (a group message has no
# to_user, a live message no recalled_at).
_OMIT_NONE = (NewMessage, SyncResponse, TypingEvent)


_ERROR_EXTRAS = ("retry_after", "oldest_seq", "latest_seq")


def encode_event(event: Event | Presence) -> bytes:
    if isinstance(event, ErrorEvent):
        # ``ref`` stays (null when unknown) as it always has; the extras only when they mean something.
        return event.model_dump_json(exclude={name for name in _ERROR_EXTRAS if getattr(event, name) is None}).encode()
    return event.model_dump_json(exclude_none=isinstance(event, _OMIT_NONE)).encode()


def decode_event(payload: bytes | str) -> Event:
    """Parse an event sent by a server (for clients and tests)."""
    data = json.loads(payload)
    kind = data.get("type") if isinstance(data, dict) else None
    model = EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnknownCommand(f"unknown event type {kind!r}")
    event: Event = model.model_validate(data)
    return event


def error_event(error: ChatError) -> ErrorEvent:
    """The one mapping from a ``ChatError`` to the MQTT ``error`` event."""
    retry_after = error.retry_after if isinstance(error, RateLimited) else None
    # Whatever a client sent, its error must encode: no text from it may break the reply.
    message = error.message.encode("utf-8", "replace").decode("utf-8")
    expired = error if isinstance(error, CursorExpired) else None
    return ErrorEvent(
        code=error.code,
        message=message,
        ref=_echoable(error.ref),
        retry_after=retry_after,
        oldest_seq=expired.oldest_seq if expired else None,
        latest_seq=expired.latest_seq if expired else None,
    )
