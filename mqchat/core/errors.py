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
    │   ├── RegistrationClosed     registration_closed
    │   ├── AccountDisabled        account_disabled
    │   └── AdminOnly              admin_only
    ├── NotFound                   not_found
    │   ├── UnknownRecipient       unknown_recipient
    │   ├── UnknownUser            unknown_user
    │   ├── UnknownGroup           unknown_group
    │   └── UnknownFile            unknown_file
    ├── Conflict                   conflict
    │   ├── UserExists             user_exists
    │   └── GroupFull              group_full
    ├── RateLimited                rate_limited          retryable, carries retry_after (seconds)
    ├── ServerBusy                 server_busy           retryable
    ├── StorageUnavailable         storage_unavailable   retryable
    └── CursorExpired              cursor_expired        carries oldest_seq, latest_seq

Every error has a stable ``code`` string (part of the protocol contract, see
docs/protocol.md) and an HTTP ``status``. ``retryable`` says whether the same request
(a send with the same ``client_msg_id``) may simply be made again later: nothing was
stored, and the refusal says "not now" rather than "not this"; ``retryable_code`` answers
the same for a code received in an ``error`` event or an HTTP body. Adapters translate driver exceptions
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
    retryable = False

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # `ref` echoes the client_msg_id of the command that failed, when known.
        self.ref = ref

    def for_ref(self, ref: str | None) -> ChatError:
        """The same error for another command (one failed batch answers each sender with its own ref)."""
        clone = type(self).__new__(type(self), *self.args)
        clone.__dict__.update(self.__dict__)
        clone.ref = ref
        return clone


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


class AccountDisabled(NotAllowed):
    """An administrator disabled the account: its password and its tokens are refused."""

    code = "account_disabled"


class AdminOnly(NotAllowed):
    """An administration route, asked for by a user who is not an administrator."""

    code = "admin_only"


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
    retryable = True

    def __init__(self, message: str, *, retry_after: float, ref: str | None = None) -> None:
        super().__init__(message, ref=ref)
        # Rounded up to the millisecond so that waiting exactly this long is always enough.
        self.retry_after = math.ceil(max(retry_after, 0.001) * 1000) / 1000


class ServerBusy(ChatError):
    """The server refused work to protect itself; the client should retry."""

    code = "server_busy"
    status = 503
    retryable = True


class StorageUnavailable(ChatError):
    """The database could not be reached or failed; nothing was stored."""

    code = "storage_unavailable"
    status = 503
    retryable = True


class CursorExpired(ChatError):
    """Events after the seq a device asked from were deleted by retention (``retention.days``).

    The device must reset: everything from ``oldest_seq`` (the oldest seq still kept) to
    ``latest_seq`` can be read, nothing before it. The two are None only when rebuilt by a
    client from a bare code."""

    code = "cursor_expired"
    status = 410

    def __init__(
        self,
        message: str,
        *,
        oldest_seq: int | None = None,
        latest_seq: int | None = None,
        ref: str | None = None,
    ) -> None:
        super().__init__(message, ref=ref)
        self.oldest_seq = oldest_seq
        self.latest_seq = latest_seq


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
    AccountDisabled,
    AdminOnly,
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
    CursorExpired,
)

_RETRYABLE_CODES = frozenset(error.code for error in ALL_ERRORS if error.retryable)


def retryable_code(code: str) -> bool:
    """Whether an error with this code (from an ``error`` event or an HTTP error body) means
    "not now": nothing was stored, and the same request may be made again later."""
    return code in _RETRYABLE_CODES
