"""MQTT 3.1.1, sans-IO: bytes in, typed packets out; typed packets in, bytes out.

In the style of h11's ``Connection``: no sockets and no clock. ``Parser.feed`` takes
whatever arrived, ``Parser.next`` returns the next whole packet (or None until more
bytes arrive) and raises a ``MqttError`` for anything MQTT 3.1.1 says must close the
connection. Every packet type has an ``encode``. The broker's connections, the load
generator of ``mqchat bench`` and the tests all use this one module, so the wire format
is written once.

The parser enforces, before a byte of a body is buffered beyond the limit:

- the remaining length (at most 4 bytes of varint) against ``max_packet``;
- packet types the peer may send (a server parses what clients send and the reverse),
  the fixed-header flags the spec requires, and the exact length of fixed-size packets;
- CONNECT first (and only once) from a client, CONNACK first from a server;
- field contents: well-formed UTF-8 without NUL, fields that end inside their packet,
  no trailing bytes, non-zero packet ids, topic names without wildcards, valid topic
  filters, at least one filter per (UN)SUBSCRIBE, requested QoS 0-2 with reserved bits
  clear, CONNECT flag combinations (MQTT 3.1.1, 3.1.2).

A CONNECT for another protocol version raises ``UnsupportedProtocol``: the server
answers CONNACK 0x01 (``Connack(False, UNACCEPTABLE_PROTOCOL)``) and closes, as 3.1.2.2
requires; MQTT 5 clients read that as "unsupported protocol version".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (3.2.2.3)
ACCEPTED = 0x00
UNACCEPTABLE_PROTOCOL = 0x01
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
BAD_CREDENTIALS = 0x04
NOT_AUTHORIZED = 0x05
SUBACK_FAILURE = 0x80

MAX_REMAINING_LENGTH = 268_435_455  # 4 bytes of varint
_U16 = struct.Struct("!H")


class MqttError(Exception):
    """The peer broke MQTT 3.1.1 (or a limit): the connection must be closed."""


class ProtocolViolation(MqttError):
    """A malformed packet or a forbidden packet or field; the message says which."""


class PacketTooLarge(ProtocolViolation):
    """A packet's remaining length is above the parser's ``max_packet``."""


class UnsupportedProtocol(MqttError):
    """A CONNECT for a protocol other than MQTT 3.1.1 (answer CONNACK 0x01, then close)."""

    def __init__(self, name: str, level: int) -> None:
        super().__init__(f"protocol {name!r} level {level} is not MQTT 3.1.1")
        self.name = name
        self.level = level


# ------------------------------------------------------------------ packets


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    clean_session: bool = True
    keepalive: int = 0
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None

    def encode(self) -> bytes:
        flags = 0x02 if self.clean_session else 0
        payload = _string(self.client_id)
        if self.will is not None:
            flags |= 0x04 | (self.will.qos << 3) | (0x20 if self.will.retain else 0)
            payload += _string(self.will.topic) + _binary(self.will.payload)
        if self.username is not None:
            flags |= 0x80
            payload += _string(self.username)
        if self.password is not None:
            flags |= 0x40
            payload += _binary(self.password)
        body = b"\x00\x04MQTT\x04" + bytes((flags,)) + _U16.pack(self.keepalive) + payload
        return _packet(0x10, body)


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    return_code: int = ACCEPTED

    def encode(self) -> bytes:
        return bytes((0x20, 2, 1 if self.session_present else 0, self.return_code))


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None

    def encode(self) -> bytes:
        return encode_publish(
            self.topic.encode(), self.payload, self.qos, self.packet_id or 0, retain=self.retain, dup=self.dup
        )


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int

    def encode(self) -> bytes:
        return b"\x40\x02" + _U16.pack(self.packet_id)


@dataclass(frozen=True, slots=True)
class Pubrec:
    packet_id: int

    def encode(self) -> bytes:
        return b"\x50\x02" + _U16.pack(self.packet_id)


@dataclass(frozen=True, slots=True)
class Pubrel:
    packet_id: int

    def encode(self) -> bytes:
        return b"\x62\x02" + _U16.pack(self.packet_id)


@dataclass(frozen=True, slots=True)
class Pubcomp:
    packet_id: int

    def encode(self) -> bytes:
        return b"\x70\x02" + _U16.pack(self.packet_id)


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]

    def encode(self) -> bytes:
        body = _U16.pack(self.packet_id) + b"".join(_string(f) + bytes((q,)) for f, q in self.topics)
        return _packet(0x82, body)


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    return_codes: tuple[int, ...]

    def encode(self) -> bytes:
        return _packet(0x90, _U16.pack(self.packet_id) + bytes(self.return_codes))


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]

    def encode(self) -> bytes:
        return _packet(0xA2, _U16.pack(self.packet_id) + b"".join(_string(f) for f in self.topics))


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int

    def encode(self) -> bytes:
        return b"\xb0\x02" + _U16.pack(self.packet_id)


@dataclass(frozen=True, slots=True)
class Pingreq:
    def encode(self) -> bytes:
        return b"\xc0\x00"


@dataclass(frozen=True, slots=True)
class Pingresp:
    def encode(self) -> bytes:
        return PINGRESP_BYTES


@dataclass(frozen=True, slots=True)
class Disconnect:
    def encode(self) -> bytes:
        return b"\xe0\x00"


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
)

PINGRESP_BYTES = b"\xd0\x00"


# ------------------------------------------------------------------ encoding


def encode_length(length: int) -> bytes:
    """The remaining length as MQTT's varint (1-4 bytes, 7 bits each, low first)."""
    if length < 128:
        return bytes((length,))
    if length < 16_384:  # most deliveries: two bytes, without the loop
        return bytes((length & 0x7F | 0x80, length >> 7))
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_length(len(body)) + body


def _string(value: str) -> bytes:
    raw = value.encode()
    return _U16.pack(len(raw)) + raw


def _binary(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def encode_publish(
    topic: bytes, payload: bytes, qos: int, packet_id: int = 0, *, retain: bool = False, dup: bool = False
) -> bytes:
    """A PUBLISH from an already encoded topic: the broker's hot path, one join per packet."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    size = 2 + len(topic) + len(payload) + (2 if qos else 0)
    ident = _U16.pack(packet_id) if qos else b""
    return b"".join((bytes((first,)), encode_length(size), _U16.pack(len(topic)), topic, ident, payload))


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + _U16.pack(packet_id)


def only_pubacks(data: bytes) -> list[int] | None:
    """The packet ids if ``data`` is nothing but whole, valid PUBACKs (what ``Parser`` would
    accept); None for anything else, which then goes through ``Parser``.

    A subscriber answers every delivery with one, so a 1,000-member group message brings
    1,000 of them, each usually alone in its read: through the parser they were a sixth of
    the broker's time."""
    count, odd = divmod(len(data), 4)
    # The first byte turns away every other read (a PUBLISH of any size) before any slicing.
    if odd or not count or data[0] != 0x40 or data[0::4] != b"\x40" * count or data[1::4] != b"\x02" * count:
        return None
    ids = [(data[at] << 8) | data[at + 1] for at in range(2, len(data), 4)]
    return None if 0 in ids else ids


# ------------------------------------------------------------------ topics


def valid_topic_name(topic: str) -> bool:
    """A topic a PUBLISH may carry: non-empty, no wildcard, no NUL (4.7.1, 4.7.3, 1.5.3)."""
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """A topic filter a SUBSCRIBE may carry: '#' only alone and last, '+' only alone (4.7.1)."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


# ------------------------------------------------------------------ parsing

# Types each side may send, with the flags the fixed header must carry (None: PUBLISH,
# whose flags are DUP/QoS/RETAIN) and the exact remaining length where the type fixes one.
_FROM_CLIENT: dict[int, tuple[int | None, int | None]] = {
    CONNECT: (0, None),
    PUBLISH: (None, None),
    PUBACK: (0, 2),
    PUBREC: (0, 2),
    PUBREL: (2, 2),
    PUBCOMP: (0, 2),
    SUBSCRIBE: (2, None),
    UNSUBSCRIBE: (2, None),
    PINGREQ: (0, 0),
    DISCONNECT: (0, 0),
}
_FROM_SERVER: dict[int, tuple[int | None, int | None]] = {
    CONNACK: (0, 2),
    PUBLISH: (None, None),
    PUBACK: (0, 2),
    PUBREC: (0, 2),
    PUBREL: (2, 2),
    PUBCOMP: (0, 2),
    SUBACK: (0, None),
    UNSUBACK: (0, 2),
    PINGRESP: (0, 0),
}
_NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}
_PINGREQ, _PINGRESP, _DISCONNECT = Pingreq(), Pingresp(), Disconnect()


class Parser:
    """Splits one direction of a connection into packets.

    ``server=True`` parses what a client sends (the broker's side), ``server=False``
    what a server sends (a client's side). One parser per connection.
    """

    __slots__ = ("_buf", "_first_seen", "_last_topic", "_last_topic_raw", "_max_packet", "_pos", "_server", "_types")

    def __init__(self, *, server: bool = True, max_packet: int = MAX_REMAINING_LENGTH) -> None:
        self._server = server
        self._types = _FROM_CLIENT if server else _FROM_SERVER
        self._max_packet = max_packet
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._first_seen = False
        # A device publishes on one topic: its last one is decoded and checked once.
        self._last_topic_raw = b""
        self._last_topic = ""

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as packets."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos >= len(self._buf):
            self._buf, self._pos = bytes(data), 0
        else:
            rest = bytearray(memoryview(self._buf)[self._pos :])
            rest += data
            self._buf, self._pos = rest, 0

    def next(self) -> Packet | None:
        """The next whole packet, or None until more bytes arrive. Raises ``MqttError``."""
        buf, pos = self._buf, self._pos
        end = len(buf)
        if end - pos < 2:
            return None
        first = buf[pos]
        kind = first >> 4
        rule = self._types.get(kind)
        if rule is None:
            sender = "client" if self._server else "server"
            raise ProtocolViolation(f"packet type {kind} may not be sent by the {sender}")
        length, start = _read_length(buf, pos + 1, end)
        if start < 0:
            return None  # the remaining length is not complete yet
        self._check_header(kind, first & 0x0F, length, rule)
        if start + length > end:
            return None
        self._pos = start + length
        if not self._first_seen:
            self._check_first(kind)
        elif kind == CONNECT:
            raise ProtocolViolation("a second CONNECT")
        return self._parse(kind, first & 0x0F, buf, start, start + length)

    def _check_header(self, kind: int, flags: int, length: int, rule: tuple[int | None, int | None]) -> None:
        if length > self._max_packet:
            raise PacketTooLarge(f"a {_NAMES[kind]} of {length} bytes is above the limit of {self._max_packet}")
        required_flags, fixed_length = rule
        if required_flags is None:
            if flags & 0x06 == 0x06:
                raise ProtocolViolation("PUBLISH with QoS 3")
            if flags & 0x08 and not flags & 0x06:
                raise ProtocolViolation("PUBLISH with DUP set at QoS 0")
        elif flags != required_flags:
            raise ProtocolViolation(f"{_NAMES[kind]} with reserved flags {flags:#06b}")
        if fixed_length is not None and length != fixed_length:
            raise ProtocolViolation(f"{_NAMES[kind]} must have remaining length {fixed_length}, not {length}")

    def _check_first(self, kind: int) -> None:
        expected = CONNECT if self._server else CONNACK
        if kind != expected:
            raise ProtocolViolation(f"the first packet must be {_NAMES[expected]}, not {_NAMES[kind]}")
        self._first_seen = True

    def _parse(self, kind: int, flags: int, buf: bytes | bytearray, start: int, end: int) -> Packet:
        if kind == PUBLISH:
            return self._publish(flags, buf, start, end)
        if kind == PUBACK:
            return Puback(_packet_id(buf, start))
        if kind == PINGREQ:
            return _PINGREQ
        if kind == CONNECT:
            return _connect(buf, start, end)
        return _OTHERS[kind](buf, start, end)

    def _publish(self, flags: int, buf: bytes | bytearray, start: int, end: int) -> Publish:
        qos = (flags >> 1) & 0x03
        if end - start < 2:
            raise ProtocolViolation("PUBLISH too short for its topic")
        topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
        if topic_end > end:
            raise ProtocolViolation("PUBLISH topic runs past the packet")
        raw = bytes(buf[start + 2 : topic_end])
        if raw == self._last_topic_raw and raw:
            topic = self._last_topic
        else:
            topic = _utf8(raw, "PUBLISH topic")
            if not valid_topic_name(topic):
                raise ProtocolViolation("PUBLISH topic is empty or has a wildcard")
            self._last_topic_raw, self._last_topic = raw, topic
        packet_id = None
        if qos:
            if topic_end + 2 > end:
                raise ProtocolViolation("PUBLISH without its packet identifier")
            packet_id = _packet_id(buf, topic_end)
            topic_end += 2
        return Publish(topic, bytes(buf[topic_end:end]), qos, bool(flags & 1), bool(flags & 8), packet_id)


def _read_length(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """(remaining length, offset of the body); offset -1 when the varint is incomplete."""
    value = shift = 0
    for index in range(pos, min(pos + 4, end)):
        byte = buf[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if end - pos >= 4:
        raise ProtocolViolation("remaining length longer than 4 bytes")
    return 0, -1


def _utf8(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what} is not well-formed UTF-8") from None
    if "\x00" in text:
        raise ProtocolViolation(f"{what} contains NUL")
    return text


def _packet_id(buf: bytes | bytearray, at: int) -> int:
    ident = (buf[at] << 8) | buf[at + 1]
    if ident == 0:
        raise ProtocolViolation("packet identifier 0")
    return ident


class _Fields:
    """A cursor over one packet's body; every read checks it stays inside the packet."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: bytes | bytearray, start: int, end: int, what: str) -> None:
        self.buf, self.pos, self.end, self.what = buf, start, end, what

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ProtocolViolation(f"{self.what} ends before its fields")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        if self.pos + 2 > self.end:
            raise ProtocolViolation(f"{self.what} ends before its fields")
        value = (self.buf[self.pos] << 8) | self.buf[self.pos + 1]
        self.pos += 2
        return value

    def binary(self) -> bytes:
        size = self.u16()
        if self.pos + size > self.end:
            raise ProtocolViolation(f"a field of {self.what} runs past the packet")
        value = bytes(self.buf[self.pos : self.pos + size])
        self.pos += size
        return value

    def string(self, name: str) -> str:
        return _utf8(self.binary(), f"{self.what} {name}")

    @property
    def more(self) -> bool:
        return self.pos < self.end

    def done(self) -> None:
        if self.pos != self.end:
            raise ProtocolViolation(f"{self.end - self.pos} bytes after the fields of {self.what}")


def _connect(buf: bytes | bytearray, start: int, end: int) -> Connect:
    fields = _Fields(buf, start, end, "CONNECT")
    try:
        name = fields.binary().decode("utf-8", "replace")
        level = fields.byte()
    except ProtocolViolation:
        raise ProtocolViolation("truncated CONNECT") from None
    if (name, level) != ("MQTT", 4):
        raise UnsupportedProtocol(name, level)
    flags = fields.byte()
    keepalive = fields.u16()
    if flags & 0x01:
        raise ProtocolViolation("CONNECT with the reserved flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise ProtocolViolation("CONNECT with will QoS or retain but no will")
    if will_qos == 3:
        raise ProtocolViolation("CONNECT with will QoS 3")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolViolation("CONNECT with a password but no user name")
    client_id = fields.string("client id")
    will = None
    if will_flag:
        topic = fields.string("will topic")
        if not valid_topic_name(topic):
            raise ProtocolViolation("CONNECT will topic is empty or has a wildcard")
        will = Will(topic, fields.binary(), will_qos, will_retain)
    username = fields.string("user name") if flags & 0x80 else None
    password = fields.binary() if flags & 0x40 else None
    fields.done()
    return Connect(client_id, bool(flags & 0x02), keepalive, username, password, will)


def _connack(buf: bytes | bytearray, start: int, end: int) -> Connack:
    flags, code = buf[start], buf[start + 1]
    if flags & 0xFE:
        raise ProtocolViolation("CONNACK with reserved flags set")
    return Connack(bool(flags & 1), code)


def _subscribe(buf: bytes | bytearray, start: int, end: int) -> Subscribe:
    fields = _Fields(buf, start, end, "SUBSCRIBE")
    packet_id = fields.u16()
    if packet_id == 0:
        raise ProtocolViolation("packet identifier 0")
    topics = []
    while fields.more:
        topic_filter = fields.string("topic filter")
        qos = fields.byte()
        if qos > 2:  # reserved bits set, or QoS 3 (3.8.3-4)
            raise ProtocolViolation(f"SUBSCRIBE requesting QoS byte {qos:#04x}")
        if not valid_topic_filter(topic_filter):
            raise ProtocolViolation("SUBSCRIBE with an invalid topic filter")
        topics.append((topic_filter, qos))
    if not topics:
        raise ProtocolViolation("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(topics))


def _unsubscribe(buf: bytes | bytearray, start: int, end: int) -> Unsubscribe:
    fields = _Fields(buf, start, end, "UNSUBSCRIBE")
    packet_id = fields.u16()
    if packet_id == 0:
        raise ProtocolViolation("packet identifier 0")
    topics = []
    while fields.more:
        topic_filter = fields.string("topic filter")
        if not valid_topic_filter(topic_filter):
            raise ProtocolViolation("UNSUBSCRIBE with an invalid topic filter")
        topics.append(topic_filter)
    if not topics:
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, tuple(topics))


def _suback(buf: bytes | bytearray, start: int, end: int) -> Suback:
    fields = _Fields(buf, start, end, "SUBACK")
    packet_id = fields.u16()
    codes = tuple(buf[fields.pos : end])
    if not codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes):
        raise ProtocolViolation("SUBACK without valid return codes")
    return Suback(packet_id, codes)


_OTHERS: dict[int, Callable[[bytes | bytearray, int, int], Packet]] = {
    CONNACK: _connack,
    PUBREC: lambda buf, start, end: Pubrec(_packet_id(buf, start)),
    PUBREL: lambda buf, start, end: Pubrel(_packet_id(buf, start)),
    PUBCOMP: lambda buf, start, end: Pubcomp(_packet_id(buf, start)),
    SUBSCRIBE: _subscribe,
    SUBACK: _suback,
    UNSUBSCRIBE: _unsubscribe,
    UNSUBACK: lambda buf, start, end: Unsuback(_packet_id(buf, start)),
    PINGRESP: lambda buf, start, end: _PINGRESP,
    DISCONNECT: lambda buf, start, end: _DISCONNECT,
}
