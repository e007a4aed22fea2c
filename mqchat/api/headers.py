"""Security headers on every HTTP response, and a Content-Security-Policy for the browser page.

Every response: ``X-Content-Type-Options: nosniff`` (a JSON body is never sniffed into
HTML or script), ``Referrer-Policy: no-referrer`` and ``X-Frame-Options: DENY``.

``Content-Security-Policy`` by path:

- the page (``/``) and its files (``/static/...``): only its own scripts and styles, no
  inline code, no framing, no ``<base>``, forms only to itself, and network connections to
  this origin plus the broker's WebSocket listeners on the same host name. The page opens
  ``ws://{location.hostname}:{ws_port}/mqtt`` (``wss`` under HTTPS), a different origin
  from the page's own, so ``'self'`` alone would block it; the sources are built from the
  request's ``Host`` (which is ``location.host`` in the browser) and the bound ports.
  ``worker-src blob:``: the vendored MQTT.js runs its keep-alive timers in a Worker made
  from a Blob (worker-timers), so that a background tab does not miss its PINGREQs.
- ``/docs``: Swagger UI from the package (static/vendor/swagger-ui), nothing from elsewhere:
  its own scripts only, no inline script; inline styles are allowed (Swagger UI sets style
  attributes), and ``data:`` images (its icons). ``/redoc`` is not served.
- everything else (the JSON API): ``default-src 'none'; frame-ancestors 'none'``.
"""

from __future__ import annotations

import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mqchat.api.schemas import ClientConfig

COMMON = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'{websockets}; worker-src 'self' blob:; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
DOCS_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
DOCS_PATHS = frozenset({"/docs"})

# A host name, IPv4 address or bracketed IPv6 address, then an optional port: nothing that
# could end the directive (``;``, ``,``, spaces) gets from the Host header into the policy.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::[0-9]{1,5})?")


def page_policy(host_header: str | None, config: ClientConfig) -> str:
    """The page's policy for a request with this ``Host``; without a usable one, the page
    may connect to its own origin only (a browser always sends one)."""
    match = _HOST.fullmatch(host_header or "")
    sources = ""
    if match is not None:
        hostname = match.group(1)
        if config.ws_port is not None:
            sources += f" ws://{hostname}:{config.ws_port}"
        if config.wss_port is not None:
            sources += f" wss://{hostname}:{config.wss_port}"
    return PAGE_POLICY.format(websockets=sources)


def policy_for(path: str, host_header: str | None, config: ClientConfig) -> str:
    if path == "/" or path.startswith("/static/"):
        return page_policy(host_header, config)
    if path in DOCS_PATHS:
        return DOCS_POLICY
    return API_POLICY


class SecurityHeaders:
    """Pure ASGI (a ``BaseHTTPMiddleware`` would hide a client's disconnect from long-polls).
    A header the route set itself is left as it is."""

    def __init__(self, app: ASGIApp, client_config: ClientConfig) -> None:
        self._app = app
        self._config = client_config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        host = _header(scope, b"host")
        policy = policy_for(scope["path"], host, self._config)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in (*COMMON, ("Content-Security-Policy", policy)):
                    headers.setdefault(name, value)
            await send(message)

        await self._app(scope, receive, send_with_headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
