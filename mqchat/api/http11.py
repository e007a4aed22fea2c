"""uvicorn's h11 protocol with a request-head deadline and a connection cap per listener.

uvicorn 0.54 closes a keep-alive connection that stays idle after a response
(``timeout_keep_alive``), but it sets no timer on a new connection, and every byte that
arrives cancels the keep-alive timer: a connection that sends nothing, or a request head
one byte at a time, is kept open forever (issue 10: 800 such connections were still open
after 90 s, and 1,100 took every file descriptor of a process limited to 1,024).
``limit_concurrency`` answers 503 only once a request arrives, so it does not help either.

Here, on top of uvicorn:

- **head deadline**: from the moment a connection opens, and again from the end of each
  response, the peer has ``header_timeout`` seconds to send a complete request head;
  otherwise the connection is closed. Bytes trickling in do not extend it. Once a head is
  in, there is no deadline on the handler (long-polls wait up to 60 s); the body has its
  own, in ``mqchat.api.limits``.
- **cap**: a listener holding ``max_connections`` connections answers a new one with 503
  and closes it at once, so a flood holds at most that many descriptors.
- its warnings (an unparsable request, a refused connection) are logged at most once per
  10 s each, with a count: a peer must not turn its requests into log lines one for one.

What we use of uvicorn's ``H11Protocol`` (checked by ``tests/api/test_http11.py``, which
names the one missing after an upgrade): ``connection_made``, ``connection_lost``,
``handle_events``, ``on_response_complete``, ``_unsupported_upgrade_warning``, and the
attributes ``conn``, ``cycle``, ``transport``, ``loop``, ``logger``, ``server_state``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, cast

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from mqchat.logthrottle import ThrottleFilter

log = logging.getLogger(__name__)
log.addFilter(ThrottleFilter())

SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 39\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"too many connections; try again shortly"
)


class GuardedH11Protocol(H11Protocol):
    """Use ``configured(...)`` to get a class with the listener's limits."""

    header_timeout: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 10_000
    listener: ClassVar[str] = "http"

    @classmethod
    def configured(cls, *, header_timeout: float, max_connections: int, listener: str) -> type[GuardedH11Protocol]:
        """A subclass for one listener; uvicorn instantiates it per connection
        (``uvicorn.Config(http=...)``)."""
        attributes: dict[str, Any] = {
            "header_timeout": header_timeout,
            "max_connections": max_connections,
            "listener": listener,
        }
        return cast(type[GuardedH11Protocol], type(f"{cls.__name__}_{listener}", (cls,), attributes))

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.logger = log  # also handed to each request cycle, whose ERRORs are never throttled
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.max_connections:
            self._refused = True
            self.transport = transport
            transport.write(SERVICE_UNAVAILABLE)
            transport.close()
            log.warning(
                "%s listener: %d connections open (http.max_connections); refusing new ones with 503",
                self.listener,
                len(self.server_state.connections),
            )
            return
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        if self._refused:
            return  # never counted, no request state
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection is closed: nothing it sends is read
            super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head came in whole: the handler has no deadline
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request already buffered is parsed inside super() and disarms it.
        if not self.transport.is_closing():
            self._arm_head_deadline()
        super().on_response_complete()

    def _unsupported_upgrade_warning(self) -> None:
        # An ``Upgrade`` header on a plain request: served as plain HTTP (the HTTP listener has no
        # WebSocket; MQTT over WebSocket has its own port). uvicorn would log two lines per request.
        pass

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served (a head arrived): not ours to cut
        self.transport.close()  # connection_lost moves h11 to CLOSED
