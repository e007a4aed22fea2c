"""The sans-IO parts of the SDK: back-off, the stream sequencer, the local store; and the
dependency rule (the SDK imports no server framework)."""

from __future__ import annotations

import asyncio
import gc
import random
import subprocess
import sys
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest

from mqchat.clients import Backoff, StoreInUse
from mqchat.clients.client import _paho, read_disconnection
from mqchat.clients.errors import chat_error
from mqchat.clients.sequencer import StreamSequencer
from mqchat.clients.store import LocalStore
from mqchat.core.errors import ChatError, RateLimited, UnknownRecipient
from mqchat.core.protocol import NewMessage


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(7)
    plain = Backoff(jitter=0.0)
    assert [plain.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    jittered = Backoff(initial=1, maximum=30, jitter=0.2)
    for attempt, nominal in enumerate([1, 2, 4, 8, 16, 30, 30, 30]):
        delays = {jittered.delay(attempt, rng) for _ in range(50)}
        assert all(nominal * 0.8 <= d <= min(30, nominal * 1.2) for d in delays)
        assert len(delays) > 1  # spread out, not synchronized
    assert Backoff(initial=0.05, maximum=0.5, jitter=0).delay(1000) == 0.5
    with pytest.raises(ValueError):
        Backoff(initial=2, maximum=1)


def message(seq: int) -> NewMessage:
    return NewMessage(
        seq=seq, server_msg_id=seq, client_msg_id=f"c{seq}", from_user="bob", to_user="alice",
        content=f"m{seq}", msg_type="text", created_at="2026-01-01T00:00:00.000Z",
    )  # fmt: skip


def test_the_sequencer_orders_drops_duplicates_and_holds_after_a_gap() -> None:
    seq = StreamSequencer(contiguous=2)
    assert seq.offer(message(1)) == [] and seq.offer(message(2)) == []  # already processed
    assert [e.seq for e in seq.offer(message(3))] == [3]
    assert seq.offer(message(5)) == [] and seq.behind and seq.held == 1  # a hole at 4
    assert seq.offer(message(5)) == []  # a duplicate of a held event
    assert [e.seq for e in seq.offer(message(4))] == [4, 5]
    assert not seq.behind and seq.contiguous == 5
    seq.note_head(7)  # e.g. latest_seq of a sync page, or the seq of our own message_ack
    assert seq.behind
    assert [e.seq for e in seq.offer(message(7))] == [] and [e.seq for e in seq.offer(message(6))] == [6, 7]


def test_the_store_keeps_order_binds_one_user_and_locks(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = LocalStore(path)
    device = store.claim("alice", None)
    for i in range(5):
        store.enqueue(f"id-{i}", f"payload {i}".encode())
    assert store.remove("id-1") and not store.remove("id-1")
    assert [e.client_msg_id for e in store.pending()] == ["id-0", "id-2", "id-3", "id-4"]
    assert [e.client_msg_id for e in store.pending(after=store.pending()[1].position)] == ["id-3", "id-4"]
    store.save_cursor(9)
    store.save_cursor(4)  # never moves back
    with pytest.raises(StoreInUse):
        LocalStore(path)
    store.close()

    again = LocalStore(path)
    assert again.claim("alice", None) == device and again.cursor == 9 and len(again.pending()) == 4
    with pytest.raises(ValueError, match="alice"):
        again.claim("bob", None)
    again.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_error_codes_become_the_protocol_s_exceptions() -> None:
    error = chat_error("unknown_recipient", "no such user", "ref-1")
    assert isinstance(error, UnknownRecipient) and error.ref == "ref-1"
    newer = chat_error("from_the_future", "?")
    assert type(newer) is ChatError and newer.code == "from_the_future"
    limited = chat_error("rate_limited", "slow down", "ref-2", retry_after=2.5)
    assert isinstance(limited, RateLimited) and limited.retry_after == 2.5 and limited.ref == "ref-2"
    assert isinstance(guessed := chat_error("rate_limited", "slow down"), RateLimited) and guessed.retry_after == 1.0


def test_the_sdk_imports_no_server_framework() -> None:
    code = (
        "import sys, mqchat.clients, mqchat.clients.terminal\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'sqlmodel', 'amqtt', 'uvicorn', 'asyncpg', 'aiosqlite',"
        " 'httpx', 'mqchat.bridge', 'mqchat.broker', 'mqchat.api') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


async def test_the_private_accesses_of_the_sdk_still_hold() -> None:
    """``_paho`` reads aiomqtt's ``Client._client`` (noqa SLF001): an aiomqtt upgrade that
    renames it must fail here, by name, not in a fault test."""
    client = aiomqtt.Client("127.0.0.1", 1)
    assert isinstance(_paho(client), paho.Client), "aiomqtt.Client._client is no longer the paho client"
    assert _paho(client).socket() is None  # public on paho; None before connecting
    read_disconnection(client)  # reads aiomqtt's ``Client._disconnected``; not done yet: nothing to read


async def test_a_connection_the_server_ended_leaves_no_unread_error_behind() -> None:
    """aiomqtt keeps an unexpected disconnection's error in a future that only its message
    iterator reads; a client that was not iterating when the server closed the connection
    leaves it unread, and asyncio reports it (stderr) whenever the client is collected.
    ``read_disconnection``, which the SDK calls on every connection it leaves, settles it."""
    reported: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(b"\x20\x02\x00\x00")  # CONNACK: accepted
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # then the server ends the connection

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    try:
        client = aiomqtt.Client("127.0.0.1", server.sockets[0].getsockname()[1])
        async with client:
            await asyncio.sleep(0.3)  # nothing reads messages meanwhile
        read_disconnection(client)
        del client
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        server.close()
        await server.wait_closed()
    assert reported == []
