"""What ``mqchat.api.http11`` relies on in uvicorn, and the log throttle it logs through."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from mqchat.api.http11 import GuardedH11Protocol
from mqchat.logthrottle import LogThrottle

METHODS = ["connection_made", "connection_lost", "data_received", "handle_events", "on_response_complete"]
PRIVATE_METHODS = ["_unsupported_upgrade_warning"]
ATTRIBUTES = ["conn", "cycle", "transport", "loop", "logger", "server_state"]


@pytest.mark.parametrize("name", METHODS + PRIVATE_METHODS)
def test_uvicorn_h11_protocol_still_has_the_methods_we_override(name: str) -> None:
    assert callable(getattr(H11Protocol, name, None)), f"uvicorn's H11Protocol has no {name} any more"


async def test_uvicorn_h11_protocol_still_has_the_attributes_we_use() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    config = uvicorn.Config(app, http=GuardedH11Protocol, ws="none", lifespan="off", log_config=None)
    config.load()
    protocol = GuardedH11Protocol(config, ServerState(), {}, asyncio.get_running_loop())
    for name in ATTRIBUTES:
        assert hasattr(protocol, name), f"uvicorn's H11Protocol sets no {name} any more"


def test_configured_classes_carry_their_listener_limits() -> None:
    http = GuardedH11Protocol.configured(header_timeout=2.5, max_connections=7, listener="http")
    https = GuardedH11Protocol.configured(header_timeout=9, max_connections=70, listener="https")
    assert (http.header_timeout, http.max_connections, http.listener) == (2.5, 7, "http")
    assert (https.header_timeout, https.max_connections) == (9, 70)
    assert issubclass(http, H11Protocol)


def test_the_log_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = LogThrottle(10, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(5)] == [None] * 5
    assert throttle.allow("b") == 0  # keys are independent
    now[0] = 10.5
    assert throttle.allow("a") == 5
    assert throttle.suffix(5) == " (5 more like this in the last 10 s)"
    assert throttle.allow("a") is None
