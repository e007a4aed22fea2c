"""The few MQTT 3.1.1 packets the load generator needs, hand-encoded.

A general client library (paho, aiomqtt) spends more CPU per message than the
broker under test would; these encoders build each packet with one ``bytes`` join,
and ``PacketReader`` splits a byte stream into ``(type, flags, body)`` triples.
"""

from __future__ import annotations

import struct

CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBACK = 9
PINGRESP = 13

_U16 = struct.Struct("!H")


def _length(n: int) -> bytes:
    """MQTT's variable-length "remaining length" (1-4 bytes, 7 bits each)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _U16.pack(len(raw)) + raw


def connect(client_id: str, *, username: str | None = None, password: str | None = None, keepalive: int = 0) -> bytes:
    flags = 0x02  # clean session
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    body = _str("MQTT") + bytes((4, flags)) + _U16.pack(keepalive) + payload
    return b"\x10" + _length(len(body)) + body


def subscribe(packet_id: int, topics: list[str], qos: int = 1) -> bytes:
    body = _U16.pack(packet_id) + b"".join(_str(t) + bytes((qos,)) for t in topics)
    return b"\x82" + _length(len(body)) + body


def publish_header(topic: bytes) -> bytes:
    """The topic part of a QoS 1 PUBLISH, computed once per sender and reused."""
    return _U16.pack(len(topic)) + topic


def publish(topic_part: bytes, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH; ``topic_part`` comes from ``publish_header``."""
    size = len(topic_part) + 2 + len(payload)
    return b"\x32" + _length(size) + topic_part + _U16.pack(packet_id) + payload


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + _U16.pack(packet_id)


def disconnect() -> bytes:
    return b"\xe0\x00"


def parse_publish(flags: int, body: bytes) -> tuple[str, int | None, bytes]:
    """``(topic, packet id or None for QoS 0, payload)`` of a PUBLISH body."""
    (tlen,) = _U16.unpack_from(body, 0)
    topic = body[2 : 2 + tlen].decode()
    pos = 2 + tlen
    if flags & 0x06:
        (pid,) = _U16.unpack_from(body, pos)
        return topic, pid, body[pos + 2 :]
    return topic, None, body[pos:]


class PacketReader:
    """Accumulates bytes; ``packets()`` yields every complete packet and keeps the rest."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            first = buf[pos]
            size = shift = 0
            i = pos + 1
            complete = False
            while i < end and shift <= 21:
                byte = buf[i]
                i += 1
                size |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
            if not complete or i + size > end:
                break
            out.append((first >> 4, first & 0x0F, bytes(buf[i : i + size])))
            pos = i + size
        if pos:
            del buf[:pos]
        return out
