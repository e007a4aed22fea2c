"""Logs: one line per event, and JSON lines that say which node, request, client and command.

Issue 14: a cut WebSocket wrote 79 identical warnings in a second, and a refused CONNECT
was logged twice (once with its reason, once as a refusal).
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from mqchat import logs
from mqchat.config import Settings
from mqchat.core import mqtt
from mqchat.runner import RunningServer, run_server
from tests.security.raw import CONNACK_ACCEPTED, connect, raw_client, subscribe
from tests.support.accounts import UNLIMITED, http_client, register
from tests.support.devices import connect_device
from tests.support.faults import fill, small_disk
from tests.support.logthrottles import reset_log_throttles

CLIENT_SIDE = ("httpx", "httpcore", "aiomqtt", "paho", "websockets.client", "asyncio")
"""Loggers of the test's own clients, not of the server."""


def server_lines(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if not r.name.startswith(CLIENT_SIDE)]


async def test_a_refused_connect_is_logged_once(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    alice = await register(server, "alice")
    refusals = [
        ("alice:forged", "alice", "not-a-token", mqtt.NOT_AUTHORIZED),  # refused by authentication
        ("alice:other", "mallory", alice, mqtt.NOT_AUTHORIZED),  # user name is not the client id's user
        ("bad id", "alice", alice, mqtt.IDENTIFIER_REJECTED),
    ]
    for client_id, username, password, code in refusals:
        caplog.clear()
        reset_log_throttles()  # one line per refusal, not one per 10 s of them (that is the throttle's test)
        async with raw_client(server.mqtt_port or 0) as client:
            await client.send(connect(client_id, username, password))
            assert (await client.read_packet())[3] == code
            assert await client.closed()
        mentions = [line for line in server_lines(caplog.records) if client_id[:8] in line]
        assert len(mentions) == 1, mentions


async def test_a_connect_refused_by_a_limit_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.load(
        None,
        data_dir=tmp_path / "data",
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        limits={"max_connections_per_user": 1},
    )
    async with run_server(settings) as server:
        caplog.set_level(logging.DEBUG)
        alice = await register(server, "alice")
        async with connect_device(server, "alice", "phone", alice, subscribe=False):
            caplog.clear()
            async with raw_client(server.mqtt_port or 0) as second:
                await second.send(connect("alice:laptop", "alice", alice))
                assert (await second.read_packet())[3] == mqtt.NOT_AUTHORIZED
                assert await second.closed()
            mentions = [line for line in server_lines(caplog.records) if "alice:laptop" in line]
    assert len(mentions) == 1, mentions
    assert "max_connections_per_user" in mentions[0]  # the one line says why


async def test_a_cut_websocket_is_not_a_burst_of_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.load(
        None,
        data_dir=tmp_path / "data",
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        limits=UNLIMITED,
    )
    async with run_server(settings) as server:
        alice, bob = await register(server, "alice"), await register(server, "bob")
        caplog.set_level(logging.DEBUG)
        logging.getLogger("websockets").setLevel(logging.WARNING)  # its DEBUG lines are one per frame
        ws = await websockets.connect(
            f"ws://127.0.0.1:{server.ws_port}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]
        )
        await ws.send(connect("alice:web", "alice", alice))
        assert await ws.recv() == CONNACK_ACCEPTED
        await ws.send(subscribe("chat/user/alice"))
        await ws.recv()
        caplog.clear()
        async with http_client(server, bob) as http:

            async def flood() -> None:
                for i in range(200):
                    body = {"client_msg_id": f"m-{i}", "to_user": "alice", "content": "x" * 2000}
                    assert (await http.post("/v1/messages", json=body)).status_code == 200

            sending = asyncio.create_task(flood())
            await asyncio.sleep(0.3)
            ws.transport.abort()  # cut mid-stream, no close frame
            await sending
        await asyncio.sleep(0.5)
        lines = server_lines(caplog.records)
        await ws.close()
    repeated = {line: n for line, n in collections.Counter(lines).items() if n > 1}
    assert not repeated, repeated
    assert len(lines) <= 2, lines


# ------------------------------------------------------------------ JSON lines


@contextmanager
def json_lines(node_id: str) -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logs.handler("json", node_id, out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def parsed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_json_lines_name_the_node_request_client_and_command(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        settings = Settings.load(
            None,
            data_dir=disk,
            node_id="node-7",
            mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
            http={"host": "127.0.0.1", "port": 0},
        )
        async with run_server(settings) as server:
            alice, bob = await register(server, "alice"), await register(server, "bob")
            async with connect_device(server, "alice", "phone", alice) as phone:
                await phone.next("sync_response")
                async with http_client(server, bob) as http:
                    sent = await http.post(
                        "/v1/messages", json={"client_msg_id": "b-1", "to_user": "alice", "content": "x"}
                    )
                    message_id = sent.json()["server_msg_id"]
                await phone.next("new_message")
                fill(disk)
                with json_lines("node-7") as out:
                    await phone.publish({"type": "ack", "seq": 1})  # a write: fails on the full disk
                    assert (await phone.next("error"))["code"] == "storage_unavailable"
                    async with http_client(server, alice) as http:
                        read = await http.post(
                            "/v1/conversations/user:bob/read",
                            json={"message_id": message_id},
                            headers={"X-Request-ID": "req-123"},
                        )
                    assert (read.status_code, read.headers["X-Request-ID"]) == (503, "req-123")
    lines = parsed(out)
    assert lines and all(line["node"] == "node-7" for line in lines)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    mqtt_side = [line for line in lines if line.get("client_id") == "alice:phone"]
    assert mqtt_side and all(line.get("command") == "ack" for line in mqtt_side), lines
    http_side = [line for line in lines if line.get("request_id") == "req-123"]
    assert http_side, lines
    assert all("client_id" not in line for line in http_side)


async def test_every_response_carries_a_request_id(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
        fresh = (await http.get("/healthz")).headers["X-Request-ID"]
        again = (await http.get("/healthz")).headers["X-Request-ID"]
        kept = (await http.get("/healthz", headers={"X-Request-ID": "trace-1.2:3"})).headers["X-Request-ID"]
        forged = (await http.get("/healthz", headers={"X-Request-ID": 'x" level=ERROR'})).headers["X-Request-ID"]
    assert len(fresh) == 32 and fresh != again
    assert kept == "trace-1.2:3"
    assert forged != 'x" level=ERROR' and len(forged) == 32
