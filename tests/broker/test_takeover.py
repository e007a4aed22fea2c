"""A refused CONNECT must not disturb the device whose client id it borrowed."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from mqchat.runner import RunningServer
from tests.support.accounts import register
from tests.support.devices import connect_device


async def test_wrong_token_with_a_live_client_id_does_not_cut_the_device_off(server: RunningServer) -> None:
    alice = await register(server, "alice")
    bob = await register(server, "bob")
    async with (
        connect_device(server, "bob", "laptop", bob) as laptop,
        connect_device(server, "alice", "phone", alice) as phone,
    ):
        await laptop.next("sync_response")
        for clean in (True, False):
            intruder = aiomqtt.Client(
                "127.0.0.1",
                server.mqtt_port,
                identifier="bob:laptop",
                username="bob",
                password="forged",
                clean_session=clean,
            )
            with pytest.raises(aiomqtt.MqttError):
                async with intruder:
                    pass
        await phone.send("bob", "still there?", "t-1")
        received = await laptop.next("new_message")
        assert received["content"] == "still there?"


async def test_a_reconnecting_device_takes_over_its_own_session(server: RunningServer) -> None:
    alice = await register(server, "alice")
    bob = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "bob", "laptop", bob) as first,
    ):
        await first.next("sync_response")
        async with connect_device(server, "bob", "laptop", bob) as second:
            await second.next("sync_response")
            await phone.send("bob", "to the new connection", "t-2")
            assert (await second.next("new_message"))["content"] == "to the new connection"
            # MQTT 3.1.1, 3.1.4: the server closes the older connection of a client id.
            with pytest.raises(aiomqtt.MqttError):
                for _ in range(50):
                    await first.publish({"type": "ack", "seq": 0})
                    await asyncio.sleep(0.1)
