"""Building and running the embedded amqtt broker.

``ChatBroker`` keeps amqtt's protocol handling and replaces its bookkeeping where
the cost grew with the number of connected devices: every message was matched
against every subscription filter, every CONNECT and disconnect walked all filters,
and every SUBSCRIBE formatted ``repr`` of the whole table. Subscriptions now live
in a ``TopicTree`` plus a per-client index; amqtt's ``_subscriptions`` dict is kept
in step, holding the very same lists, for the code that still reads it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import deque
from functools import partial
from typing import Any

import websockets
from amqtt.adapters import WebSocketsWriter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

from mqchat.bridge.service import ChatService
from mqchat.bridge.services import Services
from mqchat.broker.guard import PacketGuard, StreamChunks, StreamWriter, WebSocketReader
from mqchat.broker.handler import ChatProtocolHandler
from mqchat.broker.plugins import (
    DEVICE_ATTR,
    NOT_AUTHORIZED,
    REFUSAL_ATTR,
    REPLACED_ATTR,
    acl_decision,
    session_device,
)
from mqchat.broker.session import use_chat_sessions
from mqchat.broker.topic_tree import TopicTree, has_wildcard, matches
from mqchat.config import LimitsSettings, Settings
from mqchat.core.ids import DeviceAddress
from mqchat.core.topics import inbox_topic

log = logging.getLogger(__name__)

_PLUGINS = (
    "mqchat.broker.plugins.TokenAuthPlugin",
    "mqchat.broker.plugins.ChatAclPlugin",
    "mqchat.broker.plugins.ChatBridgePlugin",
)


SUBACK_FAILURE = 0x80
LISTENERS = ("mqtt", "ws", "mqtts", "wss")
"""Our names for the listeners; ``ChatBroker.bound_port`` takes them."""


def listener_configs(settings: Settings) -> dict[str, dict[str, Any]]:
    """Our listener name -> amqtt listener config, for the listeners the settings turn on."""
    host, tls = settings.mqtt.host, settings.tls
    listeners: dict[str, dict[str, Any]] = {}
    if tls.plain_listeners:
        listeners["mqtt"] = {"type": "tcp", "bind": f"{host}:{settings.mqtt.port}"}
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{settings.mqtt.ws_port}"}
    if tls.enabled:
        secured = {"ssl": True, "certfile": str(tls.certfile), "keyfile": str(tls.keyfile)}
        listeners["mqtts"] = {"type": "tcp", "bind": f"{host}:{tls.mqtts_port}", **secured}
        listeners["wss"] = {"type": "ws", "bind": f"{host}:{tls.wss_port}", **secured}
    return listeners


def listener_names(settings: Settings) -> dict[str, str]:
    """Our listener name -> amqtt's. amqtt requires one called "default" (the others
    inherit its unset fields): it is the first one we run."""
    ours = list(listener_configs(settings))
    return {name: "default" if name == ours[0] else name for name in ours}


def broker_config(services: Services, settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or services.settings
    listeners = listener_configs(settings)
    names = listener_names(settings)
    return {
        "listeners": {names[name]: config for name, config in listeners.items()},
        # Durability comes from the store and each device's cursor, not from amqtt's
        # in-memory queues for clean_session=false sessions (which a restart loses).
        "plugins": {name: {"services": services} for name in _PLUGINS},
    }


Subscribers = list[tuple[Session, int]]

# Broadcasts fanned out per turn of amqtt's broadcast loop: amqtt pays a task and an
# ``asyncio.wait`` per broadcast; taking what is queued amortises that, and the cap
# keeps one turn from holding the event loop for long.
_BROADCAST_BURST = 256
_LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


class _SubscriptionTable(dict[str, Subscribers]):
    """amqtt's filter -> subscribers dict, with a ``repr`` that costs nothing.

    amqtt logs ``repr(self._subscriptions)`` at debug level after every SUBSCRIBE,
    formatting the whole table even when debug logging is off.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} subscribed topic filters>"


class ChatBroker(Broker):
    """amqtt's broker, authenticating before it touches sessions, with precise CONNACK codes,
    whole-packet framing and limits (guard.py), and per-user connection and per-connection
    subscription limits."""

    def __init__(
        self,
        config: dict[str, Any],
        limits: LimitsSettings | None = None,
        names: dict[str, str] | None = None,
        chat: ChatService | None = None,
    ) -> None:
        super().__init__(config)
        use_chat_sessions()
        # Commands go to the chat service and its events come back without amqtt's
        # broadcast queue and plugin tasks (handler.py); None: amqtt's path only.
        self._chat = chat
        self._subscriptions: dict[str, Subscribers] = _SubscriptionTable()
        self._tree: TopicTree[Subscribers] = TopicTree()
        # client id -> the filters it holds, so a disconnect touches only its own.
        self._by_client: dict[str, set[str]] = {}
        self._limits = limits or LimitsSettings()
        self._names = names or {"mqtt": "default", "ws": "ws"}
        # user id -> {connection handler: client id}, for max_connections_per_user.
        self._live: dict[str, dict[BrokerProtocolHandler, str]] = {}

    async def start(self) -> None:
        self._tree = TopicTree()
        self._by_client.clear()
        await super().start()
        if self._chat is not None:
            self._chat.attach_publisher(self)

    async def shutdown(self) -> None:
        if self._chat is not None:
            self._chat.attach_publisher(None)
        await super().shutdown()

    # ------------------------------------------------------------ transport

    def _guard(self, reader: StreamChunks | WebSocketReader, writer: Any) -> PacketGuard:
        limits = self._limits
        return PacketGuard(
            reader, writer, max_packet=limits.max_packet_bytes, connect_timeout=limits.connect_timeout_seconds
        )

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        adapter = StreamWriter(writer)
        await self._client_connected(listener_name, self._guard(StreamChunks(reader), adapter), adapter)

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        adapter = WebSocketsWriter(websocket)
        await self._client_connected(listener_name, self._guard(WebSocketReader(websocket), adapter), adapter)

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> Any:
        # As amqtt does, with a listen backlog for connection storms (asyncio's default of
        # 100 refused connects when thousands of devices came back at once) and, for
        # WebSocket, a frame size bound: websockets would otherwise buffer messages of up
        # to 1 MiB before the guard sees the MQTT length.
        if listener_type != ListenerType.WS:
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=listener_name),
                address,
                port,
                reuse_address=True,
                ssl=ssl_context,
                backlog=_LISTEN_BACKLOG,
            )
        return await websockets.serve(
            partial(self.ws_connected, listener_name=listener_name),
            address,
            port,
            ssl=ssl_context,
            subprotocols=[websockets.Subprotocol("mqtt")],
            max_size=self._limits.max_packet_bytes + 16,
            backlog=_LISTEN_BACKLOG,
        )

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        # Clients authenticate with tokens, not certificates: no client-certificate
        # request (amqtt asks for one optionally), and nothing older than TLS 1.2.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(listener["certfile"], listener["keyfile"])
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot load the TLS certificate or key: {exc}") from exc
        return context

    # ------------------------------------------------------------- sessions

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt 0.12 deletes (clean session) or takes over the existing session of the
        # same client id *before* it authenticates the newcomer, and then stores the
        # refused session in its place: one CONNECT with a wrong token could silently cut
        # a device off its subscriptions. We read CONNECT and authenticate first; a
        # refused client is answered and closed without touching the session table.
        handler, session = await self._read_connect(reader, writer)
        if not await self._authenticate(session, None):
            code = getattr(session, REFUSAL_ATTR, None) or NOT_AUTHORIZED
            log.info("refused connection from %s:%s (CONNACK %d)", remote_address, remote_port, code)
            await self._refuse(writer, code)
        device = session_device(session)
        assert device is not None  # authenticated
        if self._connections_of(device) >= self._limits.max_connections_per_user:
            log.warning(
                "refused %s: %s already has %d connections (limits.max_connections_per_user)",
                device.client_id,
                device.user_id,
                self._limits.max_connections_per_user,
            )
            await self._refuse(writer, NOT_AUTHORIZED)
        # Counted from here, before any await, so that simultaneous CONNECTs cannot all pass.
        self._live.setdefault(device.user_id, {})[handler] = device.client_id
        try:
            _enforce_keepalive(handler, session)
            return await self._adopt_session(handler, session)
        except BaseException:
            self._forget(device, handler)
            raise

    async def _read_connect(self, reader: Any, writer: Any) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await ChatProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as exc:
            # The client went away (or the guard refused it) before a whole CONNECT: amqtt
            # would return without closing, and leak the socket until garbage collection.
            await writer.close()
            raise AMQTTError(exc) from exc
        except Exception as exc:
            # A CONNECT that passed the guard's framing but that amqtt's parser chokes on
            # (hostile field contents): close it here, or asyncio would log the traceback
            # and leave the socket open.
            log.warning("closing a connection with an unreadable CONNECT: %s", exc.__class__.__name__)
            await writer.close()
            raise AMQTTError(exc) from exc
        return handler, session

    async def _refuse(self, writer: Any, code: int) -> None:
        await ConnackPacket.build(0, code).to_stream(writer)
        await writer.close()
        raise MQTTError(f"connection refused with CONNACK {code}")

    def _connections_of(self, device: DeviceAddress) -> int:
        """Live connections of the device's user, not counting the one it takes over."""
        live = self._live.get(device.user_id, {})
        return sum(1 for client_id in live.values() if client_id != device.client_id)

    def _forget(self, device: DeviceAddress, handler: BrokerProtocolHandler) -> None:
        live = self._live.get(device.user_id)
        if live is not None:
            live.pop(handler, None)
            if not live:
                del self._live[device.user_id]

    async def _adopt_session(
        self, handler: BrokerProtocolHandler, session: Session
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's own session bookkeeping, now reached only by authenticated clients."""
        await self._take_over(session.client_id)
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, attr, getattr(session, attr))
            for attr in (DEVICE_ATTR, REFUSAL_ATTR, REPLACED_ATTR):
                setattr(existing, attr, getattr(session, attr, None))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        return handler, session

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        # amqtt answers every failed authentication with "not authorized"; a malformed
        # client id must get "identifier rejected" instead.
        handler.mqtt_connack_authorize = functools.partial(_connack, handler)
        if isinstance(reader, PacketGuard):
            reader.client_id = client_session.client_id or ""
        if isinstance(handler, ChatProtocolHandler):
            handler.inbox = self._accept_inbox if self._chat is not None else None
            handler.max_buffered_bytes = self._limits.max_outgoing_buffer_bytes
            handler.max_unacked = self._limits.max_unacked_deliveries
        try:
            await self._run_session(reader, writer, client_session, handler)
        finally:
            device = session_device(client_session)
            if device is not None:
                self._forget(device, handler)

    async def _run_session(
        self, reader: Any, writer: Any, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        """amqtt's session lifecycle, less what cost time per connected device.

        ``_initialize_client_session`` has authenticated the client already (amqtt
        would verify the token a second time), and a resumed session gets the retained
        messages of its own filters: amqtt walked every client's filters here.
        """
        await self._mark_connected(client_session)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await _connack(handler, True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        for topic_filter in sorted(self._by_client.get(client_session.client_id, ())):
            await self._publish_retained_messages_for_subscription((topic_filter, QOS_0), client_session)
        await self._client_message_loop(client_session, handler)

    async def _mark_connected(self, session: Session) -> None:
        """amqtt's transition to "connected", taking over a connection still marked live."""
        while True:
            try:
                session.transitions.connect()
                return
            except (MachineError, ValueError):
                if session.transitions.is_connected():
                    _, old_handler = self._sessions[session.client_id]
                    await old_handler.handle_connection_closed()
                    await old_handler.stop()
                    return
                log.warning("%s is reconnecting too quickly: waiting 1 s", session.client_id)
                await asyncio.sleep(1)

    # -------------------------------------------------------- subscriptions

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's, refusing (0x80) a new filter beyond ``max_subscriptions_per_connection``."""
        topic_filter, _ = subscription
        held = _filters_of(session)
        limit = self._limits.max_subscriptions_per_connection
        if topic_filter not in held and len(held) >= limit:
            log.warning("%s: SUBSCRIBE refused, it holds %d filters already", session.client_id, len(held))
            return SUBACK_FAILURE
        code = int(await super().add_subscription(subscription, session))
        subscribers = self._subscriptions.get(topic_filter)
        if code != SUBACK_FAILURE and subscribers is not None:
            held.add(topic_filter)
            self._tree[topic_filter] = subscribers
            self._by_client.setdefault(session.client_id, set()).add(topic_filter)
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        subscribers = self._subscriptions.get(a_filter)
        if subscribers is None:
            return 0
        for index, (held, _) in enumerate(subscribers):
            if held.client_id == session.client_id:
                del subscribers[index]
                break
        else:
            return 0
        if not subscribers:
            del self._subscriptions[a_filter]
            del self._tree[a_filter]
        _filters_of(session).discard(a_filter)
        filters = self._by_client.get(session.client_id)
        if filters is not None:
            filters.discard(a_filter)
            if not filters:
                del self._by_client[session.client_id]
        return 1

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walked every filter of every client for each disconnect: 5,000 devices
        # dropping at once stalled the broker for seconds.
        for topic_filter in self._by_client.pop(session.client_id, set()):
            self._del_subscription(topic_filter, session)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Only a session that holds the filter gets its retained messages: amqtt 0.12
        # checked no ACL here, so any user would have got everyone's retained presence.
        topic_filter, qos = subscription
        if topic_filter not in self._by_client.get(session.client_id, ()):
            return
        handler = self._get_handler(session)
        retained = self._retained_for(topic_filter)
        if handler is not None and retained:
            await asyncio.gather(
                *(handler.mqtt_publish(r.topic, r.data, min(qos, r.qos or qos), retain=True) for r in retained),
                return_exceptions=True,
            )

    def _retained_for(self, topic_filter: str) -> list[Any]:
        # amqtt scanned every retained message (one presence per user) on every SUBSCRIBE.
        if not has_wildcard(topic_filter):
            found = self._retained_messages.get(topic_filter)
            return [] if found is None else [found]
        return [r for topic, r in self._retained_messages.items() if matches(topic, topic_filter)]

    # ----------------------------------------------------------- delivery

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        broadcast = await self._broadcast_queue.get()
        for _ in range(_BROADCAST_BURST):
            await self._fan_out(broadcast, running_tasks)
            if self._broadcast_queue.empty():
                return
            broadcast = self._broadcast_queue.get_nowait()
        await self._fan_out(broadcast, running_tasks)

    async def _fan_out(self, broadcast: dict[str, Any], running_tasks: deque[asyncio.Task[Any]]) -> None:
        """amqtt's per-subscriber delivery rules, for the filters the tree says match."""
        topic = broadcast["topic"]
        for subscribers in self._tree.match(topic):
            # A copy: an ACL check may await, and a disconnect may edit the list meanwhile.
            for session, sub_qos in tuple(subscribers):
                qos = broadcast.get("qos", sub_qos)
                if not await self._may_receive(session, topic):
                    continue
                if session.transitions.state != "connected":
                    # MQTT 3.1.2.4: a persistent session keeps QoS 1/2 messages while offline.
                    if not session.clean_session and qos in (QOS_1, QOS_2) and not session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, session)
                    continue
                handler = self._get_handler(session)
                if isinstance(handler, ChatProtocolHandler):
                    handler.deliver(topic, broadcast["data"], qos)
                elif handler is not None:
                    running_tasks.append(
                        asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False))
                    )

    async def _may_receive(self, session: Session, topic: str) -> bool:
        device = session_device(session)
        decided = None if device is None else acl_decision(device, topic, Action.RECEIVE)
        if decided is not None:
            return decided
        return bool(await self._topic_filtering(session, topic=topic, action=Action.RECEIVE))

    # ------------------------------------------------- the chat fast path

    def _accept_inbox(self, session: Session, topic: str, data: bytes) -> bool:
        """A device's command on its own inbox goes to the chat service in place (in the
        order the device sent it); anything else takes amqtt's path."""
        device = session_device(session)
        if device is None or self._chat is None or topic != inbox_topic(device):
            return False
        self._chat.accept(device, data)
        return True

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """The chat service's publisher: deliver now where the ACL needs no lookup."""
        if retain:
            await self.retain_message(None, topic, payload, QOS_1)
        if not self._deliver_now(topic, payload):
            await self.internal_message_broadcast(topic, payload, None)

    def _deliver_now(self, topic: str, payload: bytes) -> bool:
        """Each subscriber gets the PUBLISH at once, at the QoS it subscribed with; False
        (nothing sent) when a subscriber needs an ACL lookup or holds an offline
        persistent session: amqtt's broadcast path handles those."""
        if not self._broadcast_queue.empty():
            return False  # behind what is queued: keep the order
        targets: list[tuple[ChatProtocolHandler, int]] = []
        for subscribers in self._tree.match(topic):
            for session, qos in subscribers:
                device = session_device(session)
                allowed = None if device is None else acl_decision(device, topic, Action.RECEIVE)
                if allowed is None:
                    return False
                if not allowed:
                    continue
                handler = self._get_handler(session)
                if session.transitions.state != "connected":
                    if not session.clean_session and qos in (QOS_1, QOS_2):
                        return False
                    continue
                if not isinstance(handler, ChatProtocolHandler):
                    return False
                targets.append((handler, qos))
        for handler, qos in targets:
            handler.deliver(topic, payload, qos)
        return True

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # amqtt answers a PUBLISH to an empty, wildcard or "$" topic (protocol violations)
        # by leaving its command loop without closing anything: the reader kept PUBACKing
        # commands that nobody processed. Close the connection properly instead, and let
        # the loop run on to see the disconnect and clean up the session.
        if not await super()._handle_message_delivery(client_session, handler, wait_deliver):
            await handler.handle_connection_closed()
        return True

    async def _take_over(self, client_id: str) -> None:
        """Close the live connection that uses this client id (MQTT 3.1.1, 3.1.4).

        amqtt only does so when the session object is reused; with a clean session it
        dropped the old session's subscriptions and left its socket open, a zombie that
        received nothing, not even its own acks.
        """
        existing = self._sessions.get(client_id)
        if existing is None or existing[0].transitions.state != "connected":
            return
        log.info("%s reconnected: closing its previous connection", client_id)
        # Its disconnect must not take the device offline: it is reconnecting right now.
        setattr(existing[0], REPLACED_ATTR, True)
        _, old_handler = existing
        await old_handler.handle_connection_closed()
        await old_handler.stop()

    async def close_device(self, device: DeviceAddress) -> bool:
        """End the device's live connection now (its device was revoked)."""
        existing = self._sessions.get(device.client_id)
        if existing is None or existing[0].transitions.state != "connected":
            return False
        log.info("%s was revoked: closing its connection", device.client_id)
        _, handler = existing
        await handler.handle_connection_closed()
        await handler.stop()
        return True

    def bound_port(self, listener: str) -> int | None:
        """The port one of our listeners (``LISTENERS``) actually bound; None if it is off."""
        amqtt_name = self._names.get(listener)
        if amqtt_name is None or amqtt_name not in self._servers:
            return None
        sockets = list(self._servers[amqtt_name].instance.sockets)
        return int(sockets[0].getsockname()[1])


def _enforce_keepalive(handler: BrokerProtocolHandler, session: Session) -> None:
    """Close a connection that stays silent for 1.5 x its keep-alive (MQTT 3.1.1, 3.1.2.10).

    amqtt times the read out after the keep-alive but then does nothing, so a dead
    device would never go offline. The reader waits for the next packet with
    ``session.keep_alive`` as its timeout, reset by every packet.
    """
    if not session.keep_alive or session.keep_alive <= 0:
        return
    session.keep_alive = session.keep_alive * 1.5
    closing: list[asyncio.Task[None]] = []

    def expired() -> None:
        if not closing:
            log.info("%s silent for 1.5 x keep-alive: closing", session.client_id)
            closing.append(asyncio.ensure_future(handler.handle_connection_closed()))

    handler.handle_read_timeout = expired


async def _connack(handler: BrokerProtocolHandler, authorize: bool) -> None:
    session = handler.session
    assert session is not None
    code = 0 if authorize else (getattr(session, REFUSAL_ATTR, None) or NOT_AUTHORIZED)
    await handler._send_packet(ConnackPacket.build(session.parent, code))


def _filters_of(session: Session) -> set[str]:
    """The topic filters a session holds, kept on the session (a resumed session keeps them)."""
    held: set[str] | None = getattr(session, _FILTERS_ATTR, None)
    if held is None:
        held = set()
        setattr(session, _FILTERS_ATTR, held)
    return held


_FILTERS_ATTR = "mqchat_filters"
