"""One MQTT connection: bytes from the socket through the codec to the broker, and back.

TCP connections are ``asyncio.Protocol``s: a packet is handled in ``data_received``,
with no task and no read loop per connection (a coroutine and a ``StreamReader`` per
idle device were most of its memory). A packet whose handling must wait (CONNECT's
token check, a SUBSCRIBE's membership lookups) pauses reading; the rest of what
arrived is handled, in order, once it is done. WebSocket connections feed the same
object from the ``websockets`` handler.

Writing is the same for both, with the same limits: everything written in one turn of
the event loop goes out as one write. A peer that stops reading is closed once its
unsent bytes pass ``limits.max_outgoing_buffer_bytes`` or its unacknowledged QoS 1
deliveries pass ``limits.max_unacked_deliveries``; the store keeps every message and the
device catches up from its cursor when it reconnects.

Inbound QoS 2 is supported, bounded: the command is handled when the PUBLISH arrives
(the store's ``client_msg_id`` de-duplication is what makes a send exactly-once) and
only its packet id is remembered until PUBREL, at most ``limits.max_inflight_qos2`` per
connection. Subscriptions are granted at QoS 1 at most, so nothing goes out at QoS 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from mqchat import logs
from mqchat.bridge.metrics import Metrics
from mqchat.config import LimitsSettings
from mqchat.core import mqtt
from mqchat.core.ids import DeviceAddress
from mqchat.core.mqtt import (
    Connack,
    Connect,
    MqttError,
    Packet,
    PacketTooLarge,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
    UnsupportedProtocol,
    Will,
)

if TYPE_CHECKING:
    from mqchat.broker.sessions import Session

log = logging.getLogger(__name__)


class State(enum.Enum):
    AWAITING_CONNECT = 1
    AUTHENTICATING = 2
    CONNECTED = 3
    CLOSING = 4
    CLOSED = 5


class Flusher:
    """Writes, once per turn of the event loop, what each connection queued during it.

    One callback for all of them rather than one per connection: a group message queues one
    delivery on every member's connection, and a callback each cost more than the writes'
    own Python."""

    __slots__ = ("_queued",)

    def __init__(self) -> None:
        self._queued: list[MqttConnection] = []

    def add(self, connection: MqttConnection) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(connection)

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for connection in queued:
            try:
                connection.flush()
            except Exception:  # one transport's failure must not hold the others' bytes back
                log.exception("writing to %r failed", connection)


class Broker(Protocol):
    """What a connection asks of the broker (``MqttServer``)."""

    metrics: Metrics
    flusher: Flusher

    def connect(self, connection: MqttConnection, packet: Connect) -> Awaitable[None]: ...

    def publish_received(
        self, connection: MqttConnection, packet: Publish, answered: Callable[[], None] | None = None
    ) -> bool: ...

    def subscribe(self, connection: MqttConnection, packet: Subscribe) -> Awaitable[None]: ...

    def unsubscribe(self, connection: MqttConnection, packet: Unsubscribe) -> None: ...

    def connection_lost(self, connection: MqttConnection) -> None: ...

    def spawn(self, work: Awaitable[None]) -> None: ...


class Writer(Protocol):
    """The sending half of a transport."""

    def write(self, data: bytes) -> None: ...

    def buffered(self) -> int:
        """Bytes accepted but not yet sent."""
        ...

    def close(self, *, abort: bool) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class TcpWriter:
    __slots__ = ("_transport",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def buffered(self) -> int:
        return int(self._transport.get_write_buffer_size())

    def close(self, *, abort: bool) -> None:
        # Abort for a peer that does not read: close() would wait for its buffer forever.
        if abort:
            self._transport.abort()
        else:
            self._transport.close()

    def pause_reading(self) -> None:
        if self._transport.is_reading():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing() and not self._transport.is_reading():
            self._transport.resume_reading()


class MqttConnection(asyncio.Protocol):
    """See the module docstring. ``device``/``session`` are set by the broker once CONNECT passes."""

    __slots__ = (
        "__weakref__",
        "_acks",
        "_broker",
        "_busy",
        "_inflight",
        "_last_read",
        "_limits",
        "_loop",
        "_next_id",
        "_out",
        "_parser",
        "_qos2",
        "_watchdog",
        "_writer",
        "clean_exit",
        "device",
        "epoch",
        "inbox",
        "keepalive",
        "listener",
        "peer",
        "replaced",
        "session",
        "state",
        "will",
    )

    def __init__(self, broker: Broker, limits: LimitsSettings, listener: str) -> None:
        self._broker = broker
        self._limits = limits
        self.listener = listener
        self._loop = asyncio.get_running_loop()
        self._parser = mqtt.Parser(server=True, max_packet=limits.max_packet_bytes)
        self._writer: Writer | None = None
        self._out: list[bytes] = []
        self._inflight: set[int] = set()
        self._acks: deque[list[int | bool]] = deque()  # QoS 1 PUBACKs in PUBLISH order: [packet id, ready]
        self._next_id = 0
        self._qos2: set[int] = set()
        self._busy = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self.state = State.AWAITING_CONNECT
        self.peer = "?"
        self.device: DeviceAddress | None = None
        self.epoch = 0
        """Orders connections of one client id across the cluster: the newer one wins."""
        self.session: Session | None = None
        self.inbox = ""
        self.keepalive = 0.0
        self.will: Will | None = None
        self.clean_exit = False
        self.replaced = False

    @property
    def _about(self) -> dict[str, str | None]:
        """A log record's context when it is logged outside this connection's handling (timers,
        write callbacks): about this connection, whatever context scheduled the callback."""
        return {"client_id": self.device.client_id if self.device is not None else None, "command": None}

    def __repr__(self) -> str:
        who = self.device.client_id if self.device is not None else "no client id"
        return f"<MQTT connection {self.peer} ({who})>"

    # --------------------------------------------------------- the transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.attach(TcpWriter(cast(asyncio.Transport, transport)), transport.get_extra_info("peername"))

    def attach(self, writer: Writer, peer: Any) -> None:
        self._writer = writer
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self._watchdog = self._loop.call_later(self._limits.connect_timeout_seconds, self._connect_timed_out)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self.closed:
            return
        if self.state is State.CONNECTED and not self._busy and not self._parser.buffered:
            acked = mqtt.only_pubacks(data)
            if acked is not None:
                self._inflight.difference_update(acked)
                return
        self._parser.feed(data)
        if not self._busy:
            self._handle_buffered()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._writer = None
        self._cancel_watchdog()
        self._out.clear()
        self._broker.connection_lost(self)

    @property
    def closed(self) -> bool:
        """Closing or closed: nothing more is read or delivered."""
        return self.state is State.CLOSING or self.state is State.CLOSED

    # -------------------------------------------------------------- reading

    def _handle_buffered(self) -> None:
        # What is logged while this connection's packets are handled (and by the tasks they
        # start) is about its client id (mqchat.logs); the command type is set by the chat service.
        about = logs.client_id.set(self.device.client_id if self.device is not None else None)
        doing = logs.command.set(None)
        try:
            self._handle_packets()
        finally:
            logs.command.reset(doing)
            logs.client_id.reset(about)

    def _handle_packets(self) -> None:
        while not self.closed:
            try:
                packet = self._parser.next()
            except UnsupportedProtocol as exc:
                # MQTT 3.1.1, 3.1.2.2: answer 0x01 and close. Not an attack: logged at INFO.
                log.info("closing MQTT connection from %s: %s", self.peer, exc)
                self._broker.metrics.connect_answered(mqtt.UNACCEPTABLE_PROTOCOL)
                self.send(Connack(False, mqtt.UNACCEPTABLE_PROTOCOL).encode())
                self.close()
                return
            except PacketTooLarge as exc:
                self.refuse(f"{exc} (limits.max_packet_bytes)")
                return
            except MqttError as exc:
                self.refuse(f"{exc}")
                return
            if packet is None:
                return
            pending = self._handle(packet)
            if pending is not None:
                self._wait_for(pending)
                return

    def _handle(self, packet: Packet) -> Awaitable[None] | None:
        """Handle one packet; an awaitable when what follows must wait for it."""
        if isinstance(packet, Publish):
            self._on_publish(packet)
        elif isinstance(packet, Puback):
            self._inflight.discard(packet.packet_id)
        elif isinstance(packet, Pingreq):
            self.send(mqtt.PINGRESP_BYTES)
        elif isinstance(packet, Connect):
            self.state = State.AUTHENTICATING
            self._cancel_watchdog()
            return self._broker.connect(self, packet)
        elif isinstance(packet, Subscribe):
            return self._broker.subscribe(self, packet)
        elif isinstance(packet, Unsubscribe):
            self._broker.unsubscribe(self, packet)
        elif isinstance(packet, Pubrel):
            self._qos2.discard(packet.packet_id)
            self.send(Pubcomp(packet.packet_id).encode())
        elif isinstance(packet, mqtt.Disconnect):
            self.clean_exit = True  # MQTT 3.1.2.5: a DISCONNECT discards the will
            self.close()
        # PUBREC and PUBCOMP answer a QoS 2 delivery, which this broker never makes.
        return None

    def _on_publish(self, packet: Publish) -> None:
        if packet.qos == 2:
            if packet.packet_id in self._qos2:
                self.send(Pubrec(packet.packet_id or 0).encode())
                return  # a resend before PUBREL: handled once already
            if len(self._qos2) >= self._limits.max_inflight_qos2:
                self.refuse(f"more than {self._limits.max_inflight_qos2} QoS 2 PUBLISHes without PUBREL")
                return
        if packet.qos == 1:
            # A send's PUBACK waits until it is stored (or refused): then it leaves with the
            # message_ack in one write, and it too means stored. PUBACKs still go out in the
            # order of their PUBLISHes (MQTT 3.1.1, 4.6): the others wait behind a pending one.
            ticket: list[int | bool] = [packet.packet_id or 0, False]
            self._acks.append(ticket)
            if not self._broker.publish_received(self, packet, functools.partial(self._answered, ticket)):
                ticket[1] = True
            logs.command.set(None)  # the next packet is another command
            self._send_acks()
            return
        self._broker.publish_received(self, packet)
        logs.command.set(None)  # the next packet is another command
        if packet.qos == 2:
            self._qos2.add(packet.packet_id or 0)
            self.send(Pubrec(packet.packet_id or 0).encode())

    def _answered(self, ticket: list[int | bool]) -> None:
        ticket[1] = True
        self._send_acks()

    def _send_acks(self) -> None:
        acks = self._acks
        while acks and acks[0][1]:
            self.send(mqtt.puback(int(acks.popleft()[0])))

    def _wait_for(self, pending: Awaitable[None]) -> None:
        self._busy = True
        if self._writer is not None:
            self._writer.pause_reading()
        self._broker.spawn(self._resume_after(pending))

    async def _resume_after(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            log.exception("%r: handling a packet failed; closing", self, extra=self._about)
            self.close(abort=True)
        finally:
            self._busy = False
        if self.closed:
            return
        if self._writer is not None:
            self._writer.resume_reading()
        self._handle_buffered()

    # ------------------------------------------------------- once connected

    def accepted(self, keepalive: int) -> None:
        """CONNECT passed: start the keep-alive watchdog (1.5 x the client's, 3.1.2.10)."""
        self.state = State.CONNECTED
        if keepalive > 0:
            self.keepalive = keepalive * 1.5
            self._last_read = self._loop.time()
            self._watchdog = self._loop.call_later(self.keepalive, self._check_silence)

    def deliver(self, topic: bytes, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """Send a PUBLISH (QoS 0 or 1) now; a QoS 1 one is remembered until its PUBACK."""
        if self.state is not State.CONNECTED:
            return
        packet_id = 0
        if qos:
            inflight = self._inflight
            if len(inflight) >= self._limits.max_unacked_deliveries:
                self.drop_slow_reader(f"{len(inflight)} PUBLISHes unacknowledged")
                return
            # The next id, free unless 65,535 deliveries ago one is still unacknowledged:
            # inline, as a group message runs this once per member.
            packet_id = self._next_id = self._next_id % 65535 + 1
            if packet_id in inflight:
                packet_id = self._allocate_id()
            inflight.add(packet_id)
        self.send(mqtt.encode_publish(topic, payload, 1 if qos else 0, packet_id, retain=retain))

    def _allocate_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight:
                return self._next_id

    @property
    def unacknowledged(self) -> int:
        return len(self._inflight)

    # -------------------------------------------------------------- writing

    def send(self, data: bytes) -> None:
        """Queue bytes for this turn of the event loop; they go out in one write."""
        if self._writer is None:
            return
        if not self._out:  # nothing queued yet: the flusher does not know this connection
            self._broker.flusher.add(self)
        self._out.append(data)

    def flush(self) -> None:
        """Write what was queued (the flusher calls this once per turn of the event loop)."""
        writer = self._writer
        if writer is None or self.closed or not self._out:
            self._out.clear()
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        writer.write(data)
        buffered = writer.buffered()
        if buffered > self._limits.max_outgoing_buffer_bytes:
            self.drop_slow_reader(f"{buffered} bytes unsent")

    def drop_slow_reader(self, why: str) -> None:
        if self.closed:
            return
        log.warning("%r reads too slowly (%s): closing; it catches up when it reconnects", self, why, extra=self._about)
        self._broker.metrics.slow_reader_dropped()
        self.close(abort=True)

    def refuse(self, why: str) -> None:
        """A protocol violation or a broken limit: log once and close (MQTT has no error packet)."""
        if self.closed:
            return
        log.warning("closing %r: %s", self, why, extra=self._about)
        self.close(abort=True)

    def close(self, *, abort: bool = False) -> None:
        """Close the connection; ``connection_lost`` follows from the transport."""
        writer = self._writer
        if writer is None or self.state is State.CLOSING:
            return
        if not abort and self._out:
            self.flush()  # the flusher's turn then finds nothing queued
            writer = self._writer
            if writer is None or self.closed:  # the flush found a slow reader and aborted
                return
        self.state = State.CLOSING
        self._cancel_watchdog()
        with contextlib.suppress(RuntimeError):
            writer.close(abort=abort)

    # ----------------------------------------------------------- timers

    def _connect_timed_out(self) -> None:
        self._watchdog = None
        if self.state is State.AWAITING_CONNECT:
            self.refuse(f"no CONNECT within {self._limits.connect_timeout_seconds:g} s")

    def _check_silence(self) -> None:
        silent_for = self._loop.time() - self._last_read
        if silent_for >= self.keepalive:
            self._watchdog = None
            log.info("%r silent for 1.5 x its keep-alive: closing", self, extra=self._about)
            self.close(abort=True)
            return
        self._watchdog = self._loop.call_later(self.keepalive - silent_for, self._check_silence)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class WebSocketWriter:
    """The sending half of a WebSocket connection, with the same limits as TCP.

    ``websockets`` sends through a coroutine: one task per connection drains what
    the connection wrote, so a peer that stops reading grows ``buffered()`` (and is
    closed) instead of a task per message piling up.
    """

    __slots__ = ("_closing", "_pending", "_reading", "_task", "_wake", "_ws")

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._pending = bytearray()
        self._wake = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def write(self, data: bytes) -> None:
        self._pending += data
        self._wake.set()

    def buffered(self) -> int:
        transport = self._ws.transport
        return len(self._pending) + (0 if transport is None else int(transport.get_write_buffer_size()))

    def close(self, *, abort: bool) -> None:
        self._closing = True
        if abort:
            self._pending.clear()
            self._ws.transport.abort()
        self._wake.set()
        self._reading.set()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def reading_allowed(self) -> None:
        await self._reading.wait()

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    chunk = bytes(self._pending)
                    self._pending.clear()
                    # One WebSocket message may carry several MQTT packets (MQTT 3.1.1, 6.0).
                    await self._ws.send(chunk)
                if self._closing:
                    await self._ws.close()
                    return

    async def finish(self) -> None:
        """Send what is pending (unless aborted), close, and stop; bounded for a peer that does not read."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                await self._task
        except TimeoutError:
            self._ws.transport.abort()
        finally:
            self._task.cancel()


_CLOSE_SECONDS = 5


async def serve_websocket(ws: ServerConnection, connection: MqttConnection) -> None:
    """Feed a WebSocket's messages to its MQTT connection until either side closes."""
    writer = WebSocketWriter(ws)
    connection.attach(writer, ws.remote_address)
    try:
        async for message in ws:
            connection.data_received(message.encode() if isinstance(message, str) else message)
            if connection.closed:
                break
            await writer.reading_allowed()
    except ConnectionClosed:
        pass
    finally:
        connection.connection_lost(None)
        await writer.finish()
