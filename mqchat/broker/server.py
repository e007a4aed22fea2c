"""The MQTT side of mqchat: connections, sessions, the ACL, and delivery, in one path.

Every command enters through one place (``publish_received``: a device's PUBLISH, or
its Last Will once its connection ends without DISCONNECT, both checked by the same
publish ACL) and every event leaves through one (``publish``: the chat service's
publisher). The listeners are started by amqtt's broker (``amqtt_host.py``, the one
module that touches amqtt); everything per connection is ours (docs/architecture.md,
"The broker").
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import websockets
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection

from mqchat.bridge.cluster import Degraded, group_channel, user_channel
from mqchat.bridge.composition import Services
from mqchat.bridge.ratelimit import NewKeyBudget
from mqchat.broker.acl import TopicAcl, group_of
from mqchat.broker.connection import Flusher, MqttConnection, serve_websocket
from mqchat.broker.sessions import Session, SessionTable, Subscriptions
from mqchat.config import Settings
from mqchat.core import mqtt
from mqchat.core.errors import ChatError, StorageUnavailable
from mqchat.core.ids import DeviceAddress
from mqchat.core.mqtt import Connack, Connect, Publish, Suback, Subscribe, Unsuback, Unsubscribe
from mqchat.core.protocol import error_event
from mqchat.core.topics import (
    GROUP_PREFIX,
    PRESENCE_PREFIX,
    STREAM_PREFIX,
    device_topic,
    id_after,
    inbox_topic,
    may_publish,
)
from mqchat.logthrottle import ThrottleFilter

log = logging.getLogger(__name__)
# Refused CONNECTs and SUBSCRIBEs are logged per attempt, and a hostile token can make
# attempts as fast as it opens sockets (1,400 lines a second in the attack re-run): at most one
# line per template per 10 s, with a count of the ones left out. Metrics count every refusal.
log.addFilter(ThrottleFilter())

ListenerKind = Literal["tcp", "ws"]
LISTEN_BACKLOG = 4096  # a connect storm overflowed asyncio's default of 100; the kernel caps it at somaxconn
_SWEEP_SECONDS = 30


class ListenerPortTaken(Exception):
    """A listener's port was taken when it came to bind (after ``check_ports`` found it free)."""

    def __init__(self, listener: str, port: int) -> None:
        super().__init__(f"listener {listener}: port {port} is already in use")
        self.listener = listener
        self.port = port


@dataclass
class _Listener:
    name: str
    server: asyncio.Server | WsServer
    open: int = 0


@dataclass
class _CatchUp:
    """One catch-up at a time per session; a subscription landing meanwhile runs it once more."""

    task: asyncio.Task[None] | None = None
    again: bool = False


class MqttServer:
    """Implements the chat service's ``Publisher`` and ``SessionControl``."""

    def __init__(self, services: Services, settings: Settings | None = None) -> None:
        self._services = services
        self._chat = services.chat
        self.metrics = services.metrics
        self.metrics.watch_broker(self)
        self.flusher = Flusher()
        self._settings = settings or services.settings
        self._limits = self._settings.limits
        self._acl = TopicAcl(services.chat)
        self._cluster = services.chat.cluster
        self._epochs = itertools.count(1)  # a single node orders connections itself
        self._subscriptions = Subscriptions()
        self._subscriptions.on_empty = self._topic_empty
        self._sessions = SessionTable(
            self._subscriptions,
            expiry_seconds=self._limits.session_expiry_seconds,
            max_offline_per_user=self._limits.max_offline_sessions_per_user,
        )
        # user id -> {client id: its live connection}: connections per user, closing a user's devices.
        self._live: dict[str, dict[str, MqttConnection]] = {}
        self._new_devices = NewKeyBudget(self._limits.max_new_devices_per_hour, 3600)
        self._listeners: dict[str, _Listener] = {}
        self._catch_ups: dict[Session, _CatchUp] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ listeners

    async def listen(
        self, name: str, kind: ListenerKind, host: str | None, port: int, ssl_context: ssl.SSLContext | None
    ) -> asyncio.Server | WsServer:
        """Start one listener; the returned server is amqtt's ``Server.instance``."""
        try:
            return await self._listen(name, kind, host, port, ssl_context)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenerPortTaken(name, port) from exc
            raise

    async def _listen(
        self, name: str, kind: ListenerKind, host: str | None, port: int, ssl_context: ssl.SSLContext | None
    ) -> asyncio.Server | WsServer:
        server: asyncio.Server | WsServer
        if kind == "tcp":
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                partial(self._tcp_connection, name),
                host,
                port,
                reuse_address=True,
                ssl=ssl_context,
                backlog=LISTEN_BACKLOG,
            )
        else:
            server = await websockets.serve(
                partial(self._ws_connection, name),
                host,
                port,
                ssl=ssl_context,
                subprotocols=[websockets.Subprotocol("mqtt")],
                # websockets would otherwise buffer a message of up to 1 MiB before the codec sees its length.
                max_size=self._limits.max_packet_bytes + 16,
                backlog=LISTEN_BACKLOG,
            )
        self._listeners[name] = _Listener(name, server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_sessions(), name="mqchat-session-expiry")
        return server

    def bound_port(self, name: str) -> int | None:
        listener = self._listeners.get(name)
        if listener is None:
            return None
        return int(next(iter(listener.server.sockets)).getsockname()[1])

    def _admit(self, name: str) -> _Listener | None:
        listener = self._listeners[name]
        if listener.open >= self._limits.max_connections_per_listener:
            log.warning("listener %s holds %d connections (limits.max_connections_per_listener): refusing one",
                        name, listener.open)  # fmt: skip
            return None
        listener.open += 1
        return listener

    def _tcp_connection(self, name: str) -> asyncio.Protocol:
        if self._admit(name) is None:
            return _Refused()
        return MqttConnection(self, self._limits, name)

    async def _ws_connection(self, name: str, ws: ServerConnection) -> None:
        if self._admit(name) is None:
            await ws.close(1013, "too many connections")
            return
        await serve_websocket(ws, MqttConnection(self, self._limits, name))

    async def close(self) -> None:
        """Stop accepting and end every connection (amqtt's shutdown then closes the listeners)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for listener in self._listeners.values():
            listener.server.close()
        for live in list(self._live.values()):
            for connection in list(live.values()):
                connection.close(abort=True)
        for state in list(self._catch_ups.values()):
            if state.task is not None:
                state.task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports report connection_lost

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -------------------------------------------------------------- CONNECT

    async def connect(self, connection: MqttConnection, packet: Connect) -> None:
        """Authenticate before any session is touched; a refused client gets its CONNACK and is closed."""
        device, code = await self._authenticate(packet)
        if device is not None:
            code = self._check_limits(connection, device, packet)
        if device is not None and code == mqtt.ACCEPTED:
            code = await self._admit_device(connection, device)
        if connection.closed:
            return
        self.metrics.connect_answered(code)
        if device is None or code != mqtt.ACCEPTED:
            if device is None:  # a refusal by a limit has been logged where it was decided, with its reason
                log.info(
                    "refused MQTT connection from %s (%s): CONNACK %d", connection.peer, packet.client_id[:80], code
                )
            connection.send(Connack(False, code).encode())
            connection.close()
            return
        session, resumed = self._open_session(connection, device, packet)
        connection.send(Connack(resumed, mqtt.ACCEPTED).encode())
        connection.accepted(packet.keepalive)
        if self._cluster is not None:  # the device's older connection on another node goes
            self._cluster.control("takeover", client_id=device.client_id, epoch=connection.epoch)
        if resumed and not connection.closed:
            await self._resume(connection, session)

    async def _admit_device(self, connection: MqttConnection, device: DeviceAddress) -> int:
        """The cluster-wide checks and the device's presence: an epoch orders this connection
        against the client id's others; the user may have ``limits.max_connections_per_user``
        devices connected across all nodes."""
        if self._cluster is not None:
            try:
                new_device_ok = await self._cluster.admit_new_device(
                    device, self._limits.max_new_devices_per_hour, 3600
                )
                connection.epoch = await self._cluster.next_epoch()
            except Degraded:
                new_device_ok, connection.epoch = True, next(self._epochs)
            if not new_device_ok:
                log.warning("refused %s: %s connected %d new device ids this hour (limits.max_new_devices_per_hour)",
                            device.client_id, device.user_id, self._limits.max_new_devices_per_hour)  # fmt: skip
                return mqtt.NOT_AUTHORIZED
        else:
            connection.epoch = next(self._epochs)
        if not await self._chat.device_connected(device, connection.epoch, self._limits.max_connections_per_user):
            log.warning("refused %s: %s has %d connections across the cluster (limits.max_connections_per_user)",
                        device.client_id, device.user_id, self._limits.max_connections_per_user)  # fmt: skip
            return mqtt.NOT_AUTHORIZED
        if connection.closed:  # it went away while it was being registered: undo that
            self.spawn(self._chat.device_disconnected(device, connection.epoch))
            return mqtt.NOT_AUTHORIZED
        return mqtt.ACCEPTED

    async def _authenticate(self, packet: Connect) -> tuple[DeviceAddress | None, int]:
        """The device of a CONNECT: client id ``{user}:{device}``, user name = user, password = token."""
        try:
            device = DeviceAddress.from_client_id(packet.client_id)
        except ChatError:
            return None, mqtt.IDENTIFIER_REJECTED
        if packet.username != device.user_id or not packet.password:
            return None, mqtt.NOT_AUTHORIZED
        try:
            token = packet.password.decode()
            # Checks the token's device scope and the device's revocation too.
            claims = await self._services.accounts.authorize(token, device.device_id)
        except UnicodeDecodeError:
            return None, mqtt.NOT_AUTHORIZED
        except StorageUnavailable:
            return None, mqtt.SERVER_UNAVAILABLE
        except ChatError:
            return None, mqtt.NOT_AUTHORIZED
        if claims.user_id != device.user_id:
            return None, mqtt.NOT_AUTHORIZED
        return device, mqtt.ACCEPTED

    def _check_limits(self, connection: MqttConnection, device: DeviceAddress, packet: Connect) -> int:
        """What an authenticated client may still be refused for (logged here, once)."""
        will = packet.will
        if will is not None and (will.retain or not may_publish(device, will.topic)):
            # A will is a PUBLISH made later: the same ACL applies now, and only the server retains.
            retained = " with retain" if will.retain else ""
            log.warning("refused %s from %s: a will on %r%s (only the own inbox, never retained)",
                        device.client_id, connection.peer, will.topic[:80], retained)  # fmt: skip
            return mqtt.NOT_AUTHORIZED
        live = self._live.get(device.user_id, {})
        others = sum(1 for client_id in live if client_id != device.client_id)
        if others >= self._limits.max_connections_per_user:
            log.warning("refused %s: %s already has %d connections (limits.max_connections_per_user)",
                        device.client_id, device.user_id, others)  # fmt: skip
            return mqtt.NOT_AUTHORIZED
        if self._cluster is None and not self._new_devices.admit(device.user_id, device.device_id):
            log.warning("refused %s: %s connected %d new device ids this hour (limits.max_new_devices_per_hour)",
                        device.client_id, device.user_id, self._limits.max_new_devices_per_hour)  # fmt: skip
            return mqtt.NOT_AUTHORIZED
        return mqtt.ACCEPTED

    def _open_session(self, connection: MqttConnection, device: DeviceAddress, packet: Connect) -> tuple[Session, bool]:
        """Take over the client id's live connection (MQTT 3.1.1, 3.1.4) and open or resume its
        session; no ``await`` from the checks to here, so two CONNECTs cannot interleave."""
        previous = self._live.get(device.user_id, {}).get(device.client_id)
        if previous is not None:
            log.info("%s reconnected: closing its previous connection", device.client_id)
            previous.replaced = True  # its disconnect must not take the device offline
            self._detach(previous)
            previous.close(abort=True)
        session, resumed = self._sessions.open(device, packet.clean_session)
        session.connection = connection
        connection.session = session
        connection.device = device
        connection.inbox = inbox_topic(device)
        connection.will = packet.will
        self._live.setdefault(device.user_id, {})[device.client_id] = connection
        return session, resumed

    async def _resume(self, connection: MqttConnection, session: Session) -> None:
        """A resumed session sends no SUBSCRIBE: its retained presence, and a catch-up, now."""
        for topic, qos in list(session.subscriptions.items()):
            await self._send_retained(connection, topic, qos)
        if device_topic(session.device) in session.subscriptions:
            self._schedule_catch_up(session)

    async def _send_retained(self, connection: MqttConnection, topic: str, qos: int) -> None:
        """Presence is the one retained topic: its current state, flagged retained."""
        user_id = id_after(PRESENCE_PREFIX, topic)
        if user_id is not None and not connection.closed:
            payload = await self._chat.presence_payload(user_id)
            connection.deliver(topic.encode(), payload, qos, retain=True)

    # ----------------------------------------------------- what a device sends

    def publish_received(
        self, connection: MqttConnection, packet: Publish, answered: Callable[[], None] | None = None
    ) -> bool:
        """The one intake: a command on the device's own inbox goes to the chat service, in the
        order the device sent it; a PUBLISH anywhere else reaches nobody and gets ``not_allowed``.
        True when ``answered`` will be called (a send, once stored or refused)."""
        device = connection.device
        if device is None:
            return False
        if packet.topic == connection.inbox:
            # The retain flag is ignored: the inbox is a command topic and only the server retains.
            return self._chat.accept(device, packet.payload, answered)
        self._chat.refuse_publish(device, packet.topic)
        return False

    async def subscribe(self, connection: MqttConnection, packet: Subscribe) -> None:
        session, device = connection.session, connection.device
        if session is None or device is None:
            return
        codes = []
        for topic, qos in packet.topics:
            codes.append(await self._grant(session, device, topic, qos))
            if connection.closed:
                return
        connection.send(Suback(packet.packet_id, tuple(codes)).encode())
        for (topic, _), granted in zip(packet.topics, codes, strict=True):
            if granted != mqtt.SUBACK_FAILURE:
                await self._send_retained(connection, topic, granted)
        granted_topics = {topic for (topic, _), code in zip(packet.topics, codes, strict=True) if code <= 1}
        if device_topic(device) in granted_topics:
            self._schedule_catch_up(session)

    async def _grant(self, session: Session, device: DeviceAddress, topic: str, qos: int) -> int:
        held = session.subscriptions
        if topic not in held and len(held) >= self._limits.max_subscriptions_per_connection:
            log.warning("%s: SUBSCRIBE refused, it holds %d filters already", device.client_id, len(held))
            return mqtt.SUBACK_FAILURE
        if not await self._acl.may_subscribe(device, topic):
            return mqtt.SUBACK_FAILURE
        granted = min(qos, 1)  # nothing goes out at QoS 2: the cursor, not MQTT, makes delivery reliable
        first = self._subscriptions.count(topic) == 0
        self._subscriptions.add(session, topic, granted)
        channel = _channel_of(topic)
        if first and channel is not None and self._cluster is not None:
            # Before the SUBACK, so before the catch-up reads: what other nodes store from now on
            # reaches this node (watch before read).
            await self._cluster.watch(channel)
        return granted

    def _topic_empty(self, topic: str) -> None:
        channel = _channel_of(topic)
        if channel is not None and self._cluster is not None:
            self._cluster.unwatch(channel)

    def unsubscribe(self, connection: MqttConnection, packet: Unsubscribe) -> None:
        if connection.session is not None:
            for topic in packet.topics:
                self._subscriptions.remove(connection.session, topic)
        connection.send(Unsuback(packet.packet_id).encode())

    def connection_lost(self, connection: MqttConnection) -> None:
        listener = self._listeners.get(connection.listener)
        if listener is not None:
            listener.open -= 1
        device = connection.device
        if device is None:
            return
        self._detach(connection)
        if connection.will is not None and not connection.clean_exit:
            # Ended without DISCONNECT: its will is a command on its own inbox (checked at CONNECT).
            self._chat.accept(device, connection.will.payload)
        self.spawn(self._chat.device_disconnected(device, connection.epoch, replaced=connection.replaced))

    def _detach(self, connection: MqttConnection) -> None:
        device, session = connection.device, connection.session
        if device is None or session is None:
            return
        live = self._live.get(device.user_id)
        if live is not None and live.get(device.client_id) is connection:
            del live[device.client_id]
            if not live:
                del self._live[device.user_id]
        if session.connection is connection:
            session.connection = None
            self._stop_catch_up(session)
            self._sessions.closed(session)

    # ------------------------------------------------------------- catch-up

    def _schedule_catch_up(self, session: Session) -> None:
        state = self._catch_ups.setdefault(session, _CatchUp())
        if state.task is not None and not state.task.done():
            state.again = True
            return
        state.task = asyncio.create_task(self._catch_up(session, state))

    async def _catch_up(self, session: Session, state: _CatchUp) -> None:
        try:
            while session.connection is not None:
                state.again = False
                try:
                    await self._chat.catch_up(session.device)
                except ChatError as exc:
                    await self._chat.reply(session.device, error_event(exc))
                if not state.again:
                    return
        finally:
            if self._catch_ups.get(session) is state and not state.again:
                del self._catch_ups[session]

    def _stop_catch_up(self, session: Session) -> None:
        state = self._catch_ups.pop(session, None)
        if state is not None and state.task is not None:
            state.task.cancel()

    # ----------------------------------------------------------- delivering

    async def publish(self, topic: str, payload: bytes) -> None:
        """The chat service's publisher. A group topic reaches only the group's current members."""
        group_id = group_of(topic)
        members = None if group_id is None else await self._acl.group_members(group_id)
        self.deliver(topic, payload, members)

    def deliver(self, topic: str, payload: bytes, users: frozenset[str] | None = None) -> int:
        """Every live subscriber of ``topic`` (of ``users`` only, when given) gets it now, at the
        QoS it was granted; how many did."""
        subscribers = self._subscriptions.of(topic)
        if not subscribers:
            return 0
        encoded = topic.encode()
        delivered = 0
        for session, qos in subscribers:
            connection = session.connection
            if connection is None or (users is not None and session.device.user_id not in users):
                continue
            connection.deliver(encoded, payload, qos)
            delivered += 1
        return delivered

    # ------------------------------------------------------ session control

    async def close_device(self, device: DeviceAddress) -> bool:
        """End the device's live connection now (its device was revoked)."""
        connection = self._live.get(device.user_id, {}).get(device.client_id)
        if connection is None:
            return False
        log.info("%s was revoked: closing its connection", device.client_id)
        connection.close(abort=True)
        return True

    def take_over(self, client_id: str, epoch: int) -> None:
        """Another node accepted ``client_id`` with ``epoch``: an older connection here goes
        (MQTT 3.1.1, 3.1.4, across the cluster)."""
        user_id, _, _ = client_id.partition(":")
        connection = self._live.get(user_id, {}).get(client_id)
        if connection is not None and connection.epoch < epoch:
            log.info("%s reconnected on another node: closing it here", client_id)
            connection.replaced = True
            self._detach(connection)
            connection.close(abort=True)

    def resync(self, users: set[str] | None) -> None:
        """Events may have been lost between nodes: every local device (of ``users``) catches up."""
        for user_id, live in list(self._live.items()):
            if users is not None and user_id not in users:
                continue
            for connection in live.values():
                session = connection.session
                if session is not None and device_topic(session.device) in session.subscriptions:
                    self._schedule_catch_up(session)

    async def close_user(self, user_id: str) -> int:
        """End every live connection of the user (logged out everywhere, disabled)."""
        connections = list(self._live.get(user_id, {}).values())
        for connection in connections:
            connection.close(abort=True)
        if connections:
            log.info("closed the %d connections of %s", len(connections), user_id)
        return len(connections)

    # ------------------------------------------------------------- upkeep

    async def _sweep_sessions(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            expired = self._sessions.expire()
            if expired:
                log.info("forgot %d persistent sessions offline for over %g s", expired,
                         self._limits.session_expiry_seconds)  # fmt: skip

    @property
    def stats(self) -> dict[str, int]:
        """Counts for health and metrics."""
        return {
            "connections": sum(listener.open for listener in self._listeners.values()),
            "devices": sum(len(live) for live in self._live.values()),
            "sessions": len(self._sessions),
            "offline_sessions": self._sessions.offline,
            "subscribed_topics": self._subscriptions.topics,
        }


def _channel_of(topic: str) -> str | None:
    """The cluster channel carrying a topic's events from other nodes (presence comes by control)."""
    user_id = id_after(STREAM_PREFIX, topic)
    if user_id is not None:
        return user_channel(user_id)
    group_id = id_after(GROUP_PREFIX, topic)
    return None if group_id is None else group_channel(group_id)


class _Refused(asyncio.Protocol):
    """Past the listener's connection cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
