"""The one module that touches amqtt: it hosts the broker, mqchat runs every connection.

amqtt's ``Broker`` still does what it does well enough: it reads the listener
configuration (its format, "default" first), runs its start and shutdown state machine
with its plugin events, and creates each listener through
``Broker._create_server_instance`` and each TLS context through
``Broker._create_ssl_context``. Those two are overridden here and hand the listeners to
``MqttServer``, which owns everything per connection: the codec (core/mqtt.py), sessions,
the ACL, takeover, keep-alive, wills and delivery. Each of those replaced a part of amqtt
that had a measured cost or a hole (docs/architecture.md, "amqtt: what we use and what
we replaced"); amqtt's connection handler, sessions, broadcast loop, retained store and
plugins are not on any path of a client any more.

amqtt ships no types, so mypy cannot see a rename: ``RELIED_ON`` lists every amqtt name
this module uses, with the parameters it relies on, and tests/broker/test_amqtt_seam.py
fails naming the symbol when an upgrade changes one of them.
"""

from __future__ import annotations

import ssl
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.errors import BrokerError

from mqchat.broker.server import ListenerKind, ListenerPortTaken, MqttServer
from mqchat.config import Settings

RELIED_ON: dict[str, tuple[str, ...]] = {
    # name -> the parameters (after self) it must still take
    "amqtt.broker.Broker.__init__": ("config", "loop", "plugin_namespace"),
    "amqtt.broker.Broker.start": (),
    "amqtt.broker.Broker.shutdown": (),
    "amqtt.broker.Broker._create_server_instance": ("listener_name", "listener_type", "address", "port", "ssl_context"),
    "amqtt.broker.Broker._create_ssl_context": ("listener",),
    "amqtt.contexts.ListenerType.TCP": (),
    "amqtt.contexts.ListenerType.WS": (),
    "amqtt.errors.BrokerError": (),
}

LISTENERS = ("mqtt", "ws", "mqtts", "wss")
"""Our names for the listeners; ``MqttServer.bound_port`` takes them."""


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


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """Clients authenticate with tokens, not certificates: no client-certificate request
    (amqtt asks for one optionally), and nothing older than TLS 1.2."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot load the TLS certificate or key: {exc}") from exc
    return context


class AmqttHost(Broker):
    """amqtt's broker with its listeners handed to ``MqttServer``."""

    def __init__(self, server: MqttServer, settings: Settings) -> None:
        listeners = listener_configs(settings)
        # amqtt requires a listener called "default" (the others inherit its unset fields).
        self._ours = {("default" if index == 0 else name): name for index, name in enumerate(listeners)}
        amqtt_names = {ours: theirs for theirs, ours in self._ours.items()}
        super().__init__(
            {
                "listeners": {amqtt_names[name]: config for name, config in listeners.items()},
                "plugins": {},  # none: authentication, the ACL and the chat are MqttServer's
            }
        )
        self._server = server

    async def start(self) -> None:
        """amqtt's start, except that a port taken since ``check_ports`` comes out as our
        ``ListenerPortTaken``, not inside amqtt's ``BrokerError`` (a traceback for the user)."""
        try:
            await super().start()
        except BrokerError as exc:
            if isinstance(exc.__cause__, ListenerPortTaken):
                raise exc.__cause__ from None
            raise

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> Any:
        kind: ListenerKind = "ws" if listener_type == ListenerType.WS else "tcp"
        return await self._server.listen(self._ours[listener_name], kind, address, port, ssl_context)

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        return tls_context(str(listener["certfile"]), str(listener["keyfile"]))
