"""Building and running the embedded amqtt broker."""

from __future__ import annotations

import functools
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from mqchat.bridge.services import Services
from mqchat.broker.plugins import NOT_AUTHORIZED, REFUSAL_ATTR

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
        # Sessions are not kept across connections: durability comes from the store
        # and each device's cursor, not from amqtt's in-memory session queues.
        "plugins": {name: {"services": services} for name in _PLUGINS},
    }


class ChatBroker(Broker):
    """amqtt's broker with CONNACK codes that say why a connection was refused."""

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

    def bound_port(self, listener: str) -> int:
        """The port a listener actually bound (useful with port 0)."""
        instance = self._servers[listener].instance
        sockets = list(instance.sockets)
        return int(sockets[0].getsockname()[1])


async def _connack(handler: BrokerProtocolHandler, authorize: bool) -> None:
    session = handler.session
    assert session is not None
    code = 0 if authorize else (getattr(session, REFUSAL_ATTR, None) or NOT_AUTHORIZED)
    await handler._send_packet(ConnackPacket.build(session.parent, code))
