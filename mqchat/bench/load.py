"""The load generator: raw asyncio connections, a recorder and a rate-controlled driver.

Everything runs in one event loop in the bench process. Per packet the work is a
few bytes operations and a dict lookup, so one core drives tens of thousands of
packets per second; the report carries the generator's own CPU so a saturated
generator is visible rather than mistaken for a slow broker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mqchat.core import mqtt
from mqchat.core.mqtt import Connack, Connect, Disconnect, Puback, Publish, Suback, Subscribe


class Dialect(Protocol):
    """What differs between mqchat and a plain broker: credentials, topics, payloads."""

    def credentials(self, index: int) -> tuple[str, str | None, str | None]: ...

    def subscriptions(self, index: int, *, group: bool) -> list[str]: ...

    def send_topic(self, sender: int, recipient: int | None) -> bytes: ...

    def payload(self, msg_id: bytes, sender: int, recipient: int | None) -> bytes: ...

    def classify(self, payload: bytes) -> tuple[str, bytes]:
        """``("delivery" | "ack" | "refused" | "other", msg id)`` of a received payload."""
        ...


@dataclass
class Recorder:
    """Send times, deliveries and latencies, keyed by the message id in each payload."""

    expected_per_message: int = 1
    sent_at: dict[bytes, int] = field(default_factory=dict)
    sent_in_window: set[bytes] = field(default_factory=set)
    window: tuple[int, int] = (0, 2**63)
    delivered: dict[bytes, set[int]] = field(default_factory=dict)
    e2e_ns: list[tuple[int, int]] = field(default_factory=list)  # (send time, latency)
    ack_ns: list[int] = field(default_factory=list)
    puback_ns: list[int] = field(default_factory=list)
    refused: set[bytes] = field(default_factory=set)
    acked: set[bytes] = field(default_factory=set)
    duplicates: int = 0
    echoes: int = 0
    unknown: int = 0
    deliveries: int = 0
    delivered_in_window: int = 0
    completed: int = 0
    unexpected_disconnects: int = 0
    received: dict[int, int] = field(default_factory=dict)  # device index -> deliveries
    node_of: dict[int, int] | None = None
    """Device index -> the node it is connected to, for a cluster; None for a single server."""
    cross_e2e_ns: list[int] = field(default_factory=list)
    cross_delivered_in_window: int = 0

    def on_send(self, msg_id: bytes, now: int) -> None:
        self.sent_at[msg_id] = now

    def in_flight(self) -> int:
        return len(self.sent_at) - self.completed

    def on_delivery(self, msg_id: bytes, receiver: int, sender: int, now: int) -> None:
        if receiver == sender:
            self.echoes += 1
            return
        sent = self.sent_at.get(msg_id)
        if sent is None:
            self.unknown += 1
            return
        seen = self.delivered.get(msg_id)
        if seen is None:
            seen = self.delivered[msg_id] = set()
        elif receiver in seen:
            self.duplicates += 1
            return
        seen.add(receiver)
        self.deliveries += 1
        self.received[receiver] = self.received.get(receiver, 0) + 1
        if len(seen) == self.expected_per_message and msg_id not in self.refused:
            self.completed += 1
        nodes = self.node_of
        cross = nodes is not None and receiver in nodes and sender in nodes and nodes[receiver] != nodes[sender]
        if self.window[0] <= sent < self.window[1]:
            self.e2e_ns.append((sent, now - sent))
            if cross:
                self.cross_e2e_ns.append(now - sent)
        if self.window[0] <= now < self.window[1]:
            self.delivered_in_window += 1
            if cross:
                self.cross_delivered_in_window += 1

    def on_ack(self, msg_id: bytes, now: int) -> None:
        sent = self.sent_at.get(msg_id)
        if sent is not None and msg_id not in self.acked:
            self.acked.add(msg_id)
            if self.window[0] <= sent < self.window[1]:
                self.ack_ns.append(now - sent)

    def on_refused(self, msg_id: bytes) -> None:
        if msg_id in self.sent_at and msg_id not in self.refused:
            self.refused.add(msg_id)
            if len(self.delivered.get(msg_id, ())) < self.expected_per_message:
                self.completed += 1

    def lost(self) -> int:
        """Deliveries that never came for messages the server did not refuse."""
        missing = 0
        for msg_id in self.sent_at:
            if msg_id not in self.refused:
                missing += self.expected_per_message - len(self.delivered.get(msg_id, ()))
        return missing


CLIENTS_PER_SOURCE = 25_000
"""Clients per loopback source address: one address has about 28,000 ephemeral ports
(32768-60999) towards one server port, so 50,000 devices need two."""


def source_address(index: int, host: str) -> tuple[str, int] | None:
    """The first 25,000 clients connect from the kernel's choice; later ones to a loopback
    server from 127.0.0.2, 127.0.0.3, ... (all of 127/8 is local on Linux)."""
    spread = index // CLIENTS_PER_SOURCE
    if spread == 0 or not host.startswith("127."):
        return None
    return (f"127.0.0.{1 + spread % 254}", 0)


class BenchClient(asyncio.Protocol):
    """One MQTT connection: CONNECT/SUBSCRIBE, then QoS 1 publishes both ways."""

    def __init__(self, index: int, dialect: Dialect, recorder: Recorder) -> None:
        self.index = index
        self._dialect = dialect
        self._recorder = recorder
        self._parser = mqtt.Parser(server=False)
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.cycle(range(1, 65536))
        self._pubacks: dict[int, int] = {}
        self._waiter: asyncio.Future[mqtt.Packet] | None = None
        self.closing = False
        self.connected = False
        self.sent = 0
        self.local_port = 0

    # ------------------------------------------------------------ set-up

    async def start(self, host: str, port: int, topics: list[str], limit_s: float) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit_s):
            await loop.create_connection(lambda: self, host, port, local_addr=source_address(self.index, host))
            client_id, username, password = self._dialect.credentials(self.index)
            secret = None if password is None else password.encode()
            connack = await self._request(Connect(client_id, True, 0, username, secret).encode())
            if not isinstance(connack, Connack) or connack.return_code != mqtt.ACCEPTED:
                raise ConnectionError(f"CONNACK refused {connack!r} for {client_id}")
            suback = await self._request(Subscribe(1, tuple((topic, 1) for topic in topics)).encode())
            if not isinstance(suback, Suback) or mqtt.SUBACK_FAILURE in suback.return_codes:
                raise ConnectionError(f"SUBSCRIBE refused for {client_id}: {topics}")
        self.connected = True

    async def _request(self, packet: bytes) -> mqtt.Packet:
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(packet)
        return await self._waiter

    def close(self, *, abort: bool = False) -> None:
        self.closing = True
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.write(Disconnect().encode())
                self._transport.close()

    # ----------------------------------------------------------- traffic

    def publish(self, topic: bytes, msg_id: bytes, payload: bytes) -> None:
        assert self._transport is not None
        pid = next(self._ids)
        now = time.perf_counter_ns()
        self._pubacks[pid] = now
        self._recorder.on_send(msg_id, now)
        self._transport.write(mqtt.encode_publish(topic, payload, 1, pid))
        self.sent += 1

    # ---------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.local_port = int(transport.get_extra_info("sockname")[1])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connected and not self.closing:
            self._recorder.unexpected_disconnects += 1
        self.connected = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection {self.index} closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while (packet := self._parser.next()) is not None:
            if isinstance(packet, Publish):
                self._on_publish(packet)
            elif isinstance(packet, Puback):
                sent = self._pubacks.pop(packet.packet_id, None)
                if sent is not None:
                    self._recorder.puback_ns.append(time.perf_counter_ns() - sent)
            elif isinstance(packet, Connack | Suback) and self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(packet)

    def _on_publish(self, packet: Publish) -> None:
        now = time.perf_counter_ns()
        if packet.packet_id is not None and self._transport is not None:
            self._transport.write(mqtt.puback(packet.packet_id))
        what, msg_id = self._dialect.classify(packet.payload)
        if what == "delivery":
            sender = int(msg_id[: msg_id.index(b".")])
            self._recorder.on_delivery(msg_id, self.index, sender, now)
        elif what == "ack":
            self._recorder.on_ack(msg_id, now)
        elif what == "refused":
            self._recorder.on_refused(msg_id)


async def connect_all(
    clients: Sequence[BenchClient],
    address: Callable[[int], tuple[str, int]],
    topics: Callable[[int], list[str]],
    *,
    concurrency: int,
    limit_s: float,
    progress: Callable[[str], None],
) -> list[str]:
    """Connect and subscribe every client (to ``address(index)``), ``concurrency`` at a time;
    returns the failures."""
    failures: list[str] = []
    queue = iter(clients)
    done = 0

    async def worker() -> None:
        nonlocal done
        for client in queue:
            try:
                await client.start(*address(client.index), topics(client.index), limit_s)
            except (OSError, TimeoutError) as exc:
                failures.append(f"{client.index}: {exc!r}")
                client.close(abort=True)
            done += 1
            if done % 1000 == 0:
                progress(f"  connected {done}/{len(clients)}")

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return failures
