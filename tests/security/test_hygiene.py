"""No secrets or message content in the logs at any level, in either format, and safe defaults."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
import websockets

from mqchat import logs
from mqchat.config import Settings
from mqchat.runner import RunningServer
from tests.security import raw
from tests.support.accounts import PASSWORD, http_client, register
from tests.support.devices import connect_device
from tests.support.ports import free_port

CONTENT = "the-plaintext-of-a-private-message"
CLIENT_SIDE = ("httpx", "httpcore", "aiomqtt", "paho", "websockets.client", "asyncio")
"""The test's own clients log in this process too; what is checked is what the server logs."""


@contextlib.contextmanager
def formatted(log_format: logs.LogFormat) -> Iterator[io.StringIO]:
    """The server's lines as ``mqchat serve`` would write them in ``log_format``."""
    out = io.StringIO()
    handler = logs.handler(log_format, "node-1", out)
    handler.addFilter(lambda record: not record.name.startswith(CLIENT_SIDE))
    logging.getLogger().addHandler(handler)
    try:
        yield out
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_a_whole_chat_logs_no_token_password_or_content(
    server: RunningServer, caplog: pytest.LogCaptureFixture, level: int, log_format: logs.LogFormat
) -> None:
    caplog.set_level(level)  # every logger, the libraries' included
    with formatted(log_format) as out:
        tokens = await _chat(server)
    text = caplog.text + out.getvalue()
    # Ordinary connects and disconnects are not refusals: the connections log nothing.
    assert [r.getMessage() for r in caplog.records if r.name == "mqchat.broker.connection"] == []
    for secret in _secrets(tokens):
        assert secret not in text, f"{secret[:12]}... is in the log"
    if log_format == "json":
        assert all(json.loads(line)["node"] == "node-1" for line in out.getvalue().splitlines())


def _secrets(tokens: list[str]) -> list[str]:
    # websockets logs each frame at DEBUG, its last 8 bytes in hex: the end of a send's content.
    tail = CONTENT[-6:].encode().hex(" ")
    return [*tokens, *(token.split(".")[2] for token in tokens), PASSWORD, "wrong-password-xyz", CONTENT, tail]


async def _chat(server: RunningServer) -> list[str]:
    """A chat that touches every path that logs: logins good and bad, a refused CONNECT with
    a token in it, sends over MQTT and HTTP, a refused publish, a long-poll."""
    alice = await register(server, "alice")
    bob = await register(server, "bob")
    async with http_client(server) as http:  # a failed login, with the password in the body
        await http.post("/v1/token", json={"user_id": "alice", "password": "wrong-password-xyz"})
    async with (
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "bob", "laptop", bob) as laptop,
    ):
        await phone.next("sync_response")
        await laptop.next("sync_response")
        await phone.send("bob", CONTENT, "h-1")
        assert (await laptop.next("new_message"))["content"] == CONTENT
        await phone.client.publish("chat/user/bob", CONTENT, qos=1)  # refused: still not logged
        await phone.next("error")
    async with http_client(server, bob) as http:
        await http.post("/v1/messages", json={"client_msg_id": "h-2", "to_user": "alice", "content": CONTENT})
        await http.get("/v1/sync/long-poll", params={"since_seq": 99, "timeout": 0.2})
    async with websockets.connect(  # a send over MQTT-over-WebSocket, as the browser page makes
        f"ws://127.0.0.1:{server.ws_port}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]
    ) as ws:
        await ws.send(raw.connect("alice:web", "alice", alice))
        assert await ws.recv() == raw.CONNACK_ACCEPTED
        command = {"type": "send_message", "client_msg_id": "w-1", "to_user": "bob", "content": CONTENT}
        await ws.send(raw.publish("chat/in/alice/web", json.dumps(command).encode()))
        await ws.recv()  # PUBACK
    with contextlib.suppress(aiomqtt.MqttError):  # refused: the token of another user as password
        async with aiomqtt.Client(
            "127.0.0.1", server.mqtt_port or 0, identifier="bob:stolen", username="bob", password=alice
        ):
            pass
    return [alice, bob]


def test_the_defaults_are_safe() -> None:
    settings = Settings.load()
    assert settings.auth.secret is None  # generated per install, never a shared default
    assert settings.tls.plain_listeners and not settings.tls.enabled
    assert settings.limits.max_packet_bytes == 64 * 1024
    assert settings.auth.login_max_failures <= 10


async def test_anonymous_clients_are_refused(server: RunningServer) -> None:
    for username, password in ((None, None), ("alice", None), (None, "x")):
        client = aiomqtt.Client(
            "127.0.0.1", server.mqtt_port or 0, identifier="alice:phone", username=username, password=password
        )
        with pytest.raises(aiomqtt.MqttError):
            async with client:
                pass
    async with http_client(server) as http:
        for path in ("/v1/sync", "/v1/conversations", "/v1/groups"):
            assert (await http.get(path)).status_code == 401


@pytest.mark.slow
async def test_serve_at_debug_in_json_logs_json_lines_and_no_secrets(tmp_path: Path) -> None:
    """``mqchat serve`` as run: its own logging set-up (mqchat.logs.configure), at DEBUG."""
    mqtt_port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "mqchat.cli", "serve", "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1"]
    command += ["--mqtt-port", str(mqtt_port), "--ws-port", str(free_port()), "--http-port", str(http_port)]
    command += ["--log-level", "DEBUG", "--log-format", "json"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MQCHAT_NODE_ID": "cli-node"},
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            tokens = []
            for user in ("alice", "bob"):
                assert (await http.post("/v1/users", json={"user_id": user, "password": PASSWORD})).status_code == 201
                login = await http.post("/v1/token", json={"user_id": user, "password": PASSWORD})
                tokens.append(login.json()["access_token"])
            await http.post("/v1/token", json={"user_id": "alice", "password": "wrong-password-xyz"})
            body = {"client_msg_id": "c-1", "to_user": "bob", "content": CONTENT}
            sent = await http.post("/v1/messages", json=body, headers={"Authorization": f"Bearer {tokens[0]}"})
            assert sent.status_code == 200
        async with aiomqtt.Client(
            "127.0.0.1", mqtt_port, identifier="bob:phone", username="bob", password=tokens[1]
        ) as bob:
            await bob.subscribe("chat/user/bob", qos=1)
            await bob.publish("chat/in/bob/phone", json.dumps({**body, "to_user": "alice"}), qos=1)
            await bob.publish("chat/user/alice", CONTENT, qos=1)  # refused
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", mqtt_port, identifier="bob:x", username="bob", password=tokens[0]):
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        stderr = (await asyncio.wait_for(proc.stderr.read(), 20)).decode()
        await proc.wait()
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines, "a server at DEBUG logged nothing"
    assert all(line["node"] == "cli-node" for line in lines)
    assert any("refused MQTT connection" in line["message"] for line in lines)
    for secret in _secrets(tokens):
        assert secret not in stderr, f"{secret[:12]}... is in the log"
