"""Helpers for the SDK tests: clients with fast back-off, and reading their event streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mqchat.clients import Backoff, ChatClient
from mqchat.core.protocol import AnyStreamEvent, NewMessage

FAST = Backoff(initial=0.05, maximum=0.5)
E = TypeVar("E")


def make_client(
    user_id: str,
    store_path: Path,
    *,
    token: str | None = None,
    password: str | None = None,
    mqtt_port: int,
    http_port: int = 1,
    **options: Any,
) -> ChatClient:
    return ChatClient(
        user_id,
        token=token,
        password=password,
        host="127.0.0.1",
        mqtt_port=mqtt_port,
        http_port=http_port,
        store_path=store_path,
        **({"backoff": FAST, "probe_interval": 3.0} | options),
    )


class Server(Protocol):
    """The in-process server (``RunningServer``) or a server process: what clients need."""

    @property
    def mqtt_port(self) -> int: ...
    @property
    def ws_port(self) -> int: ...
    @property
    def http_port(self) -> int: ...


def client_for(server: Server, user_id: str, token: str, tmp_path: Path, **options: Any) -> ChatClient:
    """A client of ``server``, its SQLite file named after the user (and device)."""
    name = f"{user_id}-{options.get('device_id', 'sdk')}.sqlite3"
    return make_client(
        user_id, tmp_path / name, token=token, mqtt_port=server.mqtt_port, http_port=server.http_port, **options
    )


@contextlib.asynccontextmanager
async def started(*clients: ChatClient, connect_within: float = 15) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        async with asyncio.timeout(connect_within):
            for client in clients:
                await client.wait_connected()
        yield


async def next_of(events: AsyncIterator[Any], kind: type[E], timeout: float = 15) -> E:
    """The next event of type ``kind`` (others are skipped, and count as processed)."""
    async with asyncio.timeout(timeout):
        while True:
            event = await anext(events)
            if isinstance(event, kind):
                return event


async def messages(events: AsyncIterator[AnyStreamEvent], count: int, timeout: float = 30) -> list[NewMessage]:
    return [await next_of(events, NewMessage, timeout) for _ in range(count)]


async def quiet(events: AsyncIterator[AnyStreamEvent], seconds: float = 0.5) -> list[AnyStreamEvent]:
    """Everything that arrives within ``seconds`` (used to show that nothing more comes)."""
    got: list[AnyStreamEvent] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                got.append(await anext(events))
    return got


class EventLog:
    """What an application does: consume ``events()`` continuously (so each event is
    committed and acked right away) into a queue the test reads from."""

    def __init__(self, client: ChatClient) -> None:
        self.queue: asyncio.Queue[AnyStreamEvent] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(client))

    async def _pump(self, client: ChatClient) -> None:
        async for event in client.events():
            self.queue.put_nowait(event)

    async def next(self, kind: type[E], timeout: float = 15) -> E:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                if isinstance(event, kind):
                    return event

    async def messages(self, count: int, timeout: float = 30) -> list[NewMessage]:
        return [await self.next(NewMessage, timeout) for _ in range(count)]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def event_log(client: ChatClient) -> AsyncIterator[EventLog]:
    log = EventLog(client)
    try:
        yield log
    finally:
        await log.close()


async def until(condition: Callable[[], object], timeout: float = 15, every: float = 0.01) -> None:
    """Wait for ``condition()`` to hold: client state such as the outbox has no event to await."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(every)
