"""``SyncChatClient``: the asyncio client driven from ordinary (blocking) code.

The ``ChatClient`` lives on an event loop in a background thread; each method hands its
coroutine to that loop and blocks until it is done. Timeouts are applied inside the loop,
so a call that times out is cancelled there too (a send stays in the outbox regardless).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from mqchat.clients.client import ChatClient
from mqchat.clients.gaps import StreamItem
from mqchat.clients.http import Conversation
from mqchat.clients.store import OutboxEntry
from mqchat.core.protocol import Attachment, MessageAck, MsgType, TypingEvent

T = TypeVar("T")


class SyncChatClient:
    """Takes the same arguments as ``ChatClient``::

    with SyncChatClient("alice", password="...", store_path="alice.db") as chat:
        chat.send(to_user="bob", content="hi")
        for event in chat.iter_events(timeout=5):
            print(event)
    """

    def __init__(self, user_id: str, **options: Any) -> None:
        self._user_id = user_id
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: ChatClient | None = None
        self._events: Any = None
        self._typing: Any = None

    def start(self, connect_timeout: float | None = None) -> None:
        """Start the loop thread and the client; with ``connect_timeout``, also wait that long
        for the first connection (``TimeoutError`` if it does not come)."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name=f"mqchat-{self._user_id}", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            self._client = self._call(self._create())
            if connect_timeout is not None:
                self._call(self._client.wait_connected(), connect_timeout)
        except BaseException:
            self.close()
            raise

    async def _create(self) -> ChatClient:
        # Built on the loop thread: the client and its SQLite connection belong to that thread.
        client = ChatClient(self._user_id, **self._options)
        await client.start()
        self._events = client.events()
        self._typing = client.typing_events()
        return client

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if self._client is not None:
                self._call(self._client.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = self._client = None

    def __enter__(self) -> SyncChatClient:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def client(self) -> ChatClient:
        """The underlying ``ChatClient`` (use its coroutines only on its own loop)."""
        if self._client is None:
            raise RuntimeError("the client is not started")
        return self._client

    @property
    def connected(self) -> bool:
        return self.client.connected

    def wait_connected(self, timeout: float | None = None) -> None:
        self._call(self.client.wait_connected(), timeout)

    def send(
        self,
        to_user: str,
        content: str = "",
        *,
        msg_type: MsgType = "text",
        attachment: str | Path | None = None,
        timeout: float | None = None,
    ) -> MessageAck:
        return self._call(self.client.send(to_user, content, msg_type=msg_type, attachment=attachment), timeout)

    def send_to_group(
        self,
        group_id: str,
        content: str = "",
        *,
        msg_type: MsgType = "text",
        attachment: str | Path | None = None,
        timeout: float | None = None,
    ) -> MessageAck:
        call = self.client.send_to_group(group_id, content, msg_type=msg_type, attachment=attachment)
        return self._call(call, timeout)

    def save_attachment(
        self, attachment: Attachment, directory: str | Path = ".", timeout: float | None = None
    ) -> Path:
        return self._call(self.client.save_attachment(attachment, directory), timeout)

    def next_event(self, timeout: float | None = None) -> StreamItem | None:
        """The next stream event (or ``HistoryGap``), or None when none came within ``timeout``
        seconds or the client was closed. Taking an event marks the previous one processed (see
        ``events()``)."""
        try:
            event: StreamItem = self._call(self._events.__anext__(), timeout)
        except (TimeoutError, StopAsyncIteration):
            return None
        return event

    def iter_events(self, timeout: float | None = None) -> Iterator[StreamItem]:
        """Events until none arrives for ``timeout`` seconds (forever with None)."""
        while (event := self.next_event(timeout)) is not None:
            yield event

    def next_typing(self, timeout: float | None = None) -> TypingEvent | None:
        try:
            event: TypingEvent = self._call(self._typing.__anext__(), timeout)
        except (TimeoutError, StopAsyncIteration):
            return None
        return event

    def mark_read(self, message_id: int, timeout: float | None = None) -> None:
        self._call(self.client.mark_read(message_id), timeout)

    def recall(self, message_id: int, timeout: float | None = None) -> None:
        self._call(self.client.recall(message_id), timeout)

    def typing(
        self, *, to_user: str | None = None, group_id: str | None = None, state: Literal["started", "stopped"]
    ) -> bool:
        return self._call(self.client.typing(to_user=to_user, group_id=group_id, state=state))

    def conversations(self, timeout: float | None = None) -> list[Conversation]:
        return self._call(self.client.conversations(), timeout)

    def outbox(self) -> list[OutboxEntry]:
        return self._call(self._outbox())

    async def _outbox(self) -> list[OutboxEntry]:
        return self.client.outbox()

    def _call(self, work: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop is None:
            work.close()
            raise RuntimeError("the client is not started")
        return asyncio.run_coroutine_threadsafe(_bounded(work, timeout), self._loop).result()


async def _bounded(work: Coroutine[Any, Any, T], seconds: float | None) -> T:
    async with asyncio.timeout(seconds):
        return await work
