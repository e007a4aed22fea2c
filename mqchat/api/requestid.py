"""A request id per HTTP request, for the logs (``mqchat.logs.request_id``) and the client.

The client's ``X-Request-ID`` is kept when it looks like an id (a proxy or a client tracing
its own requests), so the same id is in its logs and ours; anything else is replaced by a
fresh one. Either way it comes back in the response's ``X-Request-ID``.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mqchat import logs

HEADER = "X-Request-ID"
_PLAUSIBLE = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
"""Nothing that could forge a log line or a header: no spaces, quotes or control characters."""


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        request_id = given.decode() if _PLAUSIBLE.fullmatch(given) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = logs.request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)
