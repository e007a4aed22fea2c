"""The few HTTP API calls the SDK needs, over ``urllib`` in a worker thread (no extra dependency)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqchat.clients.errors import ApiUnavailable, chat_error
from mqchat.core.errors import ChatError
from mqchat.core.origin import decode_key
from mqchat.core.protocol import Attachment

_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message as history and conversation summaries show it."""

    server_msg_id: int
    client_msg_id: str
    from_user: str
    to_user: str | None
    group_id: str | None
    content: str | None
    """None for a recalled message."""
    msg_type: str
    created_at: str
    recalled_at: str | None
    attachment: Attachment | None = None
    """The file the message carries (``ChatClient.save_attachment`` downloads it)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(
            server_msg_id=int(data["server_msg_id"]),
            client_msg_id=str(data["client_msg_id"]),
            from_user=str(data["from_user"]),
            to_user=data.get("to_user"),
            group_id=data.get("group_id"),
            content=data.get("content"),
            msg_type=str(data["msg_type"]),
            created_at=str(data["created_at"]),
            recalled_at=data.get("recalled_at"),
            attachment=Attachment.model_validate(data["attachment"]) if data.get("attachment") else None,
        )


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    """``user:{peer}`` or ``group:{group_id}``."""
    name: str | None
    unread_count: int
    last_message: Message | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        last = data.get("last_message")
        return cls(
            conversation_id=str(data["conversation_id"]),
            name=data.get("name"),
            unread_count=int(data["unread_count"]),
            last_message=Message.from_json(last) if last else None,
        )


@dataclass(frozen=True, slots=True)
class Group:
    group_id: str
    name: str
    owner: str
    members: tuple[str, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Group:
        return cls(str(data["group_id"]), str(data["name"]), str(data["owner"]), tuple(data["members"]))


@dataclass(frozen=True, slots=True)
class Session:
    """What a login gives: the access token, and the user's event key (docs/protocol.md,
    "Event signatures"); None from a server that does not sign events."""

    token: str
    event_key: bytes | None


class HttpApi:
    """``base_url`` like ``http://127.0.0.1:8080``; ``ssl_context`` is used for ``https``."""

    def __init__(self, base_url: str, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._ssl = ssl_context
        self._timeout = timeout

    async def register(self, user_id: str, password: str) -> None:
        await self.request("POST", "/v1/users", body={"user_id": user_id, "password": password})

    async def login(self, user_id: str, password: str, *, device_id: str | None = None) -> str:
        """An access token for the user (``POST /v1/token``); with ``device_id``, one that only
        that device may use (a server that predates device scopes ignores the field)."""
        return (await self.session(user_id, password, device_id=device_id)).token

    async def session(self, user_id: str, password: str, *, device_id: str | None = None) -> Session:
        """``login()``, with the user's event key that comes with the token."""
        body = {"user_id": user_id, "password": password} | ({"device_id": device_id} if device_id else {})
        answer = await self.request("POST", "/v1/token", body=body)
        key = answer.get("event_key")
        return Session(str(answer["access_token"]), decode_key(str(key)) if key else None)

    async def event_key(self, token: str) -> bytes:
        """The key that verifies the ``sig`` of the user's events (``GET /v1/event-key``)."""
        answer = await self.request("GET", "/v1/event-key", token=token)
        try:
            return decode_key(str(answer["event_key"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiUnavailable(f"GET /v1/event-key gave no usable key: {answer!r:.200}") from exc

    async def conversations(self, token: str, limit: int = 100) -> list[Conversation]:
        answer = await self.request("GET", f"/v1/conversations?limit={limit}", token=token)
        return [Conversation.from_json(item) for item in answer["conversations"]]

    async def groups(self, token: str) -> list[Group]:
        """The groups the user is an active member of (``GET /v1/groups``)."""
        answer = await self.request("GET", "/v1/groups", token=token)
        return [Group.from_json(item) for item in answer["groups"]]

    async def history(
        self, token: str, conversation_id: str, *, limit: int = 50, before_id: int | None = None
    ) -> list[Message]:
        """A page of a conversation, newest first."""
        query = {"limit": str(limit)} | ({"before_id": str(before_id)} if before_id is not None else {})
        path = f"/v1/conversations/{urllib.parse.quote(conversation_id)}/messages?{urllib.parse.urlencode(query)}"
        answer = await self.request("GET", path, token=token)
        return [Message.from_json(item) for item in answer["messages"]]

    async def upload(self, token: str, path: Path, *, name: str | None = None) -> Attachment:
        """Upload a file (``POST /v1/files``), streamed from disk; its id goes in a message's
        ``attachment``. The server refuses a file too large (``FileTooLarge``) or of a type it
        does not take (``UnsupportedFileType``)."""
        return Attachment.model_validate(await asyncio.to_thread(self._upload, token, Path(path), name))

    def _upload(self, token: str, path: Path, name: str | None) -> Any:
        boundary = secrets.token_hex(16)
        filename = (name or path.name).replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = path.stat().st_size

        def body() -> Iterator[bytes]:
            yield head
            with path.open("rb") as fh:
                while piece := fh.read(_CHUNK):
                    yield piece
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + size + len(tail)),
        }
        return self._exchange("POST", "/v1/files", body(), headers, token)

    async def download(self, token: str, file_id: str, target: Path) -> Path:
        """Save a file (``GET /v1/files/{id}``) as ``target``: written beside it under a
        temporary name and renamed when whole, so ``target`` never holds part of a file."""
        return await asyncio.to_thread(self._download, token, file_id, Path(target))

    def _download(self, token: str, file_id: str, target: Path) -> Path:
        path = f"/v1/files/{urllib.parse.quote(file_id, safe='')}"
        request = urllib.request.Request(
            self.base_url + path, headers={"Authorization": f"Bearer {token}"}, method="GET"
        )
        staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            with (
                urllib.request.urlopen(request, timeout=self._timeout, context=self._ssl) as response,
                staging.open("xb") as out,
            ):
                while piece := response.read(_CHUNK):
                    out.write(piece)
            os.replace(staging, target)
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiUnavailable(f"GET {self.base_url}{path}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        return target

    async def request(self, method: str, path: str, *, body: Any = None, token: str | None = None) -> Any:
        """The decoded JSON answer. Raises the server's typed ``ChatError`` for an error answer
        and ``ApiUnavailable`` when the server cannot be reached."""
        return await asyncio.to_thread(self._request, method, path, body, token)

    def _request(self, method: str, path: str, body: Any, token: str | None) -> Any:
        headers: dict[str, str] = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return self._exchange(method, path, data, headers, token)

    def _exchange(
        self, method: str, path: str, data: bytes | Iterator[bytes] | None, headers: dict[str, str], token: str | None
    ) -> Any:
        headers = {"Accept": "application/json", **headers}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._ssl) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
            raise ApiUnavailable(f"{method} {self.base_url}{path}: {exc}") from exc
        return json.loads(raw) if raw else None


def _error_from(exc: urllib.error.HTTPError) -> ChatError:
    try:
        error = json.loads(exc.read())["error"]
        retry_after = error.get("retry_after")
        retry_after = float(retry_after) if isinstance(retry_after, int | float) else None
        seqs = {name: error[name] for name in ("oldest_seq", "latest_seq") if isinstance(error.get(name), int)}
        return chat_error(str(error["code"]), str(error["message"]), retry_after=retry_after, **seqs)
    except (ValueError, KeyError, TypeError, OSError):
        return chat_error("internal_error" if exc.code >= 500 else "invalid_command", f"HTTP {exc.code}: {exc.reason}")
