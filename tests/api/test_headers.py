"""Security headers: a strict Content-Security-Policy for the browser page, nosniff everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqchat.api.headers import page_policy
from mqchat.api.schemas import ClientConfig
from mqchat.runner import RunningServer
from tests.support.accounts import http_client


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for directive in policy.split(";"):
        name, *sources = directive.split()
        parsed[name] = sources
    return parsed


COMMON = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/app.css", "/static/vendor/mqtt.min.js"])
async def test_the_page_and_its_files_get_a_strict_policy(server: RunningServer, path: str) -> None:
    async with http_client(server) as http:
        response = await http.get(path, headers={"Host": "chat.example:8080"})
    assert response.status_code == 200
    assert {name: response.headers.get(name) for name in COMMON} == COMMON
    policy = directives(response.headers["content-security-policy"])
    assert policy == {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", "blob:"],
        # The broker's WebSocket is another port of the host the page came from.
        "connect-src": ["'self'", f"ws://chat.example:{server.ws_port}"],
        "worker-src": ["'self'", "blob:"],  # MQTT.js's keep-alive timers
        "object-src": ["'none'"],
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
    }


@pytest.mark.parametrize("path", ["/healthz", "/v1/client-config", "/openapi.json", "/v1/conversations", "/nope"])
async def test_api_responses_are_not_sniffed_framed_or_scripted(server: RunningServer, path: str) -> None:
    async with http_client(server) as http:
        response = await http.get(path)
    assert response.headers["content-type"].startswith("application/json")
    assert {name: response.headers.get(name) for name in COMMON} == COMMON
    assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


async def test_refusals_from_the_body_limit_get_the_headers_too(server: RunningServer) -> None:
    async with http_client(server) as http:
        response = await http.post("/v1/token", content=b"x" * 200_000, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_the_swagger_page_loads_only_its_own_scripts_and_is_not_framed(server: RunningServer) -> None:
    async with http_client(server) as http:
        response = await http.get("/docs")
        assert (await http.get("/redoc")).status_code == 404  # it would need a CDN
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert "http" not in response.text.replace('href="/', "").replace('src="/', "")  # nothing from elsewhere
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("host", "sources"),
    [
        ("chat.example", ["'self'", "ws://chat.example:8083", "wss://chat.example:8884"]),
        ("127.0.0.1:8080", ["'self'", "ws://127.0.0.1:8083", "wss://127.0.0.1:8884"]),
        ("[::1]:8080", ["'self'", "ws://[::1]:8083", "wss://[::1]:8884"]),
        # Nothing from a hostile Host header gets into the policy.
        ("evil.example; script-src *", ["'self'"]),
        ("evil.example:80 *", ["'self'"]),
        ("", ["'self'"]),
        (None, ["'self'"]),
    ],
)
def test_websocket_sources_come_from_a_well_formed_host_only(host: str | None, sources: list[str]) -> None:
    policy = page_policy(host, ClientConfig(ws_port=8083, wss_port=8884))
    assert directives(policy)["connect-src"] == sources
    assert directives(policy)["script-src"] == ["'self'"]
