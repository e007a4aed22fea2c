"""Accounts over real HTTP: the test password, clients of a server's API, registering, logging in."""

from __future__ import annotations

from typing import Protocol

import httpx

PASSWORD = "correct-horse-1"

UNLIMITED = {
    "send_rate_per_second": 100_000,
    "send_burst": 100_000,
    "user_send_rate_per_second": 100_000,
    "user_send_burst": 100_000,
    "command_rate_per_second": 100_000,
    "command_burst": 100_000,
    "max_new_devices_per_hour": 100_000,
}
"""Limits for tests that send in bursts on purpose: the rate limits are not what they test."""


class HttpServer(Protocol):
    """The in-process server (``RunningServer``) or a server process (``ServerProcess``)."""

    @property
    def http_port(self) -> int | None: ...


def http_client(server: HttpServer, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", headers=headers, timeout=30)


async def sign_up(http: httpx.AsyncClient, user_id: str, password: str = PASSWORD) -> str:
    """Create the user through ``http`` (any base URL, TLS or not) and return an access token."""
    created = await http.post("/v1/users", json={"user_id": user_id, "password": password})
    assert created.status_code == 201, created.text
    token = await http.post("/v1/token", json={"user_id": user_id, "password": password})
    assert token.status_code == 200, token.text
    return str(token.json()["access_token"])


async def register(server: HttpServer, user_id: str, password: str = PASSWORD) -> str:
    """Create the user and return an access token."""
    async with http_client(server) as http:
        return await sign_up(http, user_id, password)


async def login(server: HttpServer, user_id: str, password: str = PASSWORD, device_id: str | None = None) -> str:
    """An access token for an existing user (scoped to ``device_id`` when given)."""
    body = {"user_id": user_id, "password": password} | ({"device_id": device_id} if device_id else {})
    async with http_client(server) as http:
        response = await http.post("/v1/token", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["device_id"] == device_id
        return str(response.json()["access_token"])
