"""Administration on a real server, over HTTP and the command line: roles, disabling (logins,
tokens and live connections refused), password resets, deleting an account (what goes, what
stays as a tombstone) and listing accounts and groups. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, select

from mqchat.bridge.storage import SqlStore
from mqchat.bridge.tables import messages
from mqchat.cli import main
from mqchat.config import Settings
from mqchat.core.errors import CursorExpired
from mqchat.runner import RunningServer
from tests.security.raw import CONNACK_ACCEPTED, connect, raw_client
from tests.support.accounts import PASSWORD, http_client, register
from tests.support.devices import connect_device

pytestmark = pytest.mark.timeout(90)
CONNACK_NOT_AUTHORIZED = b"\x20\x02\x00\x05"


async def connack(server: RunningServer, user_id: str, token: str) -> bytes:
    assert server.mqtt_port is not None
    async with raw_client(server.mqtt_port) as raw:
        await raw.send(connect(f"{user_id}:probe", user_id, token))
        return await raw.read_packet()


async def login(server: RunningServer, user_id: str, password: str = PASSWORD) -> httpx.Response:
    async with http_client(server) as http:
        return await http.post("/v1/token", json={"user_id": user_id, "password": password})


async def until_offline(server: RunningServer, user_id: str, timeout: float = 15) -> None:
    for _ in range(int(timeout / 0.05)):
        if not server.services.chat.presence.devices_of(user_id):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{user_id} is still connected after {timeout} s")


def error_code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


async def test_only_administrators_reach_the_admin_api(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with http_client(server, bob) as http:
        assert error_code(await http.get("/v1/admin/users")) == (403, "admin_only")
        assert error_code(await http.post("/v1/admin/users/alice/disable")) == (403, "admin_only")
    async with http_client(server) as http:
        assert error_code(await http.get("/v1/admin/users")) == (401, "not_authorized")

    # The role is read from the database at each request: alice's existing token works at once.
    await server.services.ops.admin.set_role("alice", "admin")
    async with http_client(server, alice) as http:
        listed = await http.get("/v1/admin/users")
        assert listed.status_code == 200, listed.text
        users = {u["user_id"]: u for u in listed.json()["users"]}
        assert (users["alice"]["role"], users["bob"]["role"]) == ("admin", "user")
        assert users["bob"] | {"created_at": ""} == {
            "user_id": "bob",
            "role": "user",
            "status": "active",
            "created_at": "",
            "disabled_at": None,
            "deleted_at": None,
            "last_seq": 0,
            "connected_devices": [],
        }
        page = await http.get("/v1/admin/users", params={"limit": 1})
        assert [u["user_id"] for u in page.json()["users"]] == ["alice"] and page.json()["next_after"] == "alice"
        rest = await http.get("/v1/admin/users", params={"limit": 1, "after": "alice"})
        assert [u["user_id"] for u in rest.json()["users"]] == ["bob"]
        assert error_code(await http.get("/v1/admin/users/nobody")) == (404, "unknown_user")
        # An administrator does not lock themselves out with one request.
        assert error_code(await http.post("/v1/admin/users/alice/disable")) == (403, "not_allowed")
    # And demoting takes effect at the next request too.
    await server.services.ops.admin.set_role("alice", "user")
    async with http_client(server, alice) as http:
        assert error_code(await http.get("/v1/admin/users")) == (403, "admin_only")


async def test_disabling_refuses_logins_tokens_and_connections(server: RunningServer) -> None:
    root, bob = await register(server, "root"), await register(server, "bob")
    await server.services.ops.admin.set_role("root", "admin")
    async with connect_device(server, "bob", "phone", bob):
        assert server.services.chat.presence.devices_of("bob") == ["phone"]
        async with http_client(server, root) as http:
            assert (await http.post("/v1/admin/users/bob/disable")).status_code == 204
            viewed = (await http.get("/v1/admin/users/bob")).json()
            assert viewed["status"] == "disabled" and viewed["disabled_at"] is not None
        await until_offline(server, "bob")

    async with http_client(server, bob) as http:
        assert error_code(await http.get("/v1/sync")) == (403, "account_disabled")
    assert await connack(server, "bob", bob) == CONNACK_NOT_AUTHORIZED
    assert error_code(await login(server, "bob")) == (403, "account_disabled")
    # Only someone with the password learns that the account is disabled.
    assert error_code(await login(server, "bob", "wrong-password")) == (401, "invalid_credentials")

    async with http_client(server, root) as http:
        assert (await http.post("/v1/admin/users/bob/enable")).status_code == 204
    fresh = await login(server, "bob")
    assert fresh.status_code == 200
    assert await connack(server, "bob", fresh.json()["access_token"]) == CONNACK_ACCEPTED
    # Tokens from before the disabling stay refused.
    assert await connack(server, "bob", bob) == CONNACK_NOT_AUTHORIZED


async def test_a_password_reset_refuses_old_tokens_and_closes_connections(server: RunningServer) -> None:
    root, bob = await register(server, "root"), await register(server, "bob")
    await server.services.ops.admin.set_role("root", "admin")
    async with connect_device(server, "bob", "phone", bob):
        async with http_client(server, root) as http:
            short = await http.post("/v1/admin/users/bob/password", json={"password": "short"})
            assert error_code(short) == (422, "invalid_command")
            reset = await http.post("/v1/admin/users/bob/password", json={"password": "a-new-password"})
            assert reset.status_code == 204
        await until_offline(server, "bob")
    assert await connack(server, "bob", bob) == CONNACK_NOT_AUTHORIZED
    assert error_code(await login(server, "bob")) == (401, "invalid_credentials")
    assert (await login(server, "bob", "a-new-password")).status_code == 200


async def send(server: RunningServer, token: str, **body: Any) -> dict[str, Any]:
    async with http_client(server, token) as http:
        sent = await http.post("/v1/messages", json={"content": "secret words", **body})
        assert sent.status_code == 200, sent.text
        return dict(sent.json())


async def stored_messages(server: RunningServer) -> dict[int, str]:
    def txn(conn: Connection) -> dict[int, str]:
        return {row.id: row.content for row in conn.execute(select(messages.c.id, messages.c.content))}

    store = server.services.store
    assert isinstance(store, SqlStore)
    return await store.database.run("test", txn)


async def test_deleting_an_account(server: RunningServer) -> None:
    """carol owns a group with alice and bob, wrote to bob and to herself, and is connected."""
    root = await register(server, "root")
    await server.services.ops.admin.set_role("root", "admin")
    alice, bob, carol = [await register(server, u) for u in ("alice", "bob", "carol")]
    async with http_client(server, carol) as http:
        group = (await http.post("/v1/groups", json={"name": "crew", "members": ["alice", "bob"]})).json()
    gid = group["group_id"]
    to_bob = await send(server, carol, client_msg_id="c1", to_user="bob")
    to_group = await send(server, carol, client_msg_id="c2", group_id=gid)
    await send(server, carol, client_msg_id="c3", to_user="carol")  # a note to self
    from_bob = await send(server, bob, client_msg_id="b1", to_user="carol")
    store = server.services.store

    async with connect_device(server, "bob", "laptop", bob) as laptop, connect_device(server, "carol", "phone", carol):
        await laptop.drain()
        async with http_client(server, root) as http:
            assert (await http.delete("/v1/admin/users/carol")).status_code == 204
            assert (await http.delete("/v1/admin/users/carol")).status_code == 204  # again: nothing new
            viewed = (await http.get("/v1/admin/users/carol")).json()
            assert viewed["status"] == "deleted" and viewed["role"] == "user"
            listed = [u["user_id"] for u in (await http.get("/v1/admin/users")).json()["users"]]
            assert "carol" not in listed
            with_deleted = await http.get("/v1/admin/users", params={"include_deleted": "true"})
            assert "carol" in [u["user_id"] for u in with_deleted.json()["users"]]
        await until_offline(server, "carol")
        # The others learn that she left the group, live, once.
        left = await laptop.next("group_updated")
        assert (left["action"], left["user_id"], left["by"], left["group_id"]) == ("member_left", "carol", "carol", gid)
        assert [e for e in await laptop.drain() if e["type"] == "group_updated"] == []

    # The group passed to the member who joined first (alice and bob joined together: by id).
    info = await server.services.ops.admin.group(gid)
    assert (info.owner, info.members) == ("alice", ("alice", "bob"))
    # What she sent stays in the others' streams as a tombstone, its content gone from the database.
    history = await store.history("bob", "user:carol", None, 10)
    assert [(m.client_msg_id, m.content, m.recalled_at is not None) for m in history] == [
        ("b1", "secret words", False),
        ("c1", "", True),
    ]
    [group_message] = await store.history("alice", f"group:{gid}", None, 10)
    assert (group_message.content, group_message.recalled_at is not None) == ("", True)
    async with http_client(server, bob) as http:
        page = (await http.get("/v1/conversations/user:carol/messages")).json()["messages"]
        assert [(m["client_msg_id"], m["content"]) for m in page] == [("b1", "secret words"), ("c1", None)]
        # Nobody can write to the id, nor take it.
        gone = await http.post("/v1/messages", json={"client_msg_id": "b2", "to_user": "carol", "content": "hi"})
        assert error_code(gone) == (404, "unknown_recipient")
    async with http_client(server) as http:
        taken = await http.post("/v1/users", json={"user_id": "carol", "password": PASSWORD})
        assert error_code(taken) == (409, "user_exists")
    # Her stream, devices and note to self are gone; her tokens and password are refused.
    with pytest.raises(CursorExpired) as expired:
        await store.read_stream("carol", 0, 10)
    assert expired.value.oldest_seq == expired.value.latest_seq + 1  # nothing left of it
    assert await store.get_cursor("carol", "phone") == 0
    assert await stored_messages(server) == {
        to_bob["server_msg_id"]: "",
        to_group["server_msg_id"]: "",
        from_bob["server_msg_id"]: "secret words",
    }  # the note to self, held by no stream any more, is gone
    assert await connack(server, "carol", carol) == CONNACK_NOT_AUTHORIZED
    async with http_client(server, carol) as http:
        assert error_code(await http.get("/v1/sync")) == (401, "invalid_token")
    assert error_code(await login(server, "carol")) == (401, "invalid_credentials")
    # The others go on as before.
    assert (await send(server, alice, client_msg_id="a1", group_id=gid))["duplicate"] is False


async def test_the_command_line_manages_accounts_of_a_running_server(
    server: RunningServer, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mqchat user ...`` run beside the server (its own engine, as another process would):
    the server closes the connections of an account disabled there within seconds."""
    flags = ["--data-dir", str(settings.data_dir), "--database-url", settings.resolved_database_url()]

    async def mqchat(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, [*args, *flags])
        out, err = capsys.readouterr()
        return code, out, err

    assert await mqchat("user", "add", "ops", "--password", PASSWORD, "--admin") == (
        0,
        "created administrator ops\n",
        "",
    )
    bob = await register(server, "bob")
    code, out, _ = await mqchat("user", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["USER", "ROLE", "STATUS", "CREATED", "LAST", "SEQ"]
    assert [line.split()[:3] for line in lines[1:]] == [["bob", "user", "active"], ["ops", "admin", "active"]]

    async with connect_device(server, "bob", "phone", bob):
        assert (await mqchat("user", "disable", "bob"))[:2] == (0, "disabled bob\n")
        await until_offline(server, "bob", timeout=20)
    assert (await mqchat("user", "disable", "bob"))[1] == "bob was disabled already\n"
    assert error_code(await login(server, "bob")) == (403, "account_disabled")
    assert (await mqchat("user", "enable", "bob"))[1] == "enabled bob\n"
    assert (await mqchat("user", "passwd", "bob", "--password", "another-password"))[0] == 0
    assert (await login(server, "bob", "another-password")).status_code == 200
    assert (await mqchat("user", "admin", "bob"))[1] == "bob is now an administrator\n"
    assert (await mqchat("user", "admin", "bob", "--revoke"))[1] == "bob is no longer an administrator\n"

    code, _, err = await mqchat("user", "delete", "bob")
    assert (code, err) == (2, "mqchat: deleting bob cannot be undone: add --yes\n")
    assert (await mqchat("user", "delete", "bob", "--yes"))[:2] == (0, "deleted bob\n")
    code, _, err = await mqchat("user", "disable", "nobody")
    assert (code, err) == (1, "mqchat: no such user 'nobody'\n")

    ops = (await login(server, "ops")).json()["access_token"]
    async with http_client(server, ops) as http:
        gid = (await http.post("/v1/groups", json={"name": "night shift"})).json()["group_id"]
    code, out, _ = await mqchat("group", "list")
    assert code == 0 and out.splitlines()[1].split()[:2] == [gid, "night"]
    code, out, _ = await mqchat("group", "show", gid)
    assert code == 0 and "owner: ops" in out and "members (1): ops" in out
    assert (await mqchat("group", "show", "g0000000000000000"))[0] == 1
