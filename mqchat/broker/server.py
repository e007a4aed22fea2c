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
import logging
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import websockets
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection

from mqchat.bridge.composition import Services
from mqchat.bridge.ratelimit import NewKeyBudget
from mqchat.broker.acl import TopicAcl, group_of
from mqchat.broker.connection import MqttConnection, serve_websocket
from mqchat.broker.sessions import Session, SessionTable, Subscriptions
from mqchat.config import Settings
from mqchat.core import mqtt
from mqchat.core.errors import ChatError, StorageUnavailable
from mqchat.core.ids import DeviceAddress
from mqchat.core.mqtt import Connack, Connect, Publish, Suback, Subscribe, Unsuback, Unsubscribe
from mqchat.core.protocol import error_event
from mqchat.core.topics import device_topic, inbox_topic, may_publish

log = logging.getLogger(__name__)

ListenerKind = Literal["tcp", "ws"]
LISTEN_BACKLOG = 4096  # a connect storm overflowed asyncio's default of 100; the kernel caps it at somaxconn
_SWEEP_SECONDS = 30


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
        self._settings = settings or services.settings
        self._limits = self._settings.limits
        self._acl = TopicAcl(services.chat)
        self._subscriptions = Subscriptions()
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
        if connection.closed:
            return
        self.metrics.connect_answered(code)
        if device is None or code != mqtt.ACCEPTED:
            if device is None:  # a refusal by _check_limits has been logged there, with its reason
                log.info(
                    "refused MQTT connection from %s (%s): CONNACK %d", connection.peer, packet.client_id[:80], code
                )
            connection.send(Connack(False, code).encode())
            connection.close()
            return
        session, resumed = self._open_session(connection, device, packet)
        connection.send(Connack(resumed, mqtt.ACCEPTED).encode())
        connection.accepted(packet.keepalive)
        await self._chat.device_connected(device)
        if resumed and not connection.closed:
            self._resume(connection, session)

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
        if not self._new_devices.admit(device.user_id, device.device_id):
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

    def _resume(self, connection: MqttConnection, session: Session) -> None:
        """A resumed session sends no SUBSCRIBE: its retained presence, and a catch-up, now."""
        for topic, qos in session.subscriptions.items():
            retained = self._subscriptions.retained(topic)
            if retained is not None:
                connection.deliver(topic.encode(), retained, qos, retain=True)
        if device_topic(session.device) in session.subscriptions:
            self._schedule_catch_up(session)

    # ----------------------------------------------------- what a device sends

    def publish_received(self, connection: MqttConnection, packet: Publish) -> None:
        """The one intake: a command on the device's own inbox goes to the chat service, in the
        order the device sent it; a PUBLISH anywhere else reaches nobody and gets ``not_allowed``."""
        device = connection.device
        if device is None:
            return
        if packet.topic == connection.inbox:
            # The retain flag is ignored: the inbox is a command topic and only the server retains.
            self._chat.accept(device, packet.payload)
        else:
            self._chat.refuse_publish(device, packet.topic)

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
            retained = self._subscriptions.retained(topic) if granted != mqtt.SUBACK_FAILURE else None
            if retained is not None:
                connection.deliver(topic.encode(), retained, granted, retain=True)
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
        self._subscriptions.add(session, topic, granted)
        return granted

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
        if not connection.replaced:
            self.spawn(self._chat.device_disconnected(device))

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

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """The chat service's publisher. A group topic reaches only the group's current members."""
        if retain:
            self._subscriptions.retain(topic, payload)
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


class _Refused(asyncio.Protocol):
    """Past the listener's connection cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
