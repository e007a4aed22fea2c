"""A first chat between two users over MQTT, end to end."""

from __future__ import annotations

from mqchat.runner import RunningServer
from tests.support.accounts import register
from tests.support.devices import connect_device


async def test_alice_and_bob_chat(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice_token) as alice,
        connect_device(server, "bob", "laptop", bob_token) as bob,
    ):
        await alice.next("sync_response")
        await bob.next("sync_response")
        await alice.send("bob", "Hello Bob!", "m-1")
        ack = await alice.next("message_ack")
        assert ack["client_msg_id"] == "m-1" and ack["duplicate"] is False and ack["seq"] == 1
        incoming = await bob.next("new_message")
        assert incoming["content"] == "Hello Bob!" and incoming["from_user"] == "alice"
        assert incoming["server_msg_id"] == ack["server_msg_id"] and incoming["seq"] == 1
