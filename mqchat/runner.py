"""Runs the three faces in one process: broker, bridge and HTTP API over one ``Services``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from mqchat.api.app import create_app, create_metrics_app
from mqchat.api.http11 import GuardedH11Protocol
from mqchat.api.schemas import ClientConfig
from mqchat.bridge.composition import Services, build_services
from mqchat.broker.amqtt_host import AmqttHost
from mqchat.broker.server import ListenerPortTaken, MqttServer
from mqchat.config import Settings
from mqchat.logs import quiet_libraries
from mqchat.logthrottle import LogThrottle
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)


class PortInUse(Exception):
    """A listener's port is taken; the message names the port and the flag that sets it."""


@dataclass(frozen=True)
class RunningServer:
    """The ports the listeners bound (useful with port 0); None for a listener that is off."""

    services: Services
    broker: MqttServer
    mqtt_port: int | None
    ws_port: int | None
    http_port: int | None
    mqtts_port: int | None = None
    wss_port: int | None = None
    https_port: int | None = None
    metrics_port: int | None = None


def _in_use(port: int, flag: str) -> PortInUse:
    return PortInUse(f"port {port} is already in use; choose another with {flag}")


def _bind(host: str, port: int, flag: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _in_use(port, flag) from None
        raise PortInUse(f"cannot listen on {host}:{port} ({exc.strerror}); check {flag}") from None
    return sock


PORT_FLAGS = {"mqtt": "--mqtt-port", "ws": "--ws-port", "mqtts": "tls.mqtts_port", "wss": "tls.wss_port"}
"""The MQTT listeners (``amqtt_host.LISTENERS``) and what sets each one's port."""


def check_ports(settings: Settings) -> None:
    """Fail fast, with a one-line message, before anything starts."""
    host, tls = settings.mqtt.host, settings.tls
    probes = []
    if tls.plain_listeners:
        probes += [(settings.mqtt.port, "mqtt"), (settings.mqtt.ws_port, "ws")]
    if tls.enabled:
        probes += [(tls.mqtts_port, "mqtts"), (tls.wss_port, "wss")]
    for port, listener in probes:
        if port:
            _bind(host, port, PORT_FLAGS[listener]).close()


async def _start_broker(host: AmqttHost, broker: MqttServer) -> None:
    """A port can be taken between ``check_ports`` and the bind (seen in CI, where tests pick
    free ports side by side): the same one-line message, not a traceback."""
    try:
        await host.start()
    except Exception as exc:
        await broker.close()  # the listeners that did start
        if isinstance(exc, ListenerPortTaken):
            raise _in_use(exc.port, PORT_FLAGS[exc.listener]) from None
        raise


def _http_sockets(settings: Settings) -> dict[str, socket.socket]:
    """The HTTP and/or HTTPS sockets (and the ``metrics.port`` one): bound before anything
    starts, listened on by uvicorn."""
    wanted = []
    if settings.tls.plain_listeners:
        wanted.append(("http", settings.http.port, "--http-port"))
    if settings.tls.enabled:
        wanted.append(("https", settings.tls.https_port, "tls.https_port"))
    sockets: dict[str, socket.socket] = {}
    try:
        for name, port, flag in wanted:
            sockets[name] = _bind(settings.http.host, port, flag)
            sockets[name].listen(2048)
        if settings.metrics.port is not None:
            sockets["metrics"] = _bind(settings.metrics.host, settings.metrics.port, "metrics.port")
            sockets["metrics"].listen(64)
    except PortInUse:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process owner (the CLI) handles signals and shuts everything down in order.
        yield


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE of this process; None where there is none (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def http_connection_cap(settings: Settings, fd_limit: int | None) -> int:
    """``http.max_connections``, but at most a quarter of the open-file limit per listener, so
    that idle HTTP connections alone cannot take every descriptor and lock MQTT clients out."""
    if fd_limit is None:
        return settings.http.max_connections
    return max(1, min(settings.http.max_connections, fd_limit // 4))


@asynccontextmanager
async def _serve_http(
    services: Services, sock: socket.socket, *, tls: bool, client_config: ClientConfig
) -> AsyncIterator[None]:
    settings = services.settings
    name = "https" if tls else "http"
    fd_limit = open_file_limit()
    cap = http_connection_cap(settings, fd_limit)
    if cap < settings.http.max_connections:
        log.info("%s listener: at most %d connections (a quarter of the open-file limit %s)", name, cap, fd_limit)
    trusted = settings.http.trusted_proxies
    config = uvicorn.Config(
        create_app(services, client_config),
        http=GuardedH11Protocol.configured(
            header_timeout=settings.http.header_timeout_seconds, max_connections=cap, listener=name
        ),
        ws="none",  # MQTT over WebSocket has its own listener; the API has no WebSocket route
        # asyncio accepts up to ``backlog`` connections per wake-up before any refused one is
        # closed (closing waits for the next loop turn): with uvicorn's 2048 a flood against a
        # full listener could still take every descriptor for a moment. Bound it by the cap.
        backlog=min(2048, cap),
        timeout_keep_alive=settings.http.keepalive_timeout_seconds,
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: any local process, or a
        # same-host proxy that does not set the header, could pick the client address that
        # login throttling counts. Only configured proxies are believed.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=list(trusted) if trusted else None,
        log_level="warning",
        log_config=None,  # uvicorn's lines go through mqchat's handler and format (mqchat.logs)
        lifespan="off",
        access_log=False,  # an access log would record query strings and client addresses at INFO
        timeout_graceful_shutdown=5,
        ssl_certfile=str(settings.tls.certfile) if tls else None,
        ssl_keyfile=str(settings.tls.keyfile) if tls else None,
    )
    async with _uvicorn(config, sock):
        yield


@asynccontextmanager
async def _uvicorn(config: uvicorn.Config, sock: socket.socket) -> AsyncIterator[None]:
    http = _EmbeddedUvicorn(config)
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started:
        if http_task.done():
            await http_task
            raise RuntimeError("HTTP server failed to start")
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        http.should_exit = True
        await http_task


def _serve_metrics(services: Services, sock: socket.socket) -> contextlib.AbstractAsyncContextManager[None]:
    """The ``metrics.port`` listener: only ``GET /metrics``, for a scraper (few connections)."""
    config = uvicorn.Config(
        create_metrics_app(services),
        http=GuardedH11Protocol.configured(
            header_timeout=services.settings.http.header_timeout_seconds, max_connections=64, listener="metrics"
        ),
        ws="none",
        backlog=64,
        timeout_keep_alive=services.settings.http.keepalive_timeout_seconds,
        log_level="warning",
        log_config=None,
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    return _uvicorn(config, sock)


_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class FdExhaustion:
    """Running out of file descriptors, reported in one line per 10 s (with a count).

    asyncio reports each failed ``accept()`` of a listener through the loop's exception
    handler with a traceback, and on Python 3.11 retries up to the listen backlog (2048 for
    uvicorn) times per wake-up: 634,009 tracebacks in 55 s (issue 10). uvloop (libuv) says
    nothing: it accepts and closes the waiting connections with a spare descriptor. So the
    exception handler swallows those errors into this report, and a probe opens and closes
    ``/dev/null`` every second, which fails exactly when the process is out of descriptors,
    whichever loop runs.
    """

    PROBE_INTERVAL = 1.0

    def __init__(self) -> None:
        self._throttle = LogThrottle()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: _ExceptionHandler | None = None
        self._probe: asyncio.Task[None] | None = None

    def report(self, exc: OSError, where: str) -> None:
        suppressed = self._throttle.allow("fds")
        if suppressed is None:
            return
        log.warning(
            "%s: %s (open-file limit %s); new connections cannot be accepted until some close%s",
            where,
            exc.strerror or exc,
            open_file_limit(),
            self._throttle.suffix(suppressed),
        )

    def handle_exception(self, context: dict[str, Any]) -> bool:
        """True if ``context`` was such an error, now reported (or counted)."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            self.report(exc, str(context.get("message", "event loop")))
            return True
        return False

    def install(self, loop: asyncio.AbstractEventLoop) -> FdExhaustion:
        """Route the loop's reports through this one and start the probe; ``uninstall`` undoes it."""
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handler)
        self._probe = loop.create_task(self.probe(), name="mqchat-fd-probe")
        return self

    async def uninstall(self) -> None:
        """Give the loop its handler back and stop the probe; nothing of it outlives the server
        (a probe still pending when the loop closes is reported as destroyed)."""
        if self._loop is not None and self._loop.get_exception_handler() == self._handler:
            self._loop.set_exception_handler(self._previous)
        probe, self._probe = self._probe, None
        if probe is not None:
            try:
                await stop_task(probe)
            except Exception:  # the probe died earlier; the shutdown goes on
                log.exception("the open-file probe had failed")

    def _handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self.handle_exception(context):
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    async def probe(self) -> None:
        if os.name != "posix":  # pragma: no cover
            return
        while True:
            await asyncio.sleep(self.PROBE_INTERVAL)
            try:
                os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.report(exc, "out of file descriptors")


@asynccontextmanager
async def run_server(settings: Settings) -> AsyncIterator[RunningServer]:
    check_ports(settings)
    quiet_libraries()  # whoever set up logging: no SQL rows or frames at DEBUG
    http_socks = _http_sockets(settings)
    fds = FdExhaustion().install(asyncio.get_running_loop())
    try:
        async with build_services(settings, serving=True) as services:
            broker = MqttServer(services)
            host = AmqttHost(broker, settings)
            await _start_broker(host, broker)
            services.chat.attach(broker)
            await services.ops.start()
            # Deletes the uploads no message carries, every files.gc_interval_seconds.
            collector = asyncio.create_task(services.files.run_collector(), name="mqchat-files-gc")
            try:
                # The browser page learns the bound ports (they differ from the settings with port 0).
                client_config = ClientConfig.advertised(
                    settings, ws_port=broker.bound_port("ws"), wss_port=broker.bound_port("wss")
                )
                async with contextlib.AsyncExitStack() as stack:
                    for name, sock in http_socks.items():
                        if name == "metrics":
                            await stack.enter_async_context(_serve_metrics(services, sock))
                            continue
                        await stack.enter_async_context(
                            _serve_http(services, sock, tls=name == "https", client_config=client_config)
                        )
                    yield _running(services, broker, http_socks)
            finally:
                await stop_task(collector)
                await services.ops.stop()
                services.chat.attach(None)
                await broker.close()
                await host.shutdown()
    finally:
        try:
            await fds.uninstall()
        finally:  # a shutdown cancelled while it waits for the probe still closes the sockets
            for sock in http_socks.values():
                sock.close()


def _running(services: Services, broker: MqttServer, http_socks: dict[str, socket.socket]) -> RunningServer:
    def http_port(name: str) -> int | None:
        sock = http_socks.get(name)
        return int(sock.getsockname()[1]) if sock is not None else None

    return RunningServer(
        services,
        broker,
        mqtt_port=broker.bound_port("mqtt"),
        ws_port=broker.bound_port("ws"),
        http_port=http_port("http"),
        mqtts_port=broker.bound_port("mqtts"),
        wss_port=broker.bound_port("wss"),
        https_port=http_port("https"),
        metrics_port=http_port("metrics"),
    )
