"""The one error tree of mqchat.

::

    ChatError                      code
    ├── InvalidCommand             invalid_command
    │   ├── InvalidJson            invalid_json
    │   ├── UnknownCommand         unknown_type
    │   ├── PayloadTooLarge        payload_too_large
    │   │   └── FileTooLarge       file_too_large
    │   └── UnsupportedFileType    unsupported_file_type
    ├── NotAuthorized              not_authorized
    │   ├── InvalidCredentials     invalid_credentials
    │   └── InvalidToken           invalid_token
    ├── NotAllowed                 not_allowed
    │   ├── NotAMember             not_a_member
    │   ├── RecallWindowPassed     recall_window_passed
    │   └── RegistrationClosed     registration_closed
    ├── NotFound                   not_found
    │   ├── UnknownRecipient       unknown_recipient
    │   ├── UnknownUser            unknown_user
    │   ├── UnknownGroup           unknown_group
    │   └── UnknownFile            unknown_file
    ├── Conflict                   conflict
    │   ├── UserExists             user_exists
    │   └── GroupFull              group_full
    ├── RateLimited                rate_limited      (carries retry_after, seconds)
    ├── ServerBusy                 server_busy
    └── StorageUnavailable         storage_unavailable

Every error has a stable ``code`` string (part of the protocol contract, see
docs/protocol.md) and an HTTP ``status``. Adapters translate driver exceptions
into these at their boundary; exactly one place maps them to an HTTP response
(``mqchat.api.errors``) and one to the MQTT ``error`` event
(``mqchat.core.protocol.error_event``).
"""

from __future__ import annotations

import math


class ChatError(Exception):
    """Base of every error a client can be told about."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # `ref` echoes the client_msg_id of the command that failed, when known.
        self.ref = ref


class InvalidCommand(ChatError):
    code = "invalid_command"
    status = 422


class InvalidJson(InvalidCommand):
    code = "invalid_json"
    status = 400


class UnknownCommand(InvalidCommand):
    code = "unknown_type"
    status = 422


class PayloadTooLarge(InvalidCommand):
    code = "payload_too_large"
    status = 413


class FileTooLarge(PayloadTooLarge):
    """An upload over ``files.max_bytes``: nothing of it is kept."""

    code = "file_too_large"
    status = 413


class UnsupportedFileType(InvalidCommand):
    """An upload whose bytes are not one of ``files.allowed_types`` (whatever it claims to be)."""

    code = "unsupported_file_type"
    status = 415


class NotAuthorized(ChatError):
    code = "not_authorized"
    status = 401


class InvalidCredentials(NotAuthorized):
    code = "invalid_credentials"


class InvalidToken(NotAuthorized):
    code = "invalid_token"


class NotAllowed(ChatError):
    code = "not_allowed"
    status = 403


class NotAMember(NotAllowed):
    code = "not_a_member"


class RecallWindowPassed(NotAllowed):
    code = "recall_window_passed"


class RegistrationClosed(NotAllowed):
    """``POST /v1/users`` refused: registration is closed, or needs a registration token."""

    code = "registration_closed"


class NotFound(ChatError):
    code = "not_found"
    status = 404


class UnknownRecipient(NotFound):
    code = "unknown_recipient"


class UnknownUser(NotFound):
    code = "unknown_user"


class UnknownGroup(NotFound):
    code = "unknown_group"


class UnknownFile(NotFound):
    """No such file for you: it does not exist, or it is neither yours nor in a conversation of
    yours (the two are not told apart, so file ids cannot be probed)."""

    code = "unknown_file"


class Conflict(ChatError):
    code = "conflict"
    status = 409


class UserExists(Conflict):
    code = "user_exists"


class GroupFull(Conflict):
    code = "group_full"


class RateLimited(ChatError):
    """Too many requests from this client; ``retry_after`` says when one will pass again."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: float, ref: str | None = None) -> None:
        super().__init__(message, ref=ref)
        # Rounded up to the millisecond so that waiting exactly this long is always enough.
        self.retry_after = math.ceil(max(retry_after, 0.001) * 1000) / 1000


class ServerBusy(ChatError):
    """The server refused work to protect itself; the client should retry."""

    code = "server_busy"
    status = 503


class StorageUnavailable(ChatError):
    """The database could not be reached or failed; nothing was stored."""

    code = "storage_unavailable"
    status = 503


ALL_ERRORS: tuple[type[ChatError], ...] = (
    ChatError,
    InvalidCommand,
    InvalidJson,
    UnknownCommand,
    PayloadTooLarge,
    FileTooLarge,
    UnsupportedFileType,
    NotAuthorized,
    InvalidCredentials,
    InvalidToken,
    NotAllowed,
    NotAMember,
    RecallWindowPassed,
    RegistrationClosed,
    NotFound,
    UnknownRecipient,
    UnknownUser,
    UnknownGroup,
    UnknownFile,
    Conflict,
    UserExists,
    GroupFull,
    RateLimited,
    ServerBusy,
    StorageUnavailable,
)
