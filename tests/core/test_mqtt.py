"""The MQTT 3.1.1 codec (core/mqtt.py): round trips, agreement with amqtt's parser, and every
packet the spec says must close the connection."""

from __future__ import annotations

import struct

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from hypothesis import assume, given
from hypothesis import strategies as st

from mqchat.core import mqtt
from mqchat.core.mqtt import (
    Connack,
    Connect,
    Disconnect,
    MqttError,
    PacketTooLarge,
    Parser,
    Pingreq,
    Pingresp,
    ProtocolViolation,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    UnsupportedProtocol,
    Will,
)

CONNECTED = Connect("alice:phone", username="alice", password=b"token").encode()

text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
topic_names = text.filter(mqtt.valid_topic_name)
topic_filters = st.one_of(
    topic_names, st.lists(st.sampled_from(["a", "+", "chat", "x"]), min_size=1, max_size=4).map("/".join)
).filter(mqtt.valid_topic_filter)
packet_ids = st.integers(1, 65535)
payloads = st.binary(max_size=300)

wills = st.builds(Will, topic_names, payloads, st.integers(0, 2), st.booleans())
connects = st.builds(
    Connect,
    text,
    st.booleans(),
    st.integers(0, 65535),
    st.one_of(st.none(), text),
    st.none(),
    st.one_of(st.none(), wills),
).flatmap(lambda c: st.one_of(st.just(c), st.builds(Connect, st.just(c.client_id), username=text, password=payloads)))
publishes = st.one_of(
    st.builds(Publish, topic_names, payloads, st.just(0), st.booleans()),
    st.builds(Publish, topic_names, payloads, st.integers(1, 2), st.booleans(), st.booleans(), packet_ids),
)
client_packets = st.one_of(
    publishes,
    st.builds(Puback, packet_ids),
    st.builds(Pubrec, packet_ids),
    st.builds(Pubrel, packet_ids),
    st.builds(Pubcomp, packet_ids),
    st.builds(
        Subscribe, packet_ids, st.lists(st.tuples(topic_filters, st.integers(0, 2)), min_size=1, max_size=5).map(tuple)
    ),
    st.builds(Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=5).map(tuple)),
    st.just(Pingreq()),
    st.just(Disconnect()),
)
server_packets = st.one_of(
    publishes,
    st.builds(Puback, packet_ids),
    st.builds(Pubrec, packet_ids),
    st.builds(Pubrel, packet_ids),
    st.builds(Pubcomp, packet_ids),
    st.builds(Suback, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5).map(tuple)),
    st.builds(Unsuback, packet_ids),
    st.just(Pingresp()),
)


def parse_all(data: bytes, *, server: bool = True, chunk: int = 0) -> list[mqtt.Packet]:
    parser = Parser(server=server)
    out: list[mqtt.Packet] = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        parser.feed(piece)
        while (packet := parser.next()) is not None:
            out.append(packet)
    assert parser.buffered == 0
    return out


# -------------------------------------------------------------- round trips


@given(connects, st.lists(client_packets, max_size=8), st.integers(0, 7))
def test_what_a_client_sends_parses_back_to_itself_whatever_the_chunking(
    connect: Connect, packets: list[mqtt.Packet], chunk: int
) -> None:
    data = connect.encode() + b"".join(p.encode() for p in packets)
    assert parse_all(data, chunk=chunk) == [connect, *packets]


@given(st.booleans(), st.integers(0, 5), st.lists(server_packets, max_size=8), st.integers(0, 7))
def test_what_a_server_sends_parses_back_to_itself(
    present: bool, code: int, packets: list[mqtt.Packet], chunk: int
) -> None:
    data = Connack(present, code).encode() + b"".join(p.encode() for p in packets)
    assert parse_all(data, server=False, chunk=chunk) == [Connack(present, code), *packets]


@pytest.mark.parametrize(
    ("length", "encoded"),
    # MQTT 3.1.1, table 2.4: the bounds of each size.
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01"),
     (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f")],
)  # fmt: skip
def test_remaining_length_is_the_spec_s_varint(length: int, encoded: bytes) -> None:
    assert mqtt.encode_length(length) == encoded


@given(st.integers(0, mqtt.MAX_REMAINING_LENGTH))
def test_remaining_length_round_trips(length: int) -> None:
    encoded = mqtt.encode_length(length)
    assert len(encoded) <= 4
    assert mqtt._read_length(encoded, 0, len(encoded)) == (length, len(encoded))


# -------------------------------------------------------- against amqtt


async def amqtt_parse(data: bytes) -> object:
    reader = BufferReader(data)
    header = await MQTTFixedHeader.from_stream(reader)
    assert header is not None
    return await packet_class(header).from_stream(reader, fixed_header=header)


@given(publishes)
async def test_amqtt_reads_our_publish_as_we_wrote_it(packet: Publish) -> None:
    parsed = await amqtt_parse(packet.encode())
    assert isinstance(parsed, PublishPacket)
    assert (parsed.topic_name, bytes(parsed.data), parsed.qos, parsed.retain_flag, parsed.dup_flag) == (
        packet.topic,
        packet.payload,
        packet.qos,
        packet.retain,
        packet.dup,
    )
    assert parsed.packet_id == packet.packet_id


@given(connects)
async def test_amqtt_reads_our_connect_as_we_wrote_it(packet: Connect) -> None:
    assume(packet.client_id)  # amqtt makes up an id for an empty one
    parsed = await amqtt_parse(packet.encode())
    assert parsed.payload.client_id == packet.client_id  # type: ignore[attr-defined]
    assert parsed.clean_session_flag == packet.clean_session  # type: ignore[attr-defined]
    assert parsed.keep_alive == packet.keepalive  # type: ignore[attr-defined]
    assert parsed.payload.username == packet.username  # type: ignore[attr-defined]
    if packet.will is not None:
        assert parsed.payload.will_topic == packet.will.topic  # type: ignore[attr-defined]
        assert bytes(parsed.payload.will_message) == packet.will.payload  # type: ignore[attr-defined]
        assert parsed.will_qos == packet.will.qos  # type: ignore[attr-defined]


@given(
    topic_names,
    payloads,
    st.integers(0, 2),
    packet_ids,
    st.booleans(),
)
def test_we_read_amqtt_publish_as_it_wrote_it(topic: str, data: bytes, qos: int, packet_id: int, retain: bool) -> None:
    encoded = bytes(PublishPacket.build(topic, data, packet_id if qos else None, False, qos, retain).to_bytes())
    (parsed,) = parse_all(CONNECTED + encoded)[1:]
    assert parsed == Publish(topic, data, qos, retain, False, packet_id if qos else None)


@given(st.booleans(), st.integers(0, 5), packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1))
def test_we_read_amqtt_connack_and_suback(present: bool, code: int, packet_id: int, codes: list[int]) -> None:
    data = bytes(ConnackPacket.build(int(present), code).to_bytes())
    data += bytes(SubackPacket.build(packet_id, codes).to_bytes())
    assert parse_all(data, server=False) == [Connack(present, code), Suback(packet_id, tuple(codes))]


# ------------------------------------------------------ hostile bytes


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_packets_or_mqtt_errors_only(data: bytes) -> None:
    for server in (True, False):
        parser = Parser(server=server, max_packet=1024)
        parser.feed(data)
        try:
            while parser.next() is not None:
                pass
        except MqttError:
            pass


def violation(data: bytes, **kwargs: int) -> str:
    parser = Parser(**kwargs)  # type: ignore[arg-type]
    parser.feed(CONNECTED + data)
    with pytest.raises(ProtocolViolation) as raised:
        while parser.next() is not None:
            pass
    return str(raised.value)


def raw(first: int, body: bytes) -> bytes:
    return bytes((first,)) + mqtt.encode_length(len(body)) + body


def field(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (raw(0x32, field(b"chat/\x00x") + b"\x00\x01{}"), "NUL"),
        (raw(0x32, field(b"chat/+") + b"\x00\x01{}"), "wildcard"),
        (raw(0x32, field(b"") + b"\x00\x01{}"), "empty"),
        (raw(0x32, field(b"\xff\xfe") + b"\x00\x01{}"), "UTF-8"),
        (raw(0x32, field(b"\xed\xa0\x80") + b"\x00\x01{}"), "UTF-8"),  # an encoded surrogate
        (raw(0x32, field(b"chat/in/a/b") + b"\x00\x00{}"), "identifier 0"),
        (raw(0x36, field(b"t") + b"\x00\x01"), "QoS 3"),
        (raw(0x38, field(b"t")), "DUP"),
        (raw(0x32, b"\x00\x09ab"), "past the packet"),
        (raw(0x82, b"\x00\x01"), "without a topic filter"),
        (raw(0x82, b"\x00\x01" + field(b"chat/user/a") + b"\x03"), "QoS byte"),
        (raw(0x82, b"\x00\x01" + field(b"chat/user/a") + b"\x41"), "QoS byte"),
        (raw(0x82, b"\x00\x01" + field(b"chat/\x00") + b"\x01"), "NUL"),
        (raw(0x82, b"\x00\x01" + field(b"chat/#/x") + b"\x01"), "invalid topic filter"),
        (raw(0x82, b"\x00\x01" + field(b"chat/a+") + b"\x01"), "invalid topic filter"),
        (raw(0x80, b"\x00\x01" + field(b"chat/user/a") + b"\x01"), "reserved flags"),
        (raw(0xA2, b"\x00\x01"), "without a topic filter"),
        (raw(0x60, b"\x00\x01"), "reserved flags"),
        (raw(0x40, b"\x00\x01\x00"), "remaining length 2"),
        (raw(0xC0, b"\x00"), "remaining length 0"),
        (raw(0x20, b"\x00\x00"), "may not be sent by the client"),
        (raw(0x90, b"\x00\x01\x00"), "may not be sent by the client"),
        (raw(0xF0, b""), "may not be sent"),
        (CONNECTED, "second CONNECT"),
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    ],
)
def test_packets_the_spec_says_close_the_connection(data: bytes, why: str) -> None:
    assert why in violation(data)


def test_the_size_limit_applies_before_the_body_arrives() -> None:
    parser = Parser(max_packet=1024)
    parser.feed(CONNECTED + b"\x32\x80\x80\x04")  # announces 64 KiB; no body yet
    assert parser.next() is not None
    with pytest.raises(PacketTooLarge):
        parser.next()


def connect_body(flags: int, rest: bytes = b"") -> bytes:
    return raw(0x10, field(b"MQTT") + bytes((4, flags)) + b"\x00\x1e" + field(b"a:b") + rest)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (connect_body(0x03), "reserved flag"),
        (connect_body(0x02 | 0x08), "will QoS or retain but no will"),
        (connect_body(0x02 | 0x20), "will QoS or retain but no will"),
        (connect_body(0x02 | 0x04 | 0x18, field(b"t") + field(b"m")), "will QoS 3"),
        (connect_body(0x02 | 0x40, field(b"pw")), "password but no user name"),
        (connect_body(0x02 | 0x04, field(b"a/#") + field(b"m")), "will topic"),
        (connect_body(0x02, b"extra"), "bytes after the fields"),
        (raw(0x10, field(b"MQ")), "truncated CONNECT"),
        (raw(0x30, field(b"t")), "first packet must be CONNECT"),
    ],
)
def test_malformed_connects(data: bytes, why: str) -> None:
    parser = Parser()
    parser.feed(data)
    with pytest.raises(ProtocolViolation, match=why):
        parser.next()


@pytest.mark.parametrize(
    ("name", "level"), [(b"MQTT", 5), (b"MQIsdp", 3), (b"MQTT", 3), (b"HTTP", 4)], ids=["v5", "v3.1", "3", "other"]
)
def test_other_protocol_versions_are_told_apart_from_garbage(name: bytes, level: int) -> None:
    parser = Parser()
    parser.feed(raw(0x10, field(name) + bytes((level, 2)) + b"\x00\x1e\x00" + field(b"a:b")))
    with pytest.raises(UnsupportedProtocol) as raised:
        parser.next()
    assert raised.value.level == level
    assert Connack(False, mqtt.UNACCEPTABLE_PROTOCOL).encode() == b"\x20\x02\x00\x01"


def test_the_fast_publish_encoder_matches_the_packet_class() -> None:
    for qos in (0, 1, 2):
        expected = Publish("chat/user/bob", b"x" * 300, qos, packet_id=7 if qos else None).encode()
        assert mqtt.encode_publish(b"chat/user/bob", b"x" * 300, qos, 7) == expected
    assert mqtt.puback(9) == Puback(9).encode()


def _parsed(data: bytes) -> list[object] | None:
    """What a connected broker's parser makes of ``data``; None if it refuses it."""
    parser = Parser(server=True)
    parser.feed(Connect("c").encode())
    assert isinstance(parser.next(), Connect)
    parser.feed(data)
    packets: list[object] = []
    try:
        while (packet := parser.next()) is not None:
            packets.append(packet)
    except MqttError:
        return None
    return packets if not parser.buffered else None


@given(st.lists(st.integers(0, 65535), min_size=1, max_size=6))
def test_the_puback_shortcut_reads_what_the_parser_reads(ids: list[int]) -> None:
    data = b"".join(b"\x40\x02" + struct.pack("!H", i) for i in ids)
    parsed = _parsed(data)
    expected = None if parsed is None else [p.packet_id for p in parsed if isinstance(p, Puback)]
    assert mqtt.only_pubacks(data) == expected  # id 0 is refused by both


@given(st.binary(max_size=24))
def test_the_puback_shortcut_takes_nothing_else(data: bytes) -> None:
    """Whatever it accepts, the parser reads as the same PUBACKs; the rest goes to the parser."""
    ids = mqtt.only_pubacks(data)
    if ids is not None:
        parsed = _parsed(data)
        assert parsed is not None and [p.packet_id for p in parsed if isinstance(p, Puback)] == ids
        assert all(isinstance(p, Puback) for p in parsed)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x40\x02\x00",
        b"\x41\x02\x00\x01",
        b"\x40\x03\x00\x01\x00",
        b"\x40\x02\x00\x01\xc0\x00",
        b"\xc0\x00\xc0\x00",
    ],
)
def test_the_puback_shortcut_leaves_partial_flagged_and_mixed_input_to_the_parser(data: bytes) -> None:
    assert mqtt.only_pubacks(data) is None
