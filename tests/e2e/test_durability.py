"""The kill -9 guarantee: once ``message_ack`` is sent, the message survives a crash of the server.

``mqchat serve`` runs as a real subprocess. Alice sends a burst over MQTT; the server is
SIGKILLed while acks are still arriving, restarted on the same data dir (and database), and
both streams are read back over HTTP. Then Alice resends every message of the burst, acked
or not, and each must end up stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.support.accounts import http_client, register
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

BURST = 300
KILL_AFTER_ACKS = 150
TEST_BUDGET = 60  # seconds, for the whole scenario


def _server(data_dir: Path, database_url: str | None, log_path: Path) -> ServerProcess:
    """Started by ``async with``, SIGKILLed at its end. As a user runs it: none of this
    process's MQCHAT_* settings, quiet logs."""
    return ServerProcess(data_dir, database_url, clean_env=True, args=["--log-level", "WARNING"], log_path=log_path)


async def _read_stream(server: ServerProcess, token: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The whole stream over ``GET /v1/sync``, paged; returns the events and the last ``latest_seq``."""
    events: list[dict[str, Any]] = []
    since = 0
    latest = -1
    async with http_client(server, token) as http:
        for _ in range(100):
            response = await http.get("/v1/sync", params={"since_seq": since, "limit": limit})
            assert response.status_code == 200, response.text
            page = response.json()
            assert page["type"] == "sync_response"
            assert len(page["events"]) <= limit
            events.extend(page["events"])
            latest = page["latest_seq"]
            if not page["has_more"]:
                return events, latest
            assert page["events"], "has_more with an empty page"
            since = page["events"][-1]["seq"]
    pytest.fail("sync never reported has_more=false")


def _assert_gapless(events: list[dict[str, Any]], latest_seq: int, who: str) -> dict[str, dict[str, Any]]:
    """Seqs are exactly 1..N, each client_msg_id once; returns the events by client_msg_id."""
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(1, len(events) + 1)), f"{who}: seqs not 1..N: {seqs}"
    assert latest_seq == len(events), f"{who}: latest_seq {latest_seq} but {len(events)} events"
    by_id = {event["client_msg_id"]: event for event in events}
    assert len(by_id) == len(events), f"{who}: a client_msg_id appears twice in the stream"
    return by_id


def _cid(index: int) -> str:
    return f"crash-{index:04d}"


def _index(cid: str) -> int:
    return int(cid.removeprefix("crash-"))


@dataclass
class Sender:
    """Alice's device: publishes sends at full speed and records every ``message_ack``."""

    client: aiomqtt.Client
    inbox: str
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    other: list[dict[str, Any]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    threshold: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    duplicate_acks: list[str] = field(default_factory=list)

    async def pump(self) -> None:
        try:
            async for message in self.client.messages:
                event = json.loads(bytes(message.payload))
                if event["type"] == "sync_response":
                    self.ready.set()
                elif event["type"] == "message_ack":
                    if event["client_msg_id"] in self.acks:
                        self.duplicate_acks.append(event["client_msg_id"])
                    self.acks.setdefault(event["client_msg_id"], event)
                    if self.threshold and len(self.acks) >= self.threshold:
                        self.reached.set()
                else:
                    self.other.append(event)
        except aiomqtt.MqttError:
            pass  # the server went away (the SIGKILL)
        finally:
            self.disconnected.set()

    async def send(self, index: int) -> None:
        payload = {
            "type": "send_message",
            "client_msg_id": _cid(index),
            "to_user": "bob",
            "content": f"message #{index}",
        }
        # A send cut off by the kill fails here; whether it was stored is what the test checks.
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await self.client.publish(self.inbox, json.dumps(payload), qos=1, timeout=20)


@contextlib.asynccontextmanager
async def _alice(server: ServerProcess, token: str, threshold: int = 0) -> AsyncIterator[Sender]:
    client = aiomqtt.Client(
        "127.0.0.1",
        server.mqtt_port,
        identifier="alice:phone",
        username="alice",
        password=token,
        keepalive=30,
        timeout=10,
    )
    async with client:
        sender = Sender(client, "chat/in/alice/phone", threshold=threshold)
        pump = asyncio.create_task(sender.pump())
        try:
            await client.subscribe("chat/device/alice/phone", qos=1)
            async with asyncio.timeout(10):
                await sender.ready.wait()  # the (empty) catch-up page: acks will reach us
            yield sender
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def _burst(sender: Sender, count: int) -> list[asyncio.Task[None]]:
    # Tasks are started in order, so the publishes leave in index order.
    tasks = [asyncio.create_task(sender.send(i)) for i in range(count)]
    await asyncio.sleep(0)
    return tasks


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def db_url_arg(database_url: str) -> str | None:
    # SQLite: let the server use its default file inside --data-dir, which is what "the same data
    # dir" means. PostgreSQL: the fresh database the conftest fixture made for this test.
    return None if database_url.startswith("sqlite") else database_url


async def test_acked_messages_survive_kill_9(tmp_path: Path, db_url_arg: str | None) -> None:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    async with asyncio.timeout(TEST_BUDGET):
        # ---- 1. a burst of sends, SIGKILL while acks are still arriving
        async with _server(data_dir, db_url_arg, log_path) as first:
            alice_token = await register(first, "alice")
            bob_token = await register(first, "bob")
            async with _alice(first, alice_token, threshold=KILL_AFTER_ACKS) as alice:
                tasks = await _burst(alice, BURST)
                try:
                    async with asyncio.timeout(20):
                        await alice.reached.wait()
                    await first.kill()
                    async with asyncio.timeout(10):
                        await alice.disconnected.wait()
                finally:
                    await _cancel(tasks)
                acked = dict(alice.acks)
                assert not alice.duplicate_acks
                assert not alice.other, alice.other
        assert first.proc is not None and first.proc.returncode == -signal.SIGKILL
        assert KILL_AFTER_ACKS <= len(acked) <= BURST
        assert all(ack["duplicate"] is False and ack["status"] == "sent" for ack in acked.values())
        # One device publishing in order: message i is stored i-th, at seq i + 1 of alice's stream.
        assert all(ack["seq"] == _index(cid) + 1 for cid, ack in acked.items())

        # ---- 2. restart on the same data: every acked message is there, exactly once
        async with _server(data_dir, db_url_arg, log_path) as second:
            # The signing secret lives in the data dir: tokens issued before the crash still work.
            bob_events, bob_latest = await _read_stream(second, bob_token, limit=500)
            alice_events, alice_latest = await _read_stream(second, alice_token, limit=500)
            bob_by_id = _assert_gapless(bob_events, bob_latest, "bob")
            alice_by_id = _assert_gapless(alice_events, alice_latest, "alice")
            stored = len(bob_events)
            assert len(acked) <= stored <= BURST
            # What was stored is a prefix of the burst (commit order), the same on both sides.
            assert [e["client_msg_id"] for e in bob_events] == [_cid(i) for i in range(stored)]
            assert [e["client_msg_id"] for e in alice_events] == [_cid(i) for i in range(stored)]
            for cid, ack in acked.items():
                for event in (bob_by_id[cid], alice_by_id[cid]):
                    assert event["server_msg_id"] == ack["server_msg_id"]
                    assert event["created_at"] == ack["created_at"]
                    assert (event["from_user"], event["to_user"]) == ("alice", "bob")
                    assert event["content"] == f"message #{_index(cid)}"
                assert alice_by_id[cid]["seq"] == ack["seq"]
            assert len({e["server_msg_id"] for e in bob_events}) == stored

            # ---- 3. Alice resends the whole burst, acked or not
            async with _alice(second, alice_token, threshold=BURST) as alice:
                tasks = await _burst(alice, BURST)
                try:
                    async with asyncio.timeout(30):
                        await alice.reached.wait()
                finally:
                    await _cancel(tasks)
                resent = dict(alice.acks)
                assert not alice.duplicate_acks
                assert not alice.other, alice.other
            assert sorted(resent) == [_cid(i) for i in range(BURST)]
            for cid, ack in resent.items():
                if cid in alice_by_id:  # stored before the crash, acked or not: the original ids
                    before = alice_by_id[cid]
                    assert ack["duplicate"] is True, cid
                    assert (ack["server_msg_id"], ack["seq"], ack["created_at"]) == (
                        before["server_msg_id"],
                        before["seq"],
                        before["created_at"],
                    ), cid
                else:
                    assert ack["duplicate"] is False, cid
            for cid, ack in acked.items():
                assert (resent[cid]["server_msg_id"], resent[cid]["seq"]) == (ack["server_msg_id"], ack["seq"])

            bob_final, bob_latest = await _read_stream(second, bob_token, limit=100)
            alice_final, alice_latest = await _read_stream(second, alice_token, limit=100)
            bob_final_by_id = _assert_gapless(bob_final, bob_latest, "bob")
            alice_final_by_id = _assert_gapless(alice_final, alice_latest, "alice")
            assert [e["client_msg_id"] for e in bob_final] == [_cid(i) for i in range(BURST)]
            assert [e["client_msg_id"] for e in alice_final] == [_cid(i) for i in range(BURST)]
            assert bob_final[:stored] == bob_events  # the pre-crash part of the stream did not change
            for cid, ack in resent.items():
                assert bob_final_by_id[cid]["server_msg_id"] == ack["server_msg_id"]
                assert alice_final_by_id[cid]["server_msg_id"] == ack["server_msg_id"]
                assert alice_final_by_id[cid]["seq"] == ack["seq"]
            assert len({e["server_msg_id"] for e in bob_final}) == BURST
        assert second.proc is not None and second.proc.returncode is not None
