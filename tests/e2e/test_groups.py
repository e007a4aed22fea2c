"""Groups over real MQTT and HTTP: fan-out, offline catch-up, membership changes, limits."""

from __future__ import annotations

import asyncio
from typing import Any

from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register
from tests.support.devices import Device, connect_device


async def create_group(server: RunningServer, token: str, name: str, members: list[str]) -> str:
    async with http_client(server, token) as http:
        response = await http.post("/v1/groups", json={"name": name, "members": members})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["name"] == name and body["members"] == sorted({*members, body["owner"]})
        return str(body["group_id"])


async def send_group(device: Device, group_id: str, content: str, client_msg_id: str) -> dict[str, Any]:
    await device.publish(
        {"type": "send_group_message", "client_msg_id": client_msg_id, "group_id": group_id, "content": content}
    )
    return await device.next("message_ack")


async def stream(server: RunningServer, token: str, since: int = 0) -> list[dict[str, Any]]:
    async with http_client(server, token) as http:
        body = (await http.get("/v1/sync", params={"since_seq": since, "limit": 500})).json()
        return list(body["events"])


async def test_group_of_three_with_an_offline_member_who_catches_up_once(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, u) for u in ("alice", "bob", "carol")]
    group_id = await create_group(server, alice, "trio", ["bob", "carol"])
    async with (
        connect_device(server, "alice", "phone", alice) as phone,
        connect_device(server, "bob", "laptop", bob) as laptop,
    ):
        await phone.next("sync_response")
        await laptop.next("sync_response")
        acks = [await send_group(phone, group_id, f"hello {i}", f"g-{i}") for i in range(3)]
        assert [a["seq"] for a in acks] == [2, 3, 4]  # seq 1 is the group_updated "created"
        live = await laptop.collect("new_message", 3)
        assert [m["content"] for m in live] == ["hello 0", "hello 1", "hello 2"]
        assert all(m["group_id"] == group_id and "to_user" not in m for m in live)
        assert [m["server_msg_id"] for m in live] == [a["server_msg_id"] for a in acks]
    async with connect_device(server, "carol", "tablet", carol) as tablet:
        page = await tablet.next("sync_response")
        assert [e["seq"] for e in page["events"]] == [1, 2, 3, 4] and page["has_more"] is False
        created, *messages = page["events"]
        assert created == {
            "type": "group_updated",
            "seq": 1,
            "group_id": group_id,
            "action": "created",
            "user_id": "alice",
            "by": "alice",
        }
        assert [m["content"] for m in messages] == ["hello 0", "hello 1", "hello 2"]
        assert await tablet.drain() == []  # exactly once: nothing else arrives


async def test_non_members_and_unknown_groups_are_refused(server: RunningServer) -> None:
    alice, _, dave = [await register(server, u) for u in ("alice", "bob", "dave")]
    group_id = await create_group(server, alice, "pair", ["bob"])
    async with connect_device(server, "dave", "phone", dave) as phone:
        await phone.next("sync_response")
        await phone.publish(
            {"type": "send_group_message", "client_msg_id": "x1", "group_id": group_id, "content": "let me in"}
        )
        error = await phone.next("error")
        assert error["code"] == "not_a_member" and error["ref"] == "x1"
        await phone.publish({"type": "send_group_message", "client_msg_id": "x2", "group_id": "nope", "content": "?"})
        assert (await phone.next("error"))["code"] == "unknown_group"
    async with http_client(server, dave) as http:
        assert (await http.get(f"/v1/groups/{group_id}")).json()["error"]["code"] == "not_a_member"
        sent = await http.post("/v1/messages", json={"client_msg_id": "x3", "group_id": group_id, "content": "hi"})
        assert sent.status_code == 403 and sent.json()["error"]["code"] == "not_a_member"
        both = await http.post(
            "/v1/messages", json={"client_msg_id": "x4", "group_id": group_id, "to_user": "bob", "content": "hi"}
        )
        assert both.status_code == 422


async def test_removed_member_gets_nothing_new_and_keeps_history(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, u) for u in ("alice", "bob", "carol")]
    group_id = await create_group(server, alice, "trio", ["bob", "carol"])
    async with http_client(server, alice) as http:
        before = await http.post(
            "/v1/messages", json={"client_msg_id": "m1", "group_id": group_id, "content": "before"}
        )
        assert before.status_code == 200
        removed = await http.delete(f"/v1/groups/{group_id}/members/carol")
        assert removed.status_code == 204
        after = await http.post("/v1/messages", json={"client_msg_id": "m2", "group_id": group_id, "content": "after"})
        assert after.status_code == 200
    carol_events = await stream(server, carol)
    assert [e["type"] for e in carol_events] == ["group_updated", "new_message", "group_updated"]
    assert carol_events[2]["action"] == "member_removed" and carol_events[2]["user_id"] == "carol"
    bob_events = await stream(server, bob)
    assert [e.get("content") for e in bob_events if e["type"] == "new_message"] == ["before", "after"]
    async with http_client(server, carol) as http:
        history = (await http.get(f"/v1/conversations/group:{group_id}/messages")).json()
        assert [m["content"] for m in history["messages"]] == ["before"]
        refused = await http.post(
            "/v1/messages", json={"client_msg_id": "c1", "group_id": group_id, "content": "still here?"}
        )
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_a_member"
        groups = (await http.get("/v1/groups")).json()["groups"]
        assert groups == []


async def test_membership_changes_are_stream_events_for_everyone_involved(server: RunningServer) -> None:
    alice, bob, dave = [await register(server, u) for u in ("alice", "bob", "dave")]
    group_id = await create_group(server, alice, "club", ["bob"])
    async with http_client(server, alice) as http:
        await http.post("/v1/messages", json={"client_msg_id": "old", "group_id": group_id, "content": "old news"})
        assert (await http.post(f"/v1/groups/{group_id}/members", json={"user_id": "dave"})).status_code == 204
        again = await http.post(f"/v1/groups/{group_id}/members", json={"user_id": "dave"})
        assert again.status_code == 204  # already a member: nothing changes
        unknown = await http.post(f"/v1/groups/{group_id}/members", json={"user_id": "zed"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_user"
    async with http_client(server, bob) as http:
        not_owner = await http.post(f"/v1/groups/{group_id}/members", json={"user_id": "alice"})
        assert not_owner.status_code == 403 and not_owner.json()["error"]["code"] == "not_allowed"
        cannot_remove_owner = await http.delete(f"/v1/groups/{group_id}/members/alice")
        assert cannot_remove_owner.status_code == 403
        assert (await http.delete(f"/v1/groups/{group_id}/members/bob")).status_code == 204
    updates = [e for e in await stream(server, alice) if e["type"] == "group_updated"]
    assert [(e["action"], e["user_id"], e["by"]) for e in updates] == [
        ("created", "alice", "alice"),
        ("member_added", "dave", "alice"),
        ("member_left", "bob", "bob"),
    ]
    dave_events = await stream(server, dave)
    assert [(e["type"], e.get("action")) for e in dave_events] == [
        ("group_updated", "member_added"),
        ("group_updated", "member_left"),
    ]
    async with http_client(server, dave) as http:
        history = (await http.get(f"/v1/conversations/group:{group_id}/messages")).json()
        assert history["messages"] == []  # history starts at the join
        group = (await http.get(f"/v1/groups/{group_id}")).json()
        assert group["members"] == ["alice", "dave"] and group["owner"] == "alice"
        convs = (await http.get("/v1/conversations")).json()["conversations"]
        assert convs == [
            {"conversation_id": f"group:{group_id}", "name": "club", "last_message": None, "unread_count": 0}
        ]


async def test_member_limit_is_a_clear_error(server: RunningServer) -> None:
    server.services.chat.settings.group_max_members = 3
    alice = await register(server, "alice")
    for user in ("bob", "carol", "dave"):
        await server.services.store.create_user(user, "unused-hash")
    async with http_client(server, alice) as http:
        too_many = await http.post("/v1/groups", json={"name": "big", "members": ["bob", "carol", "dave"]})
        assert too_many.status_code == 409 and too_many.json()["error"]["code"] == "group_full"
        group_id = (await http.post("/v1/groups", json={"name": "ok", "members": ["bob", "carol"]})).json()["group_id"]
        full = await http.post(f"/v1/groups/{group_id}/members", json={"user_id": "dave"})
        assert full.status_code == 409 and full.json()["error"]["code"] == "group_full"
        unknown = await http.post("/v1/groups", json={"name": "ghosts", "members": ["nobody"]})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_user"


async def test_a_500_member_group_message_reaches_every_members_stream(server: RunningServer) -> None:
    alice = await register(server, "alice")
    members = [f"m{i:03d}" for i in range(499)]
    await asyncio.gather(*(server.services.store.create_user(m, "unused-hash") for m in members[:2]))
    for member in members[2:]:
        await server.services.store.create_user(member, "unused-hash")
    bob_token = server.services.tokens.issue("m000")
    group_id = await create_group(server, alice, "crowd", members)
    async with connect_device(server, "m000", "phone", bob_token) as listener:
        await listener.next("sync_response")
        async with http_client(server, alice) as http:
            ack = (
                await http.post(
                    "/v1/messages", json={"client_msg_id": "big", "group_id": group_id, "content": "hello everyone"}
                )
            ).json()
        live = await listener.next("new_message")
        assert live["server_msg_id"] == ack["server_msg_id"]
    for member in ["alice", *members]:
        page = await server.services.store.read_stream(member, 0, 10)
        assert [e.type for e in page.events] == ["group_updated", "new_message"], member
        assert page.events[1].server_msg_id == ack["server_msg_id"]  # type: ignore[union-attr]
