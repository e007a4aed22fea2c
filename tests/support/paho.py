"""A paho-mqtt client on its own network thread, with its callbacks bridged into asyncio.

paho reports CONNACK and SUBACK codes precisely: an MQTT 3.1.1 CONNACK code reaches
``on_connect`` as the equivalent MQTT 5 reason code, and ``CONNACK_V311`` maps it back,
one to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import convert_connack_rc_to_reason_code
from paho.mqtt.enums import CallbackAPIVersion, ConnackCode

CONNACK_V311 = {convert_connack_rc_to_reason_code(code).value: int(code) for code in ConnackCode}

EVENT_TIMEOUT = 5.0


class Listening(Protocol):
    @property
    def mqtt_port(self) -> int | None: ...

    @property
    def ws_port(self) -> int | None: ...


class PahoDevice:
    """See the module docstring. ``websocket``: over the WebSocket listener, on ``/mqtt``."""

    def __init__(
        self,
        server: Listening,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        clean_session: bool = True,
        manual_ack: bool = False,
        websocket: bool = False,
        timeout: float = EVENT_TIMEOUT,
    ) -> None:
        port = server.ws_port if websocket else server.mqtt_port
        assert port is not None
        self._port = port
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            transport="websockets" if websocket else "tcp",
            reconnect_on_failure=False,
        )
        if websocket:
            self.client.ws_set_options(path="/mqtt")
        if username is not None:
            self.client.username_pw_set(username, password)
        # With manual acks, a received QoS 1 message stays unacknowledged (in flight).
        self.client.manual_ack_set(manual_ack)
        self.connack: asyncio.Future[int] = self._loop.create_future()
        self.closed = asyncio.Event()
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.seen: list[tuple[str, dict[str, Any]]] = []  # everything ``next`` took off the queue
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # Callbacks run on paho's thread: they only hand values over to the event loop.
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._loop.call_soon_threadsafe(self._resolve, self.connack, CONNACK_V311.get(reason.value, reason.value))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._loop.call_soon_threadsafe(self.closed.set)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        codes = [reason.value for reason in reasons]
        self._loop.call_soon_threadsafe(self._suback, mid, codes)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._loop.call_soon_threadsafe(self.messages.put_nowait, (message.topic, bytes(message.payload)))

    @staticmethod
    def _resolve(future: asyncio.Future[Any], value: Any) -> None:
        if not future.done():
            future.set_result(value)

    def _suback(self, mid: int, codes: list[int]) -> None:
        self._resolve(self._subacks.setdefault(mid, self._loop.create_future()), codes)

    async def connect(self) -> int:
        """Connect and return the CONNACK return code (MQTT 3.1.1 numbering)."""
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self._port, 30)
        self.client.loop_start()
        closed: asyncio.Future[Any] = asyncio.ensure_future(self.closed.wait())
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.wait([self.connack, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        assert self.connack.done(), "the server closed the connection without a CONNACK"
        return self.connack.result()

    async def subscribe(self, filters: list[str], qos: int = 1) -> list[int]:
        """One SUBSCRIBE packet with every filter; returns the SUBACK return codes in order."""
        result, mid = self.client.subscribe([(topic, qos) for topic in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None, result
        # The SUBACK callback is scheduled on this loop, so it cannot run before we await.
        future = self._subacks.setdefault(mid, self._loop.create_future())
        async with asyncio.timeout(self._timeout):
            return await future

    async def publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        """A QoS 1 PUBLISH; returns once it is PUBACKed."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        await asyncio.to_thread(info.wait_for_publish, self._timeout)
        assert info.is_published()

    async def next(self, kind: str | None = None, timeout: float | None = None) -> tuple[str, dict[str, Any]]:
        """The next event (of ``kind``, skipping others). Its ``sig`` is dropped unchecked: the
        devices of ``tests.support.devices`` and the interop tests check signatures."""
        async with asyncio.timeout(timeout or self._timeout):
            while True:
                topic, payload = await self.messages.get()
                event = json.loads(payload)
                event.pop("sig", None)
                self.seen.append((topic, event))
                if kind is None or event["type"] == kind:
                    return topic, event

    async def drain(self, quiet: float = 0.5) -> list[tuple[str, bytes]]:
        out = []
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(quiet):
                    out.append(await self.messages.get())
        return out

    async def close(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


@contextlib.asynccontextmanager
async def paho_device(
    server: Listening,
    client_id: str,
    username: str | None,
    password: str | None,
    *,
    clean_session: bool = True,
    manual_ack: bool = False,
    websocket: bool = False,
    timeout: float = EVENT_TIMEOUT,
) -> AsyncIterator[PahoDevice]:
    device = PahoDevice(
        server,
        client_id,
        username,
        password,
        clean_session=clean_session,
        manual_ack=manual_ack,
        websocket=websocket,
        timeout=timeout,
    )
    try:
        yield device
    finally:
        await device.close()
