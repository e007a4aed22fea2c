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
import logging
from collections import deque
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

from mqchat.bridge.services import Services
from mqchat.broker.plugins import DEVICE_ATTR, NOT_AUTHORIZED, REFUSAL_ATTR
from mqchat.broker.topic_tree import TopicTree, has_wildcard, matches

log = logging.getLogger(__name__)

_PLUGINS = (
    "mqchat.broker.plugins.TokenAuthPlugin",
    "mqchat.broker.plugins.ChatAclPlugin",
    "mqchat.broker.plugins.ChatBridgePlugin",
)


def broker_config(services: Services, *, host: str, port: int, ws_port: int | None) -> dict[str, Any]:
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if ws_port is not None:
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}"}
    return {
        "listeners": listeners,
        # Durability comes from the store and each device's cursor, not from amqtt's
        # in-memory queues for clean_session=false sessions (which a restart loses).
        "plugins": {name: {"services": services} for name in _PLUGINS},
    }


Subscribers = list[tuple[Session, int]]

# amqtt's add_subscription returns this for a refused filter.
_REFUSED = 0x80
# Broadcasts fanned out per turn of amqtt's broadcast loop: amqtt pays a task and an
# ``asyncio.wait`` per broadcast; taking what is queued amortises that, and the cap
# keeps one turn from holding the event loop for long.
_BROADCAST_BURST = 256


class _SubscriptionTable(dict[str, Subscribers]):
    """amqtt's filter -> subscribers dict, with a ``repr`` that costs nothing.

    amqtt logs ``repr(self._subscriptions)`` at debug level after every SUBSCRIBE,
    formatting the whole table even when debug logging is off.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} subscribed topic filters>"


class ChatBroker(Broker):
    """amqtt's broker, authenticating before it touches sessions, with precise CONNACK codes
    and indexed subscriptions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions: dict[str, Subscribers] = _SubscriptionTable()
        self._tree: TopicTree[Subscribers] = TopicTree()
        self._filters_of: dict[str, set[str]] = {}

    async def start(self) -> None:
        self._tree = TopicTree()
        self._filters_of.clear()
        await super().start()

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt 0.12 deletes (clean session) or takes over the existing session of the
        # same client id *before* it authenticates the newcomer, and then stores the
        # refused session in its place: one CONNECT with a wrong token could silently cut
        # a device off its subscriptions. We read CONNECT and authenticate first; a
        # refused client is answered and closed without touching the session table.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        if not await self._authenticate(session, None):
            code = getattr(session, REFUSAL_ATTR, None) or NOT_AUTHORIZED
            log.info("refused connection from %s:%s (CONNACK %d)", remote_address, remote_port, code)
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"connection refused with CONNACK {code}")
        _enforce_keepalive(handler, session)
        return await self._adopt_session(handler, session)

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
            for attr in (DEVICE_ATTR, REFUSAL_ATTR):
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
        for topic_filter in sorted(self._filters_of.get(client_session.client_id, ())):
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

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Only a session that holds the filter gets its retained messages: amqtt 0.12
        # checked no ACL here, so any user would have got everyone's retained presence.
        topic_filter, qos = subscription
        if topic_filter not in self._filters_of.get(session.client_id, ()):
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

    # ------------------------------------------------------- subscriptions

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code = int(await super().add_subscription(subscription, session))
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter)
        if code != _REFUSED and subscribers is not None:
            self._tree[topic_filter] = subscribers
            self._filters_of.setdefault(session.client_id, set()).add(topic_filter)
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
        filters = self._filters_of.get(session.client_id)
        if filters is not None:
            filters.discard(a_filter)
            if not filters:
                del self._filters_of[session.client_id]
        return 1

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walked every filter of every client for each disconnect: 5,000 devices
        # dropping at once stalled the broker for seconds.
        for topic_filter in self._filters_of.pop(session.client_id, set()):
            self._del_subscription(topic_filter, session)

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
                if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                    continue
                if session.transitions.state != "connected":
                    # MQTT 3.1.2.4: a persistent session keeps QoS 1/2 messages while offline.
                    if not session.clean_session and qos in (QOS_1, QOS_2) and not session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, session)
                    continue
                handler = self._get_handler(session)
                if handler is not None:
                    running_tasks.append(
                        asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False))
                    )

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
        _, old_handler = existing
        await old_handler.handle_connection_closed()
        await old_handler.stop()

    def bound_port(self, listener: str) -> int:
        """The port a listener actually bound (useful with port 0)."""
        instance = self._servers[listener].instance
        sockets = list(instance.sockets)
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
