"""A TCP proxy a test can break: between one cluster node and Redis, so that node alone loses it.

- ``cut()``: every connection through it is reset and the port is closed (new connects are
  refused) until ``restore()`` listens on the same port again;
- ``black_hole()``: connections stay open, new ones are accepted, and every byte in either
  direction is dropped, with no error on either side: a silent network partition, which only a
  timeout or the node's probe can notice. After ``restore()`` bytes flow again on the same
  connections (what was dropped stays lost).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

from tests.support.ports import free_port

Mode = Literal["forward", "black_hole"]


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.mode: Mode = "forward"
        self.dropped = 0
        """Bytes dropped by the black hole so far."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Reset every connection and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def black_hole(self) -> None:
        self.mode = "black_hole"

    async def restore(self) -> None:
        self.mode = "forward"
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}
        for reader, writer, peer in (
            (client_reader, upstream_writer, client_writer),
            (upstream_reader, client_writer, upstream_writer),
        ):
            task = asyncio.create_task(self._pipe(reader, writer, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.mode == "black_hole":
                    self.dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        # One side ended: end the other too, as a TCP connection through a router would.
        for end in (writer, peer):
            end.close()
            self._writers.discard(end)
