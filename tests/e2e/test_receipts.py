"""Delivered and read receipts, read markers across devices, unread counts, recall."""

from __future__ import annotations

import asyncio
from typing import Any

from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register
from tests.support.devices import Device, connect_device


async def send(server: RunningServer, token: str, to_user: str, content: str, client_msg_id: str) -> dict[str, Any]:
    async with http_client(server, token) as http:
        response = await http.post(
            "/v1/messages", json={"client_msg_id": client_msg_id, "to_user": to_user, "content": content}
        )
        assert response.status_code == 200, response.text
        return dict(response.json())


async def unread(server: RunningServer, token: str) -> dict[str, int]:
    async with http_client(server, token) as http:
        convs = (await http.get("/v1/conversations")).json()["conversations"]
        return {c["conversation_id"]: c["unread_count"] for c in convs}


async def next_of(device: Device, kind: str) -> dict[str, Any]:
    return await device.next(kind, timeout=10)


async def test_delivered_when_a_recipient_device_acks_once_per_range(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    acks = [await send(server, alice, "bob", f"m{i}", f"c{i}") for i in range(3)]
    async with (
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "alice", "laptop", alice) as laptop,
        connect_device(server, "bob", "phone", bob) as bob_phone,
    ):
        for device in (phone, laptop, bob_phone):
            await device.next("sync_response")
        await bob_phone.publish({"type": "ack", "seq": 3})
        for device in (phone, laptop):  # every device of the sender sees it
            delivered = await next_of(device, "message_delivered")
            assert delivered["message_id"] == acks[2]["server_msg_id"]
            assert delivered["conversation_id"] == "user:bob" and delivered["delivered_to"] == "bob"
            assert delivered["seq"] == 4
        async with connect_device(server, "bob", "laptop", bob) as bob_laptop:
            await bob_laptop.next("sync_response")
            await bob_laptop.publish({"type": "ack", "seq": 3})  # already delivered: no new receipt
            await asyncio.sleep(0.5)
        assert [e["type"] for e in await phone.drain()] == []
    async with http_client(server, alice) as http:
        receipts = (await http.get(f"/v1/messages/{acks[1]['server_msg_id']}/receipts")).json()
        [bob_receipt] = receipts["receipts"]
        assert bob_receipt["user_id"] == "bob" and bob_receipt["delivered_at"] and bob_receipt["read_at"] is None


async def test_read_receipts_markers_and_unread_counts(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    carol = await register(server, "carol")
    acks = [await send(server, alice, "bob", f"m{i}", f"c{i}") for i in range(3)]
    assert await unread(server, bob) == {"user:alice": 3}
    async with (
        connect_device(server, "alice", "phone", alice) as sender,
        connect_device(server, "bob", "phone", bob) as phone,
        connect_device(server, "bob", "laptop", bob) as laptop,
    ):
        for device in (sender, phone, laptop):
            await device.next("sync_response")
        await phone.publish({"type": "mark_as_read", "message_id": acks[1]["server_msg_id"]})
        read = await next_of(sender, "message_read")
        assert (read["message_id"], read["conversation_id"], read["read_by"]) == (
            acks[1]["server_msg_id"],
            "user:bob",
            "bob",
        )
        for device in (phone, laptop):  # every device of the reader agrees
            marker = await next_of(device, "read_marker")
            assert marker["conversation_id"] == "user:alice" and marker["message_id"] == acks[1]["server_msg_id"]
        assert await unread(server, bob) == {"user:alice": 1}
        async with http_client(server, bob) as http:
            done = await http.post("/v1/conversations/user:alice/read", json={"message_id": acks[2]["server_msg_id"]})
            assert done.status_code == 204
            wrong = await http.post("/v1/conversations/user:carol/read", json={"message_id": acks[2]["server_msg_id"]})
            assert wrong.status_code == 404
        assert (await next_of(laptop, "read_marker"))["message_id"] == acks[2]["server_msg_id"]
        assert (await next_of(sender, "message_read"))["message_id"] == acks[2]["server_msg_id"]
        assert await unread(server, bob) == {"user:alice": 0}
        await phone.publish({"type": "mark_as_read", "message_id": acks[0]["server_msg_id"]})  # older: no-op
        await asyncio.sleep(0.5)
        assert [e["type"] for e in await sender.drain()] == []
    async with http_client(server, alice) as http:
        receipts = (await http.get(f"/v1/messages/{acks[2]['server_msg_id']}/receipts")).json()["receipts"]
        assert receipts[0]["user_id"] == "bob" and receipts[0]["read_at"] and receipts[0]["delivered_at"]
    async with http_client(server, carol) as http:
        stranger = await http.get(f"/v1/messages/{acks[2]['server_msg_id']}/receipts")
        assert stranger.status_code == 404


async def test_group_receipts_name_the_group(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with http_client(server, alice) as http:
        group_id = (await http.post("/v1/groups", json={"name": "g", "members": ["bob"]})).json()["group_id"]
        ack = (
            await http.post("/v1/messages", json={"client_msg_id": "g1", "group_id": group_id, "content": "hi all"})
        ).json()
    async with (
        connect_device(server, "alice", "phone", alice) as sender,
        connect_device(server, "bob", "phone", bob) as phone,
    ):
        await sender.next("sync_response")
        page = await phone.next("sync_response")
        await phone.publish({"type": "ack", "seq": page["latest_seq"]})
        delivered = await next_of(sender, "message_delivered")
        assert delivered["conversation_id"] == f"group:{group_id}" and delivered["message_id"] == ack["server_msg_id"]
        await phone.publish({"type": "mark_as_read", "message_id": ack["server_msg_id"]})
        read = await next_of(sender, "message_read")
        assert read["conversation_id"] == f"group:{group_id}" and read["read_by"] == "bob"
        assert (await next_of(phone, "read_marker"))["conversation_id"] == f"group:{group_id}"


async def test_recall_inside_the_window_leaves_a_tombstone(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    keep = await send(server, alice, "bob", "keep me", "k1")
    oops = await send(server, alice, "bob", "oops, wrong chat", "o1")
    async with (
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "bob", "phone", bob) as bob_phone,
    ):
        await phone.next("sync_response")
        await bob_phone.next("sync_response")
        await bob_phone.publish({"type": "recall_message", "message_id": oops["server_msg_id"]})
        assert (await next_of(bob_phone, "error"))["code"] == "not_allowed"
        await phone.publish({"type": "recall_message", "message_id": oops["server_msg_id"]})
        for device, conversation in ((phone, "user:bob"), (bob_phone, "user:alice")):
            recalled = await next_of(device, "message_recalled")
            assert recalled["message_id"] == oops["server_msg_id"] and recalled["recalled_by"] == "alice"
            assert recalled["conversation_id"] == conversation
    async with http_client(server, bob) as http:
        history = (await http.get("/v1/conversations/user:alice/messages")).json()["messages"]
        assert [(m["content"], bool(m.get("recalled_at"))) for m in history] == [(None, True), ("keep me", False)]
        events = (await http.get("/v1/sync")).json()["events"]
        tombstone = next(e for e in events if e.get("server_msg_id") == oops["server_msg_id"])
        assert "content" not in tombstone and tombstone["recalled_at"]
        assert "oops" not in str(events)
        assert await unread(server, bob) == {"user:alice": 1}
        assert keep["server_msg_id"] in [e.get("server_msg_id") for e in events]
    async with http_client(server, alice) as http:
        again = await http.post(f"/v1/messages/{oops['server_msg_id']}/recall")
        assert again.status_code == 204  # already recalled: nothing changes


async def test_recall_after_the_window_is_refused(server: RunningServer) -> None:
    server.services.chat.settings.recall_window_seconds = 0.2
    alice = await register(server, "alice")
    await register(server, "bob")
    ack = await send(server, alice, "bob", "too late to take back", "t1")
    await asyncio.sleep(0.5)
    async with http_client(server, alice) as http:
        late = await http.post(f"/v1/messages/{ack['server_msg_id']}/recall")
        assert late.status_code == 403 and late.json()["error"]["code"] == "recall_window_passed"
        history = (await http.get("/v1/conversations/user:bob/messages")).json()["messages"]
        assert history[0]["content"] == "too late to take back"
