"""Hand-made MQTT 3.1.1 packets over a raw socket: what a hostile client sends."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
CONNACK_BAD_VERSION = b"\x20\x02\x00\x01"


def encode_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def field(data: bytes | str) -> bytes:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def connect(
    client_id: str, username: str | None = None, password: str | None = None, *, name: str = "MQTT", level: int = 4
) -> bytes:
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = field(name) + bytes([level, flags]) + struct.pack("!H", 30)
    if level == 5:
        body += b"\x00"  # MQTT 5: empty properties
    body += field(client_id)
    if username is not None:
        body += field(username)
    if password is not None:
        body += field(password)
    return packet(0x10, body)


def publish(topic: str | bytes, payload: bytes, *, qos: int = 1, packet_id: int = 1) -> bytes:
    body = field(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def subscribe(topic: str | bytes, *, packet_id: int = 1, qos: int = 1) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + field(topic) + bytes([qos]))


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self, timeout: float = 5) -> bytes:
        """One whole packet, or b"" when the server closes the connection."""
        async with asyncio.timeout(timeout):
            try:
                first = await self.reader.readexactly(1)
                length_bytes = b""
                while not length_bytes or length_bytes[-1] & 0x80:
                    length_bytes += await self.reader.readexactly(1)
                length = sum((b & 0x7F) << (7 * i) for i, b in enumerate(length_bytes))
                return first + length_bytes + await self.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                return b""

    async def next_of(self, first_byte: int, timeout: float = 5) -> bytes:
        """The next packet starting with ``first_byte`` (e.g. 0x90, SUBACK), skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                received = await self.read_packet(timeout)
                assert received, "the server closed the connection"
                if received[0] == first_byte:
                    return received
                await self.acknowledge(received)

    async def acknowledge(self, received: bytes) -> None:
        """PUBACK a QoS 1 PUBLISH: amqtt holds a connection's other work until it gets one."""
        if received[0] >> 4 != 3 or (received[0] >> 1) & 3 != 1:
            return
        start = 2
        while received[start - 1] & 0x80:
            start += 1
        (topic_length,) = struct.unpack_from("!H", received, start)
        packet_id = received[start + 2 + topic_length : start + 4 + topic_length]
        await self.send(b"\x40\x02" + packet_id)

    async def closed(self, timeout: float = 5) -> bool:
        """True once the server has closed the connection (whatever it sent before)."""
        async with asyncio.timeout(timeout):
            while await self.read_packet(timeout):
                pass
        return True


@contextlib.asynccontextmanager
async def raw_client(port: int, host: str = "127.0.0.1") -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
