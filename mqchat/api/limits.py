"""HTTP request body size and time limits, enforced before the app reads the body."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mqchat.api.errors import error_body


class BodySizeLimit:
    """413 ``payload_too_large`` for a body over ``max_bytes``; 408 ``request_timeout`` for a
    body that has not arrived whole within ``timeout`` seconds of the request head.

    A ``Content-Length`` over the limit is refused without reading anything. A body
    without one (chunked) is read up to the limit and no further, then handed to the
    app from memory: our bodies are small, and refusing half-way through the app's
    own read would surface as a 500 instead of a 413. Reading it here, under one deadline,
    also means no handler ever waits on a client that trickles its body (the request head
    has its own deadline, in ``mqchat.api.http11``).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout: float = 30.0, streamed: dict[str, int] | None = None
    ) -> None:
        self._app = app
        self._max = max_bytes
        self._timeout = timeout
        self._streamed = streamed or {}
        """Paths whose handler reads the body as it comes, with its own limits (uploads):
        only a declared ``Content-Length`` over their limit is refused here."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        streamed_max = self._streamed.get(scope["path"]) if scope.get("method") == "POST" else None
        if streamed_max is not None:
            if declared is not None and (not declared.isdigit() or int(declared) > streamed_max):
                await self._refuse(scope, receive, send, limit=streamed_max)
                return
            await self._app(scope, receive, send)
            return
        if declared is not None and (not declared.isdigit() or int(declared) > self._max):
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            async with asyncio.timeout(self._timeout):
                too_large = await self._read(messages, receive)
        except TimeoutError:
            body = error_body("request_timeout", f"the request body did not arrive within {self._timeout:g} s")
            await JSONResponse(body, status_code=408, headers={"Connection": "close"})(scope, receive, send)
            return
        if too_large:
            try:
                async with asyncio.timeout(self._timeout):
                    drained = await _drain(messages[-1], receive)
            except TimeoutError:
                drained = False
            await self._refuse(scope, receive, send, drained=drained)
            return
        await self._app(scope, _replay(messages, receive), send)

    async def _read(self, messages: list[Message], receive: Receive) -> bool:
        """The body into ``messages``, up to the limit; True if it went over."""
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return False  # the client went away: let the app see it
            size += len(message.get("body", b""))
            if size > self._max:
                return True
            if not message.get("more_body", False):
                return False

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, *, drained: bool = False, limit: int | None = None
    ) -> None:
        if limit is not None:
            body = error_body("file_too_large", f"the upload is larger than {limit} bytes (files.max_bytes)")
        else:
            body = error_body("payload_too_large", f"the request body is larger than {self._max} bytes")
        # Unless the rest of the body was read, the connection cannot carry another request.
        headers = None if drained else {"Connection": "close"}
        await JSONResponse(body, status_code=413, headers=headers)(scope, receive, send)


async def _drain(message: Message, receive: Receive) -> bool:
    """Read and drop the rest of a refused body, up to ``_DRAIN_CAP`` bytes.

    Closing on a client that is still sending makes its TCP stack reset the connection,
    and the reset destroys the 413 before the client reads it. True if all was read.
    """
    dropped = 0
    while message.get("more_body", False):
        if dropped > _DRAIN_CAP:
            return False
        message = await receive()
        if message["type"] != "http.request":
            return False
        dropped += len(message.get("body", b""))
    return True


_DRAIN_CAP = 1024 * 1024


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """The buffered body first, then the real channel (for the disconnect a long-poll waits on)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
