"""The HTTP API against a running server: accounts, send, sync, long-poll, history."""

from __future__ import annotations

import asyncio

from mqchat.runner import RunningServer
from tests.support.accounts import PASSWORD, http_client, login, register
from tests.support.devices import connect_device


async def test_register_and_token(server: RunningServer) -> None:
    async with http_client(server) as http:
        created = await http.post("/v1/users", json={"user_id": "alice", "password": PASSWORD})
        assert created.status_code == 201 and created.json() == {"user_id": "alice"}
        taken = await http.post("/v1/users", json={"user_id": "alice", "password": PASSWORD})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "user_exists"
        bad_id = await http.post("/v1/users", json={"user_id": "a/b", "password": PASSWORD})
        assert bad_id.status_code == 422 and bad_id.json()["error"]["code"] == "invalid_command"
        short = await http.post("/v1/users", json={"user_id": "carol", "password": "short"})
        assert short.status_code == 422
        token = await http.post("/v1/token", json={"user_id": "alice", "password": PASSWORD})
        body = token.json()
        assert token.status_code == 200 and body["token_type"] == "bearer" and body["expires_in"] > 0
        wrong = await http.post("/v1/token", json={"user_id": "alice", "password": "wrong-password"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_credentials"
        nobody = await http.post("/v1/token", json={"user_id": "nobody", "password": PASSWORD})
        assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "invalid_credentials"


async def test_requires_valid_bearer(server: RunningServer) -> None:
    async with http_client(server) as http:
        missing = await http.get("/v1/sync")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "not_authorized"
    async with http_client(server, "not-a-token") as http:
        bad = await http.get("/v1/sync")
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_token"


async def test_send_sync_and_idempotency(server: RunningServer) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    bob = await login(server, "bob")
    message = {"client_msg_id": "c-1", "to_user": "bob", "content": "Hello Bob!", "msg_type": "text"}
    async with http_client(server, alice) as http:
        first = await http.post("/v1/messages", json=message)
        assert first.status_code == 200, first.text
        ack = first.json()
        assert ack["type"] == "message_ack" and ack["seq"] == 1 and ack["duplicate"] is False
        again = (await http.post("/v1/messages", json=message)).json()
        assert again == {**ack, "duplicate": True}
        unknown = await http.post("/v1/messages", json={**message, "client_msg_id": "c-2", "to_user": "zed"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_recipient"
        invalid = await http.post("/v1/messages", json={**message, "msg_type": "sticker"})
        assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_command"
    async with http_client(server, bob) as http:
        sync = (await http.get("/v1/sync", params={"since_seq": 0})).json()
        assert sync["type"] == "sync_response" and sync["latest_seq"] == 1 and sync["has_more"] is False
        [event] = sync["events"]
        assert event["server_msg_id"] == ack["server_msg_id"] and event["from_user"] == "alice"
        assert event["type"] == "new_message" and event["seq"] == 1
        paged = (await http.get("/v1/sync", params={"since_seq": 1})).json()
        assert paged["events"] == [] and paged["latest_seq"] == 1


async def test_long_poll_woken_by_mqtt_send(server: RunningServer) -> None:
    alice = await register(server, "alice")
    bob = await register(server, "bob")
    async with http_client(server, bob) as http, connect_device(server, "alice", "phone", alice) as phone:
        poll = asyncio.create_task(http.get("/v1/sync/long-poll", params={"since_seq": 0, "timeout": 20}))
        await asyncio.sleep(0.5)
        assert not poll.done()
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        await phone.send("bob", "wake up", "lp-1")
        response = await asyncio.wait_for(poll, 10)
        assert loop.time() - sent_at < 10
        body = response.json()
        assert [e["content"] for e in body["events"]] == ["wake up"]


async def test_long_poll_times_out_empty(server: RunningServer) -> None:
    bob = await register(server, "bob")
    async with http_client(server, bob) as http:
        body = (await http.get("/v1/sync/long-poll", params={"since_seq": 0, "timeout": 0.5})).json()
        assert body == {"type": "sync_response", "events": [], "latest_seq": 0, "has_more": False}
        too_long = await http.get("/v1/sync/long-poll", params={"timeout": 61})
        assert too_long.status_code == 422


async def test_conversations_and_history(server: RunningServer) -> None:
    alice = await register(server, "alice")
    bob = await register(server, "bob")
    await register(server, "carol")
    async with http_client(server, alice) as http:
        for i in range(5):
            await http.post("/v1/messages", json={"client_msg_id": f"ab-{i}", "to_user": "bob", "content": f"b{i}"})
        await http.post("/v1/messages", json={"client_msg_id": "ac-0", "to_user": "carol", "content": "c0"})
    async with http_client(server, bob) as http:
        await http.post("/v1/messages", json={"client_msg_id": "ba-0", "to_user": "alice", "content": "reply"})
        convs = (await http.get("/v1/conversations")).json()["conversations"]
        assert [c["conversation_id"] for c in convs] == ["user:alice"]
        assert convs[0]["last_message"]["content"] == "reply" and convs[0]["unread_count"] == 5

    async with http_client(server, alice) as http:
        convs = (await http.get("/v1/conversations")).json()["conversations"]
        assert [c["conversation_id"] for c in convs] == ["user:bob", "user:carol"]
        assert convs[0]["unread_count"] == 1 and convs[1]["unread_count"] == 0
        page1 = (await http.get("/v1/conversations/user:bob/messages", params={"limit": 4})).json()
        assert [m["content"] for m in page1["messages"]] == ["reply", "b4", "b3", "b2"]
        page2 = (
            await http.get(
                "/v1/conversations/user:bob/messages", params={"limit": 4, "before_id": page1["next_before_id"]}
            )
        ).json()
        assert [m["content"] for m in page2["messages"]] == ["b1", "b0"] and page2["next_before_id"] is None
        bad = await http.get("/v1/conversations/chan:x/messages")
        assert bad.status_code == 422
        too_big = await http.get("/v1/conversations/user:bob/messages", params={"limit": 201})
        assert too_big.status_code == 422


async def test_health_and_openapi(server: RunningServer) -> None:
    async with http_client(server) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok", "database": "ok"}
        schema = (await http.get("/openapi.json")).json()
        assert {"/v1/users", "/v1/token", "/v1/messages", "/v1/sync", "/v1/sync/long-poll", "/v1/conversations"} <= set(
            schema["paths"]
        )
        assert (await http.get("/docs")).status_code == 200
        missing = await http.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
