"""The bench's hand-written MQTT codec: packets split and joined across reads come out whole."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqchat.bench import wire


@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=50), max_size=20))
def test_publishes_survive_any_chunking(payload: bytes, cuts: list[int]) -> None:
    topic = wire.publish_header(b"chat/user/alice")
    stream = wire.publish(topic, 7, payload) + wire.puback(7) + wire.publish(topic, 8, payload)
    reader = wire.PacketReader()
    packets: list[tuple[int, int, bytes]] = []
    pos = 0
    for cut in cuts:
        packets += reader.feed(stream[pos : pos + cut])
        pos += cut
    packets += reader.feed(stream[pos:])
    assert [kind for kind, _, _ in packets] == [wire.PUBLISH, wire.PUBACK, wire.PUBLISH]
    assert wire.parse_publish(packets[0][1], packets[0][2]) == ("chat/user/alice", 7, payload)
    assert packets[1][2] == b"\x00\x07"


def test_remaining_length_uses_several_bytes_past_127() -> None:
    packet = wire.publish(wire.publish_header(b"t"), 1, b"x" * 200)
    assert packet[1] & 0x80  # continuation bit: the length takes two bytes
    [(kind, flags, body)] = wire.PacketReader().feed(packet)
    assert (kind, flags) == (wire.PUBLISH, 2)
    assert wire.parse_publish(flags, body) == ("t", 1, b"x" * 200)


def test_connect_carries_credentials() -> None:
    packet = wire.connect("alice:phone", username="alice", password="token")
    [(kind, _, body)] = wire.PacketReader().feed(packet)
    assert kind == 1
    assert body[:7] == b"\x00\x04MQTT\x04"
    assert body[7] == 0xC2  # username, password, clean session
    assert body.endswith(b"\x00\x05alice\x00\x05token")
