"""Building and running the embedded amqtt broker."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from mqchat.bridge.services import Services
from mqchat.broker.plugins import DEVICE_ATTR, NOT_AUTHORIZED, REFUSAL_ATTR

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


class ChatBroker(Broker):
    """amqtt's broker, authenticating before it touches sessions, with precise CONNACK codes."""

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
        # amqtt answers every failed authentication with "not authorized"; a malformed
        # client id must get "identifier rejected" instead.
        handler.mqtt_connack_authorize = functools.partial(_connack, handler)
        await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # On every CONNECT amqtt 0.12 calls this for *every* client's filters, not only
        # the connecting session's, and checks no ACL: any user would get everyone's
        # retained presence. Only a session that holds the filter gets its retained messages.
        topic_filter, _ = subscription
        holders = self._subscriptions.get(topic_filter, ())
        if any(held.client_id == session.client_id for held, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

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
