"""No secrets or message content in the logs at INFO, and safe defaults."""

from __future__ import annotations

import logging

import aiomqtt
import pytest

from mqchat.config import Settings
from mqchat.runner import RunningServer
from tests.support.accounts import PASSWORD, http_client, register
from tests.support.devices import connect_device

CONTENT = "the-plaintext-of-a-private-message"


async def test_a_whole_chat_logs_no_token_password_or_content(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # every logger, amqtt's included
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
    text = caplog.text
    # Ordinary connects and disconnects are not refusals: the connections log nothing.
    assert [r.getMessage() for r in caplog.records if r.name == "mqchat.broker.connection"] == []
    for secret in (alice, bob, alice.split(".")[2], PASSWORD, "wrong-password-xyz", CONTENT):
        assert secret not in text, f"{secret[:12]}... is in the log"


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
