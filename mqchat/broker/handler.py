"""amqtt's broker-side connection handler, with the per-packet hot path done inline.

amqtt 0.12 pays, for every packet a client sends, a task for ``asyncio.wait_for`` (its
keep-alive timeout) and a task for the packet's handler; for every QoS 1 delivery, a
task, a write lock, a future for the PUBACK and a ``wait_for`` task around it. Those
dominated the broker's CPU per chat message (docs/performance.md). ``ChatProtocolHandler``
keeps amqtt's handling for everything rare (SUBSCRIBE, UNSUBSCRIBE, DISCONNECT, QoS 2)
and does the frequent packets in place:

- reading: whole packets from the ``PacketGuard``; PUBACK, PINGREQ and QoS 0/1 PUBLISH
  are handled without a task; the keep-alive is a watchdog timer that looks at the
  time of the last packet, not a timeout around every read;
- PUBLISH on the device's own inbox goes straight to the chat service (``inbox``
  callback, set by the broker), in the order the device sent them; any other PUBLISH
  takes amqtt's path (ACL, plugins, broadcast);
- ``deliver`` writes a PUBLISH to a TCP connection at once and records it in the
  session's ``inflight_out`` until its PUBACK arrives (a resumed persistent session
  resends what is still there, as amqtt does). A WebSocket connection goes through
  amqtt's locked writer, whose frames must not interleave.

A peer that stops reading is closed once its unsent bytes or unacknowledged
PUBLISHes pass the limits: the store keeps every message, and the device catches up
from its cursor when it reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.errors import MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from mqchat.broker.guard import PacketGuard, StreamWriter

log = logging.getLogger(__name__)

PUBLISH, PUBACK, PINGREQ = 3, 4, 12
PINGRESP = b"\xd0\x00"

Inbox = Callable[[Session, str, bytes], bool]
"""Takes a PUBLISH the broker can accept at once (a device's own inbox); False: not such a one."""


def encode_publish(topic: bytes, data: bytes, qos: int, packet_id: int) -> bytes:
    """A PUBLISH packet (MQTT 3.1.1, 3.3), DUP and RETAIN clear."""
    body_len = 2 + len(topic) + (2 if qos else 0) + len(data)
    header = bytearray((0x30 | (qos << 1),))
    while True:
        byte = body_len & 0x7F
        body_len >>= 7
        header.append(byte | 0x80 if body_len else byte)
        if not body_len:
            break
    header += struct.pack("!H", len(topic))
    header += topic
    if qos:
        header += struct.pack("!H", packet_id)
    return bytes(header) + data


def parse_publish(packet: bytes) -> tuple[str, int, int | None, bytes, bool]:
    """(topic, qos, packet id, payload, retain) of a whole PUBLISH packet.

    Raises ``MQTTError`` on a packet shorter than its fields or a topic that is not UTF-8
    (MQTT 3.1.1, 1.5.3: the connection is then closed).
    """
    first = packet[0]
    qos, retain = (first >> 1) & 0b11, bool(first & 1)
    index = 1
    while packet[index] & 0x80:
        index += 1
    index += 1  # past the remaining length
    try:
        (topic_len,) = struct.unpack_from("!H", packet, index)
        start = index + 2
        topic = packet[start : start + topic_len].decode("utf-8")
        index = start + topic_len
        packet_id: int | None = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", packet, index)
            index += 2
    except (struct.error, UnicodeDecodeError) as exc:
        raise MQTTError(f"malformed PUBLISH: {exc}") from exc
    if len(topic.encode()) != topic_len or index > len(packet):
        raise MQTTError("malformed PUBLISH: the topic runs past the packet")
    return topic, qos, packet_id, packet[index:], retain


class ChatProtocolHandler(BrokerProtocolHandler):
    """See the module docstring. The broker sets ``inbox`` and the limits after CONNECT."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbox: Inbox | None = None
        self.max_buffered_bytes = 8 * 1024 * 1024
        self.max_unacked = 10_000
        self._last_read = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._listens_to_packets = False
        self._closing = False
        self._outbox: list[bytes] = []

    # ------------------------------------------------------------- writing

    def deliver(self, topic: str, data: bytes, qos: int) -> None:
        """Send a PUBLISH now (QoS 0 or 1) and return; its PUBACK is matched on arrival."""
        session, writer = self.session, self.writer
        if session is None or writer is None or self._closing:
            return
        if qos > QOS_1 or not isinstance(writer, StreamWriter):
            self._spawn_publish(topic, data, qos)
            return
        packet_id = 0
        if qos == QOS_1:
            if len(session.inflight_out) >= self.max_unacked:
                self._drop_slow_reader(f"{len(session.inflight_out)} PUBLISHes unacknowledged")
                return
            packet_id = session.next_packet_id
            session.inflight_out[packet_id] = OutgoingApplicationMessage(packet_id, topic, qos, data, False)
        self._send(encode_publish(topic.encode(), data, qos, packet_id))

    def _spawn_publish(self, topic: str, data: bytes, qos: int) -> None:
        task = asyncio.ensure_future(self.mqtt_publish(topic, data, qos, retain=False))
        task.add_done_callback(_ignore_outcome)

    def _drop_slow_reader(self, why: str) -> None:
        if self._closing or self.session is None:
            return
        self._closing = True
        log.warning("%s reads too slowly (%s): closing; it catches up when it reconnects", self.session.client_id, why)
        task = asyncio.ensure_future(self.handle_connection_closed())
        task.add_done_callback(_ignore_outcome)

    def _send(self, data: bytes) -> None:
        """Queue bytes for this turn of the event loop; they go out in one write.

        A group message is one PUBLISH to each member and a batch holds several: one
        ``send`` per packet was the broker's largest single cost.
        """
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(data)

    def _flush(self) -> None:
        writer = self.writer
        data = b"".join(self._outbox)
        self._outbox.clear()
        if not isinstance(writer, StreamWriter) or self._closing:
            return
        writer.write(data)
        if writer.buffered() > self.max_buffered_bytes:
            self._drop_slow_reader(f"{writer.buffered()} bytes unsent")

    def _write_now(self, data: bytes) -> None:
        writer = self.writer
        if isinstance(writer, StreamWriter):
            self._send(data)
        elif writer is not None:
            task = asyncio.ensure_future(self._locked_write(data))
            task.add_done_callback(_ignore_outcome)

    async def _locked_write(self, data: bytes) -> None:
        async with self._write_lock:
            if self.writer is not None:
                self.writer.write(data)
                await self.writer.drain()

    # ------------------------------------------------------------- reading

    async def _reader_loop(self) -> None:
        reader = self.reader
        if not isinstance(reader, PacketGuard) or self.session is None or self._reader_ready is None:
            await super()._reader_loop()
            return
        self._listens_to_packets = bool(self.plugins_manager._event_plugin_callbacks.get(MQTTEvents.PACKET_RECEIVED))
        running: deque[asyncio.Task[None]] = deque()
        self._reader_ready.set()
        self._arm_watchdog()
        try:
            while True:
                packet = await reader.next_packet()
                if not packet:
                    break
                self._last_read = self._loop.time()
                while running and running[0].done():
                    running.popleft()
                try:
                    task = await self._dispatch(reader, packet)
                except MQTTError as exc:
                    await reader.refuse(f"malformed packet: {exc}")
                    break
                if task is not None:
                    running.append(task)
        except asyncio.CancelledError:
            pass
        except NoDataError:
            pass
        except Exception as exc:  # amqtt's loop ends the connection on anything unexpected, as does this one
            log.warning("%s: unexpected error reading a packet: %r", self.session.client_id, exc)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            while running:
                running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _dispatch(self, reader: PacketGuard, packet: bytes) -> asyncio.Task[None] | None:
        kind = packet[0] >> 4
        if self._listens_to_packets or kind not in (PUBLISH, PUBACK, PINGREQ):
            return await self._dispatch_parsed(reader, packet)
        if kind == PUBACK:
            self._on_puback((packet[2] << 8) | packet[3])
        elif kind == PINGREQ:
            self._write_now(PINGRESP)
        else:
            topic, qos, packet_id, data, retain = parse_publish(packet)
            if qos > QOS_1:
                return await self._dispatch_parsed(reader, packet)
            self._on_publish(topic, qos, packet_id, data, retain)
        return None

    async def _dispatch_parsed(self, reader: PacketGuard, packet: bytes) -> asyncio.Task[None] | None:
        """amqtt's own parsing and handling, for the packets not done in place."""
        reader.replay(packet)
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            raise NoDataError("the connection closed while a packet was parsed")
        parsed = await packet_class(header).from_stream(reader, fixed_header=header)
        reader.replay(b"")
        await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=parsed, session=self.session)
        handle = getattr(self, _HANDLERS.get(header.packet_type, ""), None)
        if handle is None:
            return None
        return asyncio.create_task(handle(parsed))

    def _on_puback(self, packet_id: int) -> None:
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None:  # a delivery on amqtt's path: it clears its own record
            if not waiter.done():
                waiter.set_result(PubackPacket.build(packet_id))
        elif self.session is not None:
            self.session.inflight_out.pop(packet_id, None)

    def _on_publish(self, topic: str, qos: int, packet_id: int | None, data: bytes, retain: bool) -> None:
        session = self.session
        assert session is not None
        if retain or self.inbox is None or not self.inbox(session, topic, data):
            message = IncomingApplicationMessage(packet_id, topic, qos, data, retain)
            session.delivered_message_queue.put_nowait(message)
        if qos == QOS_1 and packet_id is not None:
            self._write_now(b"\x40\x02" + struct.pack("!H", packet_id))

    # ---------------------------------------------------------- keep-alive

    def _arm_watchdog(self) -> None:
        session = self.session
        if session is None or not session.keep_alive or session.keep_alive <= 0:
            return
        self._last_read = self._loop.time()
        self._watchdog = self._loop.call_later(session.keep_alive, self._check_silence)

    def _check_silence(self) -> None:
        session = self.session
        if session is None or not session.keep_alive:
            return
        silent_for = self._loop.time() - self._last_read
        if silent_for >= session.keep_alive:
            self.handle_read_timeout()
            return
        self._watchdog = self._loop.call_later(session.keep_alive - silent_for, self._check_silence)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await super().stop()


_HANDLERS = {
    1: "handle_connect",
    2: "handle_connack",
    3: "handle_publish",
    4: "handle_puback",
    5: "handle_pubrec",
    6: "handle_pubrel",
    7: "handle_pubcomp",
    8: "handle_subscribe",
    9: "handle_suback",
    10: "handle_unsubscribe",
    11: "handle_unsuback",
    12: "handle_pingreq",
    13: "handle_pingresp",
    14: "handle_disconnect",
}


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    # A delivery to a connection that closed meanwhile fails; the store has the message.
    if not task.cancelled():
        task.exception()
