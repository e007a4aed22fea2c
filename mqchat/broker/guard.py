"""A framing reader in front of amqtt: whole MQTT packets, checked before amqtt parses them.

amqtt reads a packet's fixed header and then trusts its remaining length: a client
announcing 200 MB makes it buffer 200 MB, a malformed length desynchronises the
stream, and its CONNECT parser misreads MQTT 5 (which has properties after the
keep-alive) so a v5 client hangs with no answer. ``PacketGuard`` sits between the
socket and amqtt and hands amqtt only packets that are

- no larger than ``limits.max_packet_bytes`` (checked on the fixed header, before
  a byte of the body is read);
- of a type a client may send, with the fixed-header flags MQTT 3.1.1 requires, and
  the exact length where the type fixes one;
- the first one a CONNECT for MQTT 3.1.1 (protocol "MQTT", level 4), sent within
  ``limits.connect_timeout_seconds``. MQTT 5, MQTT 3.1 ("MQIsdp", level 3) or any
  other version gets CONNACK 0x01 (unacceptable protocol version) and is closed.

amqtt's reads are served from the current packet only: a read that runs past the
end of the packet means amqtt disagrees with the declared length (a malformed
packet) and the connection is closed rather than parsed out of step. Any refusal
closes the connection (MQTT 3.1.1 has no error packet after CONNECT) and is logged
at WARNING with the peer and the client id, never with the packet's content.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBREL, SUBSCRIBE, UNSUBSCRIBE, DISCONNECT = 1, 2, 3, 6, 8, 10, 14
UNACCEPTABLE_PROTOCOL_VERSION = b"\x20\x02\x00\x01"  # CONNACK, session present 0, return code 0x01
# Types a client may send, with the exact remaining length where the type fixes it.
_CLIENT_TYPES: dict[int, int | None] = {1: None, 3: None, 4: 2, 5: 2, 6: 2, 7: 2, 8: None, 10: None, 12: 0, 14: 0}
_REQUIRED_FLAGS = {PUBREL: 0b0010, SUBSCRIBE: 0b0010, UNSUBSCRIBE: 0b0010}
_MAX_LENGTH_BYTES = 4  # the remaining length is a varint of at most 4 bytes
_CHUNK = 64 * 1024


class PacketRefused(Exception):
    """The client broke a limit or the protocol; the message says how (for the log)."""


def check_fixed_header(first: int, length: int, max_packet: int) -> None:
    """Refuse a packet on its fixed header alone, before its body is read."""
    kind, flags = first >> 4, first & 0x0F
    if kind not in _CLIENT_TYPES:
        raise PacketRefused(f"packet type {kind} may not be sent by a client")
    if length > max_packet:
        raise PacketRefused(f"packet of {length} bytes exceeds limits.max_packet_bytes={max_packet}")
    fixed = _CLIENT_TYPES[kind]
    if fixed is not None and length != fixed:
        raise PacketRefused(f"packet type {kind} must have remaining length {fixed}, not {length}")
    if kind == PUBLISH:
        if (flags >> 1) & 0b11 == 0b11:
            raise PacketRefused("PUBLISH with QoS 3")
    elif flags != _REQUIRED_FLAGS.get(kind, 0):
        raise PacketRefused(f"packet type {kind} with reserved flags {flags:#06b}")


def connect_version(body: bytes) -> tuple[str, int, str]:
    """(protocol name, level, client id) of a CONNECT body, read without amqtt.

    The client id is read only for MQTT 3.1.1 (other versions lay the payload out
    differently) and only for the log.
    """
    try:
        (name_len,) = struct.unpack_from("!H", body, 0)
        name = body[2 : 2 + name_len].decode("utf-8", "replace")
        level = body[2 + name_len]
        client_id = ""
        if name == "MQTT" and level == 4:
            (id_len,) = struct.unpack_from("!H", body, 2 + name_len + 4)
            start = 2 + name_len + 6
            client_id = body[start : start + min(id_len, 128)].decode("utf-8", "replace")
    except (struct.error, IndexError) as exc:
        raise PacketRefused("truncated CONNECT") from exc
    return name, level, client_id


class ChunkReader(Protocol):
    """A connection's incoming bytes, as they arrive."""

    async def read_some(self) -> bytes:
        """What is available now, at least one byte (waiting if none); b"" at the end."""
        ...

    def feed_eof(self) -> None: ...


class StreamChunks(ReaderAdapter):
    """A TCP connection's bytes, a buffer at a time: a PUBACK is 4 bytes, and reading each
    packet's header and body with their own awaits cost more than handling it."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read_some(self) -> bytes:
        return await self._reader.read(_CHUNK)

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.readexactly(n)

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class PacketGuard(ReaderAdapter):
    """Reads whole packets from ``inner``; amqtt reads them from here."""

    def __init__(self, inner: ChunkReader, writer: WriterAdapter, *, max_packet: int, connect_timeout: float) -> None:
        self._inner = inner
        self._buffer = bytearray()  # received, not yet taken
        self._writer = writer
        self._max_packet = max_packet
        self._connect_timeout = connect_timeout
        self._frame = bytearray()  # what is left of the current packet
        # The packet being read, kept across reads so that amqtt's keep-alive timeout
        # (which cancels a read) never loses bytes that were already taken off the socket.
        self._head = bytearray()
        self._connected = False
        self._closed = False
        self.client_id = ""
        peer = writer.get_peer_info()
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    async def read(self, n: int = -1) -> bytes:
        if self._closed or n == 0:
            return b""
        if not self._frame:
            try:
                self._frame = bytearray(await self._next_packet())
            except PacketRefused as exc:
                await self.refuse(str(exc))
                return b""
            if self._closed or not self._frame:
                return b""  # refused, or the end of the stream: amqtt sees "no more data"
        if n < 0:
            n = len(self._frame)
        if n > len(self._frame):
            await self.refuse(f"malformed packet: a field runs {n - len(self._frame)} bytes past its end")
            return b""
        out = bytes(self._frame[:n])
        del self._frame[:n]
        return out

    async def next_packet(self) -> bytes:
        """The next whole packet (fixed header included); b"" once the stream has ended or
        the guard refused (and closed) it."""
        if self._closed:
            return b""
        try:
            packet = await self._next_packet()
        except PacketRefused as exc:
            await self.refuse(str(exc))
            return b""
        return b"" if self._closed else packet

    def replay(self, packet: bytes) -> None:
        """Serve ``packet`` to amqtt's parsers (``from_stream``) through ``read``."""
        self._frame = bytearray(packet)

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    async def refuse(self, why: str, answer: bytes = b"", *, level: int = logging.WARNING) -> None:
        """Log, optionally answer, and close; amqtt then sees the end of the stream."""
        if self._closed:
            return
        self._closed = True
        log.log(level, "closing MQTT connection from %s (%s): %s", self.peer, self.client_id or "no client id", why)
        try:
            if answer:
                self._writer.write(answer)
                await self._writer.drain()  # amqtt's WebSocket writer sends only on drain
            await self._writer.close()
        except (OSError, ConnectionClosed, RuntimeError):
            pass  # already gone: nothing left to tell it

    async def _next_packet(self) -> bytes:
        if self._connected:
            return await self._read_packet()
        try:
            async with asyncio.timeout(self._connect_timeout):
                packet = await self._read_packet()
        except TimeoutError:
            raise PacketRefused(f"no CONNECT within {self._connect_timeout:g} s") from None
        await self._check_connect(packet)
        self._connected = True
        return packet

    async def _read_packet(self) -> bytes:
        """One whole packet, or b"" at the end of the stream."""
        # The type byte, then the remaining length: 1 to 4 bytes, the last without bit 7.
        while len(self._head) < 2 or self._head[-1] & 0x80:
            if len(self._head) > _MAX_LENGTH_BYTES:
                raise PacketRefused("remaining length longer than 4 bytes")
            # Every packet has at least two header bytes: one read takes both.
            byte = await self._read_exactly(1 if self._head else 2)
            if not byte:
                return b""
            if not self._head and byte[0] >> 4 == CONNECT and self._connected:
                raise PacketRefused("a second CONNECT")
            self._head += byte
        length = _decode_length(self._head[1:])
        check_fixed_header(self._head[0], length, self._max_packet)
        body = await self._read_exactly(length) if length else b""
        if len(body) < length:
            return b""
        packet = bytes(self._head) + body
        self._head.clear()
        return packet

    async def _read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or b"" at the end of the stream. Bytes already taken off the socket
        stay in the buffer when a read is cancelled (a CONNECT timeout)."""
        while len(self._buffer) < n:
            try:
                chunk = await self._inner.read_some()
            except (ConnectionError, ConnectionClosed):
                return b""
            if not chunk:
                return b""
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def _check_connect(self, packet: bytes) -> None:
        if not packet:
            return
        if packet[0] >> 4 != CONNECT:
            raise PacketRefused("the first packet must be CONNECT")
        body = packet[len(packet) - _remaining_length(packet) :]
        name, level, self.client_id = connect_version(body)
        if (name, level) != ("MQTT", 4):
            # MQTT 3.1.1, 3.1.2.2: answer 0x01 and disconnect. MQTT 5 clients (mosquitto,
            # paho) read this v3 CONNACK as "unsupported protocol version".
            # INFO, not WARNING: an old or new client is a mismatch, not an attack.
            why = f"protocol {name!r} level {level} is not MQTT 3.1.1"
            await self.refuse(why, UNACCEPTABLE_PROTOCOL_VERSION, level=logging.INFO)


def _decode_length(encoded: bytes | bytearray) -> int:
    value = 0
    for shift, byte in enumerate(encoded):
        value |= (byte & 0x7F) << (7 * shift)
    return value


def _remaining_length(packet: bytes) -> int:
    """The remaining length of a whole packet (fixed header + body), from its header."""
    index = 1
    while packet[index] & 0x80:
        index += 1
    return _decode_length(packet[1 : index + 1])


class WebSocketReader(ReaderAdapter):
    """amqtt's WebSocket reader repeats the last message when the peer closes mid-read;
    this one returns what it has and then b"" at the end of the connection."""

    def __init__(self, websocket: Any) -> None:
        self._ws = websocket
        self._buffer = bytearray()

    async def read_some(self) -> bytes:
        if not self._buffer:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                return b""
            return message.encode() if isinstance(message, str) else bytes(message)
        out = bytes(self._buffer)
        self._buffer.clear()
        return out

    async def read(self, n: int = -1) -> bytes:
        while len(self._buffer) < max(n, 1):
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                break
            self._buffer += message.encode() if isinstance(message, str) else message
        n = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def feed_eof(self) -> None:
        pass


class StreamWriter(StreamWriterAdapter):
    """amqtt's TCP writer, closing the socket even when the peer is gone.

    amqtt's marks itself closed, then drains: when the drain fails (connection reset) or
    never ends (a peer that stops reading), the socket is never closed and leaks until
    garbage collection. Here the drain is bounded and the socket closed whatever happens.
    """

    is_closed: bool

    def buffered(self) -> int:
        """Bytes written but not yet sent: what a peer that stops reading piles up."""
        transport = self._writer.transport
        return 0 if transport is None else int(transport.get_write_buffer_size())

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        try:
            async with asyncio.timeout(_CLOSE_DRAIN_SECONDS):
                await self._writer.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()
        except (OSError, TimeoutError, RuntimeError):
            pass  # closing anyway
        finally:
            self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_DRAIN_SECONDS):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass


_CLOSE_DRAIN_SECONDS = 5
