"""A raw MQTT client over a socket, on the codec (core/mqtt.py): what a hostile client sends.

Well-formed packets come from the codec's encoders; ``packet`` and ``field`` build the
malformed ones the codec would never write.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Protocol

from mqchat.core import mqtt
from mqchat.core.mqtt import Connack, Connect, Publish, Subscribe, encode_length

CONNACK_ACCEPTED = Connack(False, mqtt.ACCEPTED).encode()
CONNACK_BAD_VERSION = Connack(False, mqtt.UNACCEPTABLE_PROTOCOL).encode()

__all__ = ["encode_length"]


def field(data: bytes | str) -> bytes:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def _encodable(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def connect(
    client_id: str, username: str | None = None, password: str | None = None, *, name: str = "MQTT", level: int = 4
) -> bytes:
    if (name, level) == ("MQTT", 4) and all(_encodable(t) for t in (client_id, username or "", password or "")):
        return Connect(client_id, True, 30, username, None if password is None else password.encode()).encode()
    # Another protocol version: laid out by hand (MQTT 5 adds properties after the keep-alive).
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = field(name) + bytes([level, flags]) + struct.pack("!H", 30) + (b"\x00" if level == 5 else b"")
    body += field(client_id) + (field(username) if username is not None else b"")
    return packet(0x10, body + (field(password) if password is not None else b""))


def publish(topic: str | bytes, payload: bytes, *, qos: int = 1, packet_id: int = 1) -> bytes:
    if isinstance(topic, str) and _encodable(topic) and mqtt.valid_topic_name(topic):
        return Publish(topic, payload, qos, packet_id=packet_id if qos else None).encode()
    body = field(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload  # deliberately malformed
    return packet(0x30 | (qos << 1), body)


def subscribe(topic: str | bytes, *, packet_id: int = 1, qos: int = 1) -> bytes:
    if isinstance(topic, str) and _encodable(topic) and mqtt.valid_topic_filter(topic) and qos <= 2:
        return Subscribe(packet_id, ((topic, qos),)).encode()
    return packet(0x82, struct.pack("!H", packet_id) + field(topic) + bytes([qos]))


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: mqtt.Parser = dataclass_field(default_factory=lambda: mqtt.Parser(server=False))
    _packets: list[bytes] = dataclass_field(default_factory=list)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self, timeout: float = 5) -> bytes:
        """One whole packet as bytes, or b"" when the server closes the connection."""
        async with asyncio.timeout(timeout):
            try:
                first = await self.reader.readexactly(1)
                length_bytes = b""
                while not length_bytes or length_bytes[-1] & 0x80:
                    length_bytes += await self.reader.readexactly(1)
                length, _ = mqtt._read_length(length_bytes, 0, len(length_bytes))
                return first + length_bytes + await self.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                return b""

    async def next_packet(self, timeout: float = 5) -> mqtt.Packet | None:
        """The next packet, parsed by the codec; None when the server closes the connection."""
        raw = await self.read_packet(timeout)
        if not raw:
            return None
        self.parser.feed(raw)
        return self.parser.next()

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
        """PUBACK a QoS 1 PUBLISH, as a client must."""
        if received[0] >> 4 != mqtt.PUBLISH or (received[0] >> 1) & 3 != 1:
            return
        parser = mqtt.Parser(server=False)
        parser.feed(CONNACK_ACCEPTED + received)
        parser.next()
        delivered = parser.next()
        assert isinstance(delivered, Publish) and delivered.packet_id is not None
        await self.send(mqtt.puback(delivered.packet_id))

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


@contextlib.asynccontextmanager
async def stalled_socket(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection whose receive window stays tiny: once we stop reading, the server's
    writes pile up on its side."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def ws_frame(data: bytes) -> bytes:
    """A masked binary WebSocket frame, as a client must send it (RFC 6455, 5.2)."""
    mask = os.urandom(4)
    size = len(data)
    head = bytes([0x82]) + (
        bytes([0x80 | size])
        if size < 126
        else bytes([0x80 | 126]) + struct.pack("!H", size)
        if size < 65536
        else bytes([0x80 | 127]) + struct.pack("!Q", size)
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def ws_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"no WebSocket upgrade: {head[:200]!r}")


class MqttListening(Protocol):
    @property
    def mqtt_port(self) -> int | None: ...


async def connack(server: MqttListening, user_id: str, device_id: str, token: str) -> bytes:
    """The CONNACK that a CONNECT as ``{user_id}:{device_id}`` with ``token`` gets."""
    assert server.mqtt_port is not None
    async with raw_client(server.mqtt_port) as raw:
        await raw.send(connect(f"{user_id}:{device_id}", user_id, token))
        return await raw.read_packet()
