"""The broker's in-place packet path (handler.py) and its light sessions (session.py)."""

from __future__ import annotations

import asyncio
import pickle
import socket
from pathlib import Path

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.publish import PublishPacket
from hypothesis import given
from hypothesis import strategies as st
from transitions import MachineError

from mqchat.bench import wire
from mqchat.broker.handler import encode_publish, parse_publish
from mqchat.broker.session import ChatSession
from mqchat.config import Settings
from mqchat.runner import RunningServer, run_server
from tests.helpers import connect_device, register

topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=300)


@given(topic=topics, data=st.binary(max_size=20_000), qos=st.sampled_from([0, 1]), packet_id=st.integers(1, 65535))
def test_encode_publish_reads_back_in_amqtt_and_our_parser(topic: str, data: bytes, qos: int, packet_id: int) -> None:
    packet = encode_publish(topic.encode(), data, qos, packet_id)

    decoded = asyncio.run(PublishPacket.from_stream(BufferReader(packet)))
    assert (decoded.topic_name, decoded.data, decoded.qos) == (topic, data, qos)
    assert decoded.packet_id == (packet_id if qos else None)

    assert parse_publish(packet) == (topic, qos, packet_id if qos else None, data, False)


def test_parse_publish_refuses_a_topic_that_is_not_utf8() -> None:
    from amqtt.errors import MQTTError

    packet = b"\x30\x05\x00\x02\xff\xfehi"
    with pytest.raises(MQTTError):
        parse_publish(packet)
    with pytest.raises(MQTTError):
        parse_publish(b"\x32\x05\x00\x09abc")  # the topic runs past the packet


def test_chat_session_keeps_amqtts_states_and_refusals() -> None:
    session = ChatSession()
    assert session.transitions.state == "new"
    session.transitions.connect()
    assert session.transitions.is_connected()
    assert session.last_connect_time is not None
    with pytest.raises(MachineError):
        session.transitions.connect()  # a live session is taken over, not connected twice
    session.transitions.disconnect()
    session.transitions.disconnect()
    assert session.transitions.is_disconnected()
    assert session.last_disconnect_time is not None
    copy = pickle.loads(pickle.dumps(session))
    assert copy.transitions.state == "disconnected"
    copy.transitions.connect()
    assert copy.transitions.is_connected()
    assert session.transitions.is_disconnected()


async def test_the_broker_builds_light_sessions(server: RunningServer) -> None:
    token = await register(server, "alice")
    async with connect_device(server, "alice", "phone", token) as phone:
        await phone.next("sync_response")
        session, _ = server.broker._sessions["alice:phone"]
        assert isinstance(session, ChatSession)


@pytest.fixture
def stingy_settings(tmp_path: Path) -> Settings:
    return Settings.load(
        None,
        data_dir=tmp_path / "data",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}",
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        limits={"max_unacked_deliveries": 10, "send_rate_per_second": 1000, "send_burst": 1000},
    )


async def test_a_device_that_never_pubacks_is_closed_and_catches_up_later(stingy_settings: Settings) -> None:
    """A QoS 1 subscriber that never answers PUBACK piles up in-flight deliveries; past
    ``limits.max_unacked_deliveries`` it is closed, and nothing is lost: it gets every
    message from its cursor when it comes back."""
    async with run_server(stingy_settings) as server:
        alice = await register(server, "alice")
        bob = await register(server, "bob")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(wire.connect("bob:mute", username="bob", password=bob))
        writer.write(wire.subscribe(1, ["chat/user/bob"]))
        await writer.drain()
        async with connect_device(server, "alice", "phone", alice) as phone:
            await phone.next("sync_response")
            for n in range(30):
                await phone.send("bob", f"m{n}", f"c{n}")
                await phone.next("message_ack")
            # The server closes the silent subscriber: its stream ends.
            async with asyncio.timeout(20):
                while await reader.read(65536):
                    pass
        writer.close()
        async with connect_device(server, "bob", "mute", bob) as device:
            caught_up = (await device.next("sync_response"))["events"]
            assert [e["content"] for e in caught_up] == [f"m{n}" for n in range(30)]
