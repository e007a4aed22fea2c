"""Health that tells the truth (issue 14): ``/healthz`` fails when sends would, and says why.

Found by fault runs: ``/healthz`` answered 200 while the disk was full and every send
failed, and hung while PostgreSQL was silent (sends hung as long as the partition
lasted). Here a real server meets a real full disk (a small tmpfs), a silent PostgreSQL
(a proxy that stops forwarding) and a PostgreSQL that is not up yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

from mqchat.config import Settings
from mqchat.runner import RunningServer, run_server
from tests.support.accounts import http_client, register
from tests.support.devices import connect_device
from tests.support.faults import StallingProxy, fill, small_disk

BOUND = 1.0
"""database.health_timeout_seconds and database.statement_timeout_seconds in these tests."""


def server_settings(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    return Settings.load(
        None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        database={"health_timeout_seconds": BOUND, "statement_timeout_seconds": BOUND},
        **overrides,
    )


async def healthz(server: RunningServer) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with http_client(server) as http:
        response = await http.get("/healthz")
    return response.status_code, response.json(), time.monotonic() - started


async def send_over_http(server: RunningServer, token: str, client_msg_id: str) -> tuple[int, str, float]:
    started = time.monotonic()
    async with http_client(server, token) as http:
        response = await http.post(
            "/v1/messages", json={"client_msg_id": client_msg_id, "to_user": "bob", "content": "hello"}
        )
    code = response.json()["error"]["code"] if response.status_code != 200 else "ok"
    return response.status_code, code, time.monotonic() - started


async def until_healthy(server: RunningServer, within: float = 15) -> None:
    async with asyncio.timeout(within):
        for _ in range(1000):
            if (await healthz(server))[0] == 200:
                return
            await asyncio.sleep(0.2)


# ------------------------------------------------------------------ a full disk


async def test_a_full_disk_fails_health_and_sends_until_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        settings = server_settings(disk, f"sqlite+aiosqlite:///{disk / 'mqchat.db'}")
        async with run_server(settings) as server:
            alice, _ = await register(server, "alice"), await register(server, "bob")
            async with connect_device(server, "alice", "phone", alice) as phone:
                await phone.next("sync_response")
                assert (await healthz(server))[0] == 200
                filler = fill(disk)

                status, body, _ = await healthz(server)
                assert status == 503
                assert body == {
                    "status": "unavailable",
                    "database": "unavailable",
                    "reason": "storage_unavailable",
                    "detail": body["detail"],
                }
                assert (await send_over_http(server, alice, "h-1"))[:2] == (503, "storage_unavailable")
                await phone.send("bob", "hello", "m-1")
                error = await phone.next("error")
                assert (error["code"], error["ref"]) == ("storage_unavailable", "m-1")

                filler.unlink()  # room again: health and sends recover by themselves
                await until_healthy(server)
                assert (await send_over_http(server, alice, "h-1"))[:2] == (200, "ok")
                await phone.send("bob", "hello", "m-1")
                assert (await phone.next("message_ack"))["client_msg_id"] == "m-1"
    unhealthy = [r for r in caplog.records if r.getMessage().startswith("database unhealthy")]
    assert len(unhealthy) == 1, "a change of health is logged once, not at every check"


# ------------------------------------------------------------ a silent database


def through(proxy: StallingProxy, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def proxied(postgres_url: str, *, started: bool = True) -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy(make_url(postgres_url).port or 5432)
    if started:
        await proxy.start()
    try:
        yield proxy
    finally:
        proxy.resume()
        await proxy.close()


@pytest.mark.postgres
async def test_a_silent_postgres_fails_health_and_sends_within_seconds(tmp_path: Path, postgres_url: str) -> None:
    async with (
        proxied(postgres_url) as proxy,
        run_server(server_settings(tmp_path, through(proxy, postgres_url))) as server,
    ):
        alice, _ = await register(server, "alice"), await register(server, "bob")
        async with connect_device(server, "alice", "phone", alice) as phone:
            await phone.next("sync_response")
            assert (await healthz(server))[0] == 200
            # Open connections in the pool, as on a busy server: the hang to bound is then an
            # answer that never comes on a connection already open, not only a connect.
            sent = await asyncio.gather(*(send_over_http(server, alice, f"warm-{i}") for i in range(8)))
            assert {status for status, _, _ in sent} == {200}
            proxy.stall()

            status, body, took = await healthz(server)
            assert (status, body["reason"]) == (503, "storage_timeout")
            assert took < BOUND + 1.5
            status, code, took = await send_over_http(server, alice, "h-1")
            assert (status, code) == (503, "storage_unavailable")
            assert took < BOUND + 4, f"a send against a silent database took {took:.1f} s"
            started = time.monotonic()
            await phone.send("bob", "hello", "m-1")
            error = await phone.next("error", timeout=BOUND + 8)
            assert (error["code"], error["ref"]) == ("storage_unavailable", "m-1")
            assert time.monotonic() - started < BOUND + 5

            proxy.resume()  # the partition heals: the pool recovers by itself
            await until_healthy(server, within=20)
            # Health came back through one connection; a send may still meet another that timed out.
            for _ in range(50):
                result = await send_over_http(server, alice, "h-1")
                if result[0] == 200:
                    break
                await asyncio.sleep(0.2)
            assert result[:2] == (200, "ok")


@pytest.mark.postgres
async def test_serve_waits_for_a_database_that_is_not_up_yet(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mqchat.bridge.composition")
    async with proxied(postgres_url, started=False) as proxy:
        url = through(proxy, postgres_url)
        up = asyncio.Event()
        stop = asyncio.Event()
        ports: list[int | None] = []

        async def serve() -> None:
            async with run_server(server_settings(tmp_path, url)) as server:
                ports.append(server.http_port)
                up.set()
                await stop.wait()

        serving = asyncio.create_task(serve())
        try:
            await asyncio.sleep(2)
            assert not up.is_set() and not serving.done(), "serve gave up or started without its database"
            waiting = [r.getMessage() for r in caplog.records if "waiting for the database" in r.getMessage()]
            assert 2 <= len(waiting) <= 4, waiting  # backing off: 0, 0.5, 1.5 s ...
            assert "attempt 1" in waiting[0] and "next try in 0.5 s" in waiting[0]
            await proxy.start()  # the database comes up
            async with asyncio.timeout(15):
                await up.wait()
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{ports[0]}/healthz")).status_code == 200
        finally:
            stop.set()
            await serving
