"""The SDK's guarantees under faults: the server killed between send and ack, the network
dropped during a burst. Real server processes (``mqchat serve``) killed with SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from mqchat.core.protocol import MessageAck
from tests.clients.support import client_for, event_log, make_client, started, until
from tests.support.accounts import PASSWORD, http_client
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]


async def history(server: ServerProcess, token: str, conversation_id: str) -> list[dict[str, object]]:
    async with http_client(server, token) as http:
        page = await http.get(f"/v1/conversations/{conversation_id}/messages", params={"limit": 200})
        return list(page.json()["messages"])


async def test_server_killed_between_send_and_ack(server_process: ServerProcess, tmp_path: Path) -> None:
    alice_token, bob_token = await server_process.register("alice"), await server_process.register("bob")
    alice = client_for(server_process, "alice", alice_token, tmp_path)
    bob = client_for(server_process, "bob", bob_token, tmp_path)
    async with started(alice, bob), event_log(bob) as bob_events:
        # Freeze the server, so that the send reaches its socket but gets no answer, then kill it.
        server_process.signal(signal.SIGSTOP)
        sending = asyncio.create_task(alice.send(to_user="bob", content="through a crash"))
        await asyncio.sleep(0.5)
        assert not sending.done() and len(alice.outbox()) == 1
        await server_process.kill()
        await server_process.start()  # same data, same ports

        ack = await asyncio.wait_for(sending, 30)
        assert alice.outbox() == [] and alice.connections >= 2
        [got] = await bob_events.messages(1)
        assert (got.client_msg_id, got.server_msg_id, got.content) == (
            ack.client_msg_id, ack.server_msg_id, "through a crash",
        )  # fmt: skip
        await asyncio.sleep(1)
        assert [e for e in bob_events.queue._queue if getattr(e, "content", None)] == []  # nothing twice
    assert [m["client_msg_id"] for m in await history(server_process, bob_token, "user:alice")] == [ack.client_msg_id]


async def test_server_killed_during_a_burst(server_process: ServerProcess, tmp_path: Path) -> None:
    """Killed right after the first ack: some sends are stored and acked, some stored but
    their acks lost (resent, answered ``duplicate``), some never reached the database."""
    alice_token, bob_token = await server_process.register("alice"), await server_process.register("bob")
    alice = client_for(server_process, "alice", alice_token, tmp_path)
    bob = client_for(server_process, "bob", bob_token, tmp_path)
    count = 60
    async with started(alice, bob), event_log(bob) as bob_events:
        sends = [asyncio.create_task(alice.send(to_user="bob", content=f"burst {i:03}")) for i in range(count)]
        await asyncio.wait(sends, return_when=asyncio.FIRST_COMPLETED, timeout=20)
        await server_process.kill()
        unanswered = sum(not task.done() for task in sends)
        await server_process.start()

        acks: list[MessageAck] = await asyncio.wait_for(asyncio.gather(*sends), 40)
        got = await bob_events.messages(count)
        assert [m.content for m in got] == [f"burst {i:03}" for i in range(count)]
        assert [m.server_msg_id for m in got] == [a.server_msg_id for a in acks]
        assert len({m.client_msg_id for m in got}) == count
        await asyncio.sleep(1)
        assert bob_events.queue.empty() or all(not hasattr(e, "content") for e in bob_events.queue._queue)
    assert unanswered > 0, "the kill came too late to test anything"
    stored = await history(server_process, bob_token, "user:alice")
    assert [m["content"] for m in reversed(stored)] == [f"burst {i:03}" for i in range(count)]


async def test_network_drop_during_a_burst_of_200(server_process: ServerProcess, tmp_path: Path) -> None:
    """The client's socket is shut down under it, twice, while 200 sends are in flight.

    (A server process, not the in-process one: amqtt 0.12.1 leaks the server side of a
    connection reset by its peer, and the leak would surface as a ResourceWarning here.)"""
    alice_token, bob_token = await server_process.register("alice"), await server_process.register("bob")
    alice = client_for(server_process, "alice", alice_token, tmp_path)
    bob = client_for(server_process, "bob", bob_token, tmp_path)
    count = 200
    async with started(alice, bob), event_log(bob) as bob_events:
        sends = [asyncio.create_task(alice.send(to_user="bob", content=f"m{i:03}")) for i in range(count)]
        drops = 0
        for number in (1, 2):
            # Each drop cuts a connection of its own: the next waits for the client's reconnection,
            # and for a few more acks on it, or a fast server would see both cut the same socket.
            done_before = sum(task.done() for task in sends)
            await until(
                lambda c=number, n=done_before: (
                    alice.connections >= c and alice.connected and sum(task.done() for task in sends) >= n + 30
                ),
                30,
                0.002,
            )
            assert sum(task.done() for task in sends) < count, "the burst was over before the drop"
            drops += alice.drop_connection()
        acks = await asyncio.wait_for(asyncio.gather(*sends), 45)
        # The last acks may arrive before the client notices the second drop: it reconnects after.
        await until(lambda: alice.connections >= 3, 10)
        assert drops == 2

        got = await bob_events.messages(count)
        assert [m.content for m in got] == [f"m{i:03}" for i in range(count)]
        assert [m.server_msg_id for m in got] == [a.server_msg_id for a in acks]
        assert [m.seq for m in got] == list(range(got[0].seq, got[0].seq + count))
        await asyncio.sleep(1)
        assert all(not hasattr(e, "content") for e in bob_events.queue._queue)  # nothing twice
        assert alice.outbox() == []
    stored = await history(server_process, bob_token, "user:alice")
    assert [m["content"] for m in reversed(stored)] == [f"m{i:03}" for i in range(count)]


async def test_rate_limited_sends_are_retried(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that allows bursts of 10 sends per device: the rest of a burst of 40 is
    refused with ``rate_limited`` and ``retry_after``; the client waits and sends them again."""
    limited = ServerProcess(
        tmp_path / "server",
        database_url,
        {"MQCHAT_LIMITS__SEND_BURST": "10", "MQCHAT_LIMITS__SEND_RATE_PER_SECOND": "20"},
    )
    await limited.start()
    try:
        alice_token, bob_token = await limited.register("alice"), await limited.register("bob")
        alice = client_for(limited, "alice", alice_token, tmp_path)
        bob = client_for(limited, "bob", bob_token, tmp_path)
        count = 40
        with caplog.at_level(logging.INFO, logger="mqchat.clients"):
            async with started(alice, bob), event_log(bob) as bob_events:
                sends = [asyncio.create_task(alice.send(to_user="bob", content=f"r{i:02}")) for i in range(count)]
                acks = await asyncio.wait_for(asyncio.gather(*sends), 40)
                got = await bob_events.messages(count)
        assert sorted(m.content for m in got) == [f"r{i:02}" for i in range(count)]  # all, once
        assert {m.server_msg_id for m in got} == {a.server_msg_id for a in acks}
        assert any("rate_limited" in record.getMessage() for record in caplog.records)
    finally:
        await limited.kill()


async def test_too_many_connections_is_waited_out_not_fatal(tmp_path: Path, database_url: str) -> None:
    """The broker refuses a user's connection beyond the limit with CONNACK 0x05, the same code
    as a bad token; the client checks its token and keeps trying until a slot is free."""
    limited = ServerProcess(tmp_path / "server", database_url, {"MQCHAT_LIMITS__MAX_CONNECTIONS_PER_USER": "1"})
    await limited.start()
    try:
        token = await limited.register("alice")
        phone = make_client("alice", tmp_path / "phone.db", password=PASSWORD, device_id="phone",
                            mqtt_port=limited.mqtt_port, http_port=limited.http_port)  # fmt: skip
        laptop = make_client("alice", tmp_path / "laptop.db", token=token, device_id="laptop",
                             mqtt_port=limited.mqtt_port, http_port=limited.http_port)  # fmt: skip
        async with started(phone), laptop:
            await asyncio.sleep(1.5)
            assert not laptop.connected  # refused, and still trying
            await phone.close()  # frees the slot
            async with asyncio.timeout(15):
                await laptop.wait_connected()
    finally:
        await limited.kill()
