"""The outbox survives a crash of the client process: a new client on the same SQLite file
resends with the same client_msg_id, and the recipient gets the message exactly once."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mqchat.clients import StoreInUse
from mqchat.clients.store import LocalStore
from mqchat.core.protocol import NewMessage
from tests.clients.support import client_for, event_log, quiet, started, until
from tests.support.ports import free_port
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

# A client that queues one send while its server is unreachable, says so, and waits to be killed.
CRASHING_CLIENT = """
import asyncio, sys
from mqchat.clients import ChatClient

async def main() -> None:
    store, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    client = ChatClient("alice", token=token, mqtt_port=port, http_port=port, store_path=store, device_id="phone")
    await client.start()
    asyncio.ensure_future(client.send(to_user="bob", content="written before the crash"))
    await asyncio.sleep(0)  # the send has its outbox entry now
    print(client.outbox()[0].client_msg_id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@asynccontextmanager
async def crashed_client(store: Path, token: str) -> AsyncIterator[str]:
    """Run the client until it has queued its send, then SIGKILL it; yields the client_msg_id."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_CLIENT, str(store), str(free_port()), token,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        client_msg_id = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert client_msg_id, "the client did not start"
        with pytest.raises(StoreInUse):  # one process per file while it lives
            LocalStore(store)
    finally:
        proc.kill()
        await proc.wait()
    yield client_msg_id


async def test_a_send_queued_before_a_crash_is_delivered_once(server_process: ServerProcess, tmp_path: Path) -> None:
    server = server_process
    alice_token, bob_token = await server.register("alice"), await server.register("bob")
    store = tmp_path / "alice-phone.sqlite3"
    async with crashed_client(store, alice_token) as client_msg_id:
        alice = client_for(server, "alice", alice_token, tmp_path, device_id="phone")
        bob = client_for(server, "bob", bob_token, tmp_path)
        async with started(alice, bob), event_log(bob) as bob_events:
            got = await bob_events.next(NewMessage)
            assert (got.client_msg_id, got.content) == (client_msg_id, "written before the crash")
            await until(lambda: not alice.outbox())  # acked: the entry is gone
            await asyncio.sleep(0.5)
            assert bob_events.queue.empty() or not any(
                isinstance(e, NewMessage) for e in bob_events.queue._queue
            )  # fmt: skip
        async with server.http(bob_token) as http:
            page = (await http.get("/v1/conversations/user:alice/messages")).json()
        assert [m["client_msg_id"] for m in page["messages"]] == [client_msg_id]


async def test_a_message_stored_whose_ack_was_lost_is_not_stored_twice(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    server = server_process
    alice_token, bob_token = await server.register("alice"), await server.register("bob")
    store = tmp_path / "alice-phone.sqlite3"
    async with crashed_client(store, alice_token) as client_msg_id:
        # The server stored the message but the client died before the ack reached it.
        async with server.http(alice_token) as http:
            body = {"client_msg_id": client_msg_id, "to_user": "bob", "content": "written before the crash"}
            stored = (await http.post("/v1/messages", json=body)).json()
        bob = client_for(server, "bob", bob_token, tmp_path)
        async with started(bob):
            events = bob.events()
            first = await anext(events)
            assert isinstance(first, NewMessage) and first.client_msg_id == client_msg_id

            alice = client_for(server, "alice", alice_token, tmp_path, device_id="phone")
            async with started(alice):
                await until(lambda: not alice.outbox())  # the resend was answered (as a duplicate)
            assert [e for e in await quiet(events, 1.0) if isinstance(e, NewMessage)] == []
    async with server.http(bob_token) as http:
        page = (await http.get("/v1/conversations/user:alice/messages")).json()
    assert [m["server_msg_id"] for m in page["messages"]] == [stored["server_msg_id"]]
