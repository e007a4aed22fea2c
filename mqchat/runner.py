"""Runs the three faces in one process: broker, bridge and HTTP API over one ``Services``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn

from mqchat.api.app import create_app
from mqchat.bridge.services import Services, build_services
from mqchat.broker.server import ChatBroker, broker_config
from mqchat.config import Settings

log = logging.getLogger(__name__)


class PortInUse(Exception):
    """A listener's port is taken; the message names the port and the flag that sets it."""


@dataclass(frozen=True)
class RunningServer:
    services: Services
    broker: ChatBroker
    mqtt_port: int
    ws_port: int
    http_port: int


def _bind(host: str, port: int, flag: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is already in use; choose another with {flag}") from None
        raise PortInUse(f"cannot listen on {host}:{port} ({exc.strerror}); check {flag}") from None
    return sock


def check_ports(settings: Settings) -> None:
    """Fail fast, with a one-line message, before anything starts."""
    probes = [
        (settings.mqtt.host, settings.mqtt.port, "--mqtt-port"),
        (settings.mqtt.host, settings.mqtt.ws_port, "--ws-port"),
    ]
    for host, port, flag in probes:
        if port:
            _bind(host, port, flag).close()


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process owner (the CLI) handles signals and shuts everything down in order.
        yield


@asynccontextmanager
async def run_server(settings: Settings) -> AsyncIterator[RunningServer]:
    check_ports(settings)
    http_sock = _bind(settings.http.host, settings.http.port, "--http-port")
    http_sock.listen(2048)
    async with build_services(settings) as services:
        broker = ChatBroker(
            broker_config(services, host=settings.mqtt.host, port=settings.mqtt.port, ws_port=settings.mqtt.ws_port)
        )
        await broker.start()
        try:
            config = uvicorn.Config(
                create_app(services), log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=5
            )
            http = _EmbeddedUvicorn(config)
            http_task = asyncio.create_task(http.serve(sockets=[http_sock]))
            while not http.started:
                if http_task.done():
                    await http_task
                    raise RuntimeError("HTTP server failed to start")
                await asyncio.sleep(0.01)
            try:
                yield RunningServer(
                    services, broker, broker.bound_port("default"), broker.bound_port("ws"), http_sock.getsockname()[1]
                )
            finally:
                http.should_exit = True
                await http_task
        finally:
            await broker.shutdown()
            http_sock.close()
