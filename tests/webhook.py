"""A webhook receiver for push tests: a plain asyncio HTTP/1.1 server that records every POST
and answers each as its script says: ``ok`` (204), ``fail`` (500) or ``hang`` (never answers,
so the sender times out)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Answer = Literal["ok", "fail", "hang"]


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float
    answer: Answer

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def signed_with(self, secret: str) -> bool:
        expected = hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-mqchat-signature", ""), expected)


@dataclass
class Receiver:
    script: Callable[[Delivery], Answer] = lambda _: "ok"
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.answer == "ok"]

    async def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.arrived.clear()
                await self.arrived.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                delivery = Delivery(headers, body, time.monotonic(), "ok")
                delivery.answer = self.script(delivery)
                self.deliveries.append(delivery)
                self.arrived.set()
                if delivery.answer == "hang":
                    await asyncio.sleep(3600)
                status = b"204 No Content" if delivery.answer == "ok" else b"500 Internal Server Error"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.handlers.discard(task)
            writer.close()


@contextlib.asynccontextmanager
async def webhook_receiver(script: Callable[[Delivery], Answer] | None = None) -> AsyncIterator[Receiver]:
    receiver = Receiver() if script is None else Receiver(script)
    server = await asyncio.start_server(receiver._handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()
        for task in list(receiver.handlers):
            task.cancel()
        await asyncio.gather(*receiver.handlers, return_exceptions=True)
