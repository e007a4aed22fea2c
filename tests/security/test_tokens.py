"""Device-scoped tokens, refresh, device revocation and login throttling, on a real server."""

from __future__ import annotations

import pytest

from mqchat.config import AuthSettings, Settings
from mqchat.runner import RunningServer
from tests.security.raw import CONNACK_ACCEPTED, connack, connect, raw_client
from tests.support.accounts import PASSWORD, http_client, login, register
from tests.support.devices import connect_device

CONNACK_NOT_AUTHORIZED = b"\x20\x02\x00\x05"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    auth = AuthSettings(login_max_failures=3, login_max_failures_per_ip=5, login_window_seconds=60)
    return settings.model_copy(update={"auth": auth})


async def test_a_device_token_works_only_for_its_device(server: RunningServer) -> None:
    any_device = await register(server, "alice")
    phone = await login(server, "alice", device_id="phone")
    assert await connack(server, "alice", "phone", phone) == CONNACK_ACCEPTED
    assert await connack(server, "alice", "laptop", phone) == CONNACK_NOT_AUTHORIZED
    assert await connack(server, "alice", "laptop", any_device) == CONNACK_ACCEPTED
    async with http_client(server, phone) as http:
        assert (await http.get("/v1/sync")).status_code == 200
    async with http_client(server) as http:
        bad = await http.post("/v1/token", json={"user_id": "alice", "password": PASSWORD, "device_id": "a/b"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_command"


async def test_refresh_keeps_the_scope(server: RunningServer) -> None:
    await register(server, "alice")
    phone = await login(server, "alice", device_id="phone")
    async with http_client(server, phone) as http:
        response = await http.post("/v1/token/refresh")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["device_id"] == "phone" and body["expires_in"] > 0 and body["token_type"] == "bearer"
    fresh = body["access_token"]
    assert await connack(server, "alice", "phone", fresh) == CONNACK_ACCEPTED
    assert await connack(server, "alice", "laptop", fresh) == CONNACK_NOT_AUTHORIZED
    async with http_client(server, "forged") as http:
        refused = await http.post("/v1/token/refresh")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_token"


async def test_revoking_a_device_closes_it_and_refuses_its_earlier_tokens(server: RunningServer) -> None:
    unscoped = await register(server, "alice")
    bob = await register(server, "bob")
    phone = await login(server, "alice", device_id="phone")
    assert server.mqtt_port is not None
    async with (
        raw_client(server.mqtt_port) as live_phone,
        connect_device(server, "alice", "laptop", unscoped) as laptop,
        connect_device(server, "bob", "desk", bob) as desk,
    ):
        await live_phone.send(connect("alice:phone", "alice", phone))
        assert await live_phone.read_packet() == CONNACK_ACCEPTED
        await laptop.next("sync_response")
        async with http_client(server, unscoped) as http:
            assert (await http.delete("/v1/devices/phone")).status_code == 204
            assert (await http.delete("/v1/devices/no%2Fsuch")).status_code in (404, 422)
        assert await live_phone.closed(timeout=3)  # closed at once, not at the next keep-alive

        # Every token issued before the revocation is refused for the phone ...
        assert await connack(server, "alice", "phone", phone) == CONNACK_NOT_AUTHORIZED
        assert await connack(server, "alice", "phone", unscoped) == CONNACK_NOT_AUTHORIZED
        async with http_client(server, phone) as http:
            refused = await http.get("/v1/sync")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_token"
            assert (await http.post("/v1/token/refresh")).status_code == 401
        # ... while the other devices go on: the laptop still chats.
        await desk.send("alice", "still here?", "r-1")
        assert (await laptop.next("new_message"))["content"] == "still here?"
        async with http_client(server, unscoped) as http:
            assert (await http.get("/v1/sync")).status_code == 200
    # Logging in again gives the phone a working token.
    again = await login(server, "alice", device_id="phone")
    assert await connack(server, "alice", "phone", again) == CONNACK_ACCEPTED


async def test_another_user_cannot_revoke_my_device(server: RunningServer) -> None:
    alice = await register(server, "alice")
    mallory = await register(server, "mallory")
    async with http_client(server, mallory) as http:
        # Revocation is always of the caller's own devices: this revokes mallory's "phone".
        assert (await http.delete("/v1/devices/phone")).status_code == 204
    assert await connack(server, "alice", "phone", alice) == CONNACK_ACCEPTED
    async with http_client(server) as http:
        assert (await http.delete("/v1/devices/phone")).status_code == 401


async def test_failed_logins_are_throttled_per_user_and_per_address(server: RunningServer) -> None:
    for user in ("alice", "carol", "dave"):
        await register(server, user)
    async with http_client(server) as http:
        for _ in range(3):
            wrong = await http.post("/v1/token", json={"user_id": "alice", "password": "wrong-password"})
            assert wrong.status_code == 401
        # Throttled even with the right password: guessing on gains nothing.
        throttled = await http.post("/v1/token", json={"user_id": "alice", "password": PASSWORD})
        assert throttled.status_code == 429, throttled.text
        error = throttled.json()["error"]
        assert error["code"] == "rate_limited" and 0 < error["retry_after"] <= 60
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        # Another user from the same address is still fine ...
        assert (await http.post("/v1/token", json={"user_id": "carol", "password": PASSWORD})).status_code == 200
        for _ in range(2):
            await http.post("/v1/token", json={"user_id": "carol", "password": "wrong-password"})
        # ... until the address itself has failed 5 times (3 for alice, 2 for carol).
        blocked = await http.post("/v1/token", json={"user_id": "dave", "password": PASSWORD})
        assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "rate_limited"
