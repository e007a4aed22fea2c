"""Log output: text or JSON lines, with the node id and what the line is about.

What a line is about travels in context variables, set where it is known and inherited by
every task started from there:

- ``request_id``: each HTTP request (``X-Request-ID`` when the client sends a plausible one,
  else a fresh one; returned in the response header), set by ``mqchat.api.requestid``;
- ``client_id``: the MQTT client id of the connection whose packets are being handled;
- ``command``: the type of the command being handled (``send_message``, ``ack`` ...).

A record may also carry them itself (``extra={"client_id": ...}``), which wins: a line
logged from a timer or a write callback is about its own connection, whatever context
scheduled it.

Never in a line, at any level: tokens, passwords, message bodies. mqchat's own lines do not
contain them; the libraries that would (SQLAlchemy logs statements and result rows,
websockets the frames, amqtt the packets, at DEBUG) are held at WARNING or above whatever
``log_level`` says (``quiet_libraries``). tests/security/test_hygiene.py checks it at DEBUG
in both formats. A stdlib-only leaf module, like ``mqchat.config``.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

request_id: ContextVar[str | None] = ContextVar("mqchat_request_id", default=None)
client_id: ContextVar[str | None] = ContextVar("mqchat_client_id", default=None)
command: ContextVar[str | None] = ContextVar("mqchat_command", default=None)

CONTEXT = ("request_id", "client_id", "command")
_VARS = {"request_id": request_id, "client_id": client_id, "command": command}

QUIET_LIBRARIES = ("amqtt", "transitions", "websockets", "alembic", "sqlalchemy", "asyncpg", "multipart")
"""Loggers kept at WARNING or above: chatty at INFO, and at DEBUG they log SQL result rows
(password hashes, message content), WebSocket frames and MQTT packets."""


class ContextFilter(logging.Filter):
    """Copies the context variables (and the node id) onto each record that lacks them."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        for name, var in _VARS.items():
            if not hasattr(record, name):  # given with extra=..., even as None, it stays
                setattr(record, name, var.get())
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [client_id=... command=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={value}" for name in CONTEXT if (value := getattr(record, name, None)))
        if not context:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{context}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``node``, then
    ``request_id``, ``client_id``, ``command`` when known, and ``exception`` (the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": getattr(record, "node", None),
        }
        for name in CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def handler(log_format: LogFormat, node_id: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (standard error by default) writing ``log_format`` lines."""
    out = logging.StreamHandler(stream if stream is not None else sys.stderr)
    out.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    out.addFilter(ContextFilter(node_id))
    return out


def quiet_libraries() -> None:
    """Hold the libraries of ``QUIET_LIBRARIES`` at WARNING or above (the root level if higher)."""
    level = max(logging.WARNING, logging.getLogger().level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(level)


def configure(level: str, log_format: LogFormat, node_id: str) -> None:
    """The process's logging, for the ``mqchat`` command: one handler on the root logger."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler(log_format, node_id))
    root.setLevel(level.upper())
    quiet_libraries()
