"""Errors raised by the client SDK.

Rejections by the server are the protocol's own typed errors from ``mqchat.core.errors``
(``UnknownRecipient``, ``NotAMember`` ...), rebuilt from the ``code`` of an ``error`` event or
an HTTP error body, so an application catches the same classes the server raises. What can
only go wrong on the client side has its own small tree::

    ClientError
    ├── ClientClosed       the client was closed (or never started)
    ├── LoginFailed        the credentials or the token were refused: retrying will not help
    ├── ApiUnavailable     the HTTP API could not be reached (retried by the client)
    └── StoreInUse         another process has the local SQLite file open
"""

from __future__ import annotations

from mqchat.core.errors import ALL_ERRORS, ChatError, CursorExpired, RateLimited

_BY_CODE: dict[str, type[ChatError]] = {error.code: error for error in ALL_ERRORS}


class ClientError(Exception):
    """Base of the errors that the SDK raises on its own account."""


class ClientClosed(ClientError):
    pass


class LoginFailed(ClientError):
    """The server refused who we say we are. ``cause`` is the server's error, when it sent one."""

    def __init__(self, message: str, cause: ChatError | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class ApiUnavailable(ClientError):
    pass


class StoreInUse(ClientError):
    pass


def chat_error(
    code: str,
    message: str,
    ref: str | None = None,
    *,
    retry_after: float | None = None,
    oldest_seq: int | None = None,
    latest_seq: int | None = None,
) -> ChatError:
    """The ``ChatError`` subclass for a protocol error code (plain ``ChatError`` for unknown codes)."""
    cls = _BY_CODE.get(code)
    if cls is RateLimited:
        # The server always says when; a second is the guess for a body that does not.
        return RateLimited(message, retry_after=1.0 if retry_after is None else retry_after, ref=ref)
    if cls is CursorExpired:
        return CursorExpired(message, oldest_seq=oldest_seq, latest_seq=latest_seq, ref=ref)
    if cls is not None:
        return cls(message, ref=ref)
    error = ChatError(message, ref=ref)
    error.code = code  # a newer server's code: keep it visible to the application
    return error
