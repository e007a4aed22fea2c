"""HTTP connection limits (issue 10): head and body deadlines, keep-alive, a connection cap per
listener, forwarded headers only from trusted proxies, and no log line per bad request.

Real server, raw sockets where a client library would hide what the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqchat.config import AuthSettings, HttpSettings, Settings
from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register

FAST = {"header_timeout_seconds": 1.0, "keepalive_timeout_seconds": 1, "body_timeout_seconds": 1.0}
"""Short deadlines, so a test waits about a second for each."""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"  # what is tested here is the HTTP layer


@pytest.fixture
def http_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def settings(settings: Settings, http_overrides: dict[str, Any]) -> Settings:
    http = HttpSettings(**{**settings.http.model_dump(), **FAST, **http_overrides})
    auth = AuthSettings(login_max_failures_per_ip=3)
    return settings.model_copy(update={"http": http, "auth": auth})


@contextlib.asynccontextmanager
async def raw_http(server: RunningServer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """Everything the server sends until it closes; None if it is still open after ``timeout``."""
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def request(path: str = "/healthz") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server: RunningServer) -> None:
    async with raw_http(server) as (reader, _):
        started = time.monotonic()
        assert await read_until_closed(reader, timeout=6) == b""
        assert 0.8 <= time.monotonic() - started < 5


async def test_a_request_head_trickled_in_is_closed_at_the_deadline(server: RunningServer) -> None:
    """Each byte arriving used to cancel uvicorn's only timer: a slowloris kept its connection forever."""
    async with raw_http(server) as (reader, writer):
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = asyncio.create_task(read_until_closed(reader, timeout=6))
        with contextlib.suppress(OSError):
            while not closed.done():
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
        assert await closed == b""  # closed, and no response to the unfinished request
        assert time.monotonic() - started < 5


async def test_an_idle_keep_alive_connection_is_closed_and_so_is_a_trickled_next_request(
    server: RunningServer,
) -> None:
    async with raw_http(server) as (reader, writer):
        writer.write(request())
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert await read_until_closed(reader, timeout=6) == b""
        assert time.monotonic() - started < 5
    async with raw_http(server) as (reader, writer):
        writer.write(request())
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        closed = asyncio.create_task(read_until_closed(reader, timeout=6))
        with contextlib.suppress(OSError):
            for byte in request():  # the next request, one byte every 0.2 s: would take ~8 s
                if closed.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)
        assert await closed == b""


async def test_a_body_trickled_in_gets_408(server: RunningServer) -> None:
    async with raw_http(server) as (reader, writer):
        writer.write(
            b"POST /v1/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n{"
        )
        started = time.monotonic()
        response = await read_until_closed(reader, timeout=6)
        assert response is not None and response.startswith(b"HTTP/1.1 408"), response
        assert b'"request_timeout"' in response
        assert time.monotonic() - started < 5


async def test_a_long_poll_outlives_the_deadlines_and_its_connection_is_reused(server: RunningServer) -> None:
    token = await register(server, "alice")
    async with http_client(server, token) as http:
        started = time.monotonic()
        polled = await http.get("/v1/sync/long-poll", params={"timeout": 3})
        assert polled.status_code == 200, polled.text
        assert time.monotonic() - started >= 2.9
        assert (await http.get("/v1/sync/long-poll", params={"timeout": 2})).status_code == 200


@pytest.mark.parametrize("http_overrides", [{"max_connections": 20, "header_timeout_seconds": 30}])
async def test_connections_beyond_the_cap_get_503_at_once_and_the_rest_are_served(server: RunningServer) -> None:
    async with contextlib.AsyncExitStack() as stack:
        idle = [await stack.enter_async_context(raw_http(server)) for _ in range(20)]
        await asyncio.sleep(0.5)  # let the server accept all 20
        async with raw_http(server) as (reader, _):
            refused = await read_until_closed(reader, timeout=2)
        assert refused is not None and refused.startswith(b"HTTP/1.1 503"), refused
        for _, writer in idle[:5]:
            writer.close()
        await asyncio.sleep(0.5)
        async with http_client(server) as http:
            assert (await http.get("/healthz")).status_code == 200


async def failed_logins(server: RunningServer, forwarded_for: list[str | None]) -> list[int]:
    statuses = []
    async with http_client(server) as http:
        for n, address in enumerate(forwarded_for):
            headers = {"X-Forwarded-For": address} if address else {}
            body = {"user_id": f"nobody{n}", "password": "wrong-password"}
            statuses.append((await http.post("/v1/token", json=body, headers=headers)).status_code)
    return statuses


async def test_forwarded_for_is_ignored_without_trusted_proxies(server: RunningServer) -> None:
    """uvicorn believed X-Forwarded-For from 127.0.0.1: varying it dodged the per-address limit."""
    varied = [f"198.51.100.{n}" for n in range(5)]
    assert await failed_logins(server, [*varied]) == [401, 401, 401, 429, 429]


@pytest.mark.parametrize("http_overrides", [{"trusted_proxies": ["127.0.0.0/8"]}])
async def test_forwarded_for_names_the_client_behind_a_trusted_proxy(server: RunningServer) -> None:
    client, other = "203.0.113.7", "203.0.113.8"
    assert await failed_logins(server, [client] * 4) == [401, 401, 401, 429]
    # Another client behind the same proxy, and the proxy itself, have their own counts.
    assert await failed_logins(server, [other, None, f"{client}, {other}"]) == [401, 401, 401]
    assert await failed_logins(server, [other, other]) == [401, 429]


@contextlib.contextmanager
def records_of(*names: str) -> Iterator[list[logging.LogRecord]]:
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Collect(logging.DEBUG)
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        yield seen
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)


async def test_unparsable_requests_are_not_logged_one_line_each(server: RunningServer) -> None:
    with records_of("uvicorn.error", "mqchat.api.http11") as records:
        for _ in range(40):
            async with raw_http(server) as (reader, writer):
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                response = await read_until_closed(reader, timeout=5)
                assert response is not None and response.startswith(b"HTTP/1.1 400")
            async with raw_http(server) as (reader, writer):
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    assert len(records) <= 1, [record.getMessage() for record in records]
