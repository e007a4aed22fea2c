"""The asyncio SDK against a real in-process server (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.clients import ChatClient, ClientClosed, LoginFailed, SyncChatClient
from mqchat.core.errors import InvalidCommand, UnknownRecipient, UnsupportedFileType
from mqchat.core.protocol import MessageAck, MessageDelivered, MessageRead, MessageRecalled, NewMessage, ReadMarker
from mqchat.runner import RunningServer
from tests.clients.support import FAST, client_for, event_log, make_client, messages, next_of, quiet, started, until
from tests.support.accounts import PASSWORD, register
from tests.support.devices import connect_device

pytestmark = pytest.mark.timeout(60)


async def test_send_returns_the_ack_and_the_peer_gets_the_message(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    alice = client_for(server, "alice", alice_token, tmp_path)
    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(alice, bob):
        ack = await asyncio.wait_for(alice.send(to_user="bob", content="Hello Bob!"), 15)
        assert ack.duplicate is False and ack.seq == 1 and ack.server_msg_id > 0
        assert alice.outbox() == []
        [incoming] = await messages(bob.events(), 1)
        assert (incoming.from_user, incoming.content, incoming.server_msg_id) == (
            "alice",
            "Hello Bob!",
            ack.server_msg_id,
        )
        assert incoming.client_msg_id == ack.client_msg_id
        # The sender's own stream has the message too, at the seq of the ack.
        [own] = await messages(alice.events(), 1)
        assert own.seq == ack.seq and own.server_msg_id == ack.server_msg_id


async def test_a_refused_send_raises_the_typed_error_and_leaves_the_outbox(
    server: RunningServer, tmp_path: Path
) -> None:
    alice = client_for(server, "alice", await register(server, "alice"), tmp_path)
    async with started(alice):
        with pytest.raises(UnknownRecipient) as refused:
            await asyncio.wait_for(alice.send(to_user="nobody", content="hello?"), 15)
        assert refused.value.code == "unknown_recipient" and refused.value.ref is not None
        assert alice.outbox() == []
        with pytest.raises(InvalidCommand):  # checked locally: never reaches the outbox
            await alice.send(to_user="bad/name", content="x")
        assert alice.outbox() == []


async def test_events_come_in_order_exactly_once_even_across_restarts(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(bob):
        for i in range(20):
            await asyncio.wait_for(bob.send(to_user="alice", content=f"m{i}"), 15)

    alice = client_for(server, "alice", alice_token, tmp_path, device_id="phone")
    async with started(alice):
        events = alice.events()
        first = await messages(events, 8)
    assert [m.content for m in first] == [f"m{i}" for i in range(8)]
    assert [m.seq for m in first] == list(range(1, 9))
    assert alice.cursor == 8  # closing committed the last event taken

    # The server got the ack too (it stores it in the background): a catch-up for this
    # device soon starts after seq 8.
    async with asyncio.timeout(10):
        while True:
            async with connect_device(server, "alice", "phone", alice_token) as raw:
                page = await raw.next("sync_response")
            if [e["seq"] for e in page["events"]][:1] == [9]:
                break
            await asyncio.sleep(0.1)

    again = client_for(server, "alice", alice_token, tmp_path, device_id="phone")
    async with started(again):
        events = again.events()
        rest = await messages(events, 12)
        assert [m.content for m in rest] == [f"m{i}" for i in range(8, 20)]
        assert [m.seq for m in rest] == list(range(9, 21))
        assert await quiet(events) == []  # nothing twice


async def test_a_gap_in_seq_triggers_a_sync(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(bob):
        for i in range(5):
            await asyncio.wait_for(bob.send(to_user="alice", content=f"m{i}"), 15)
    # The server's cursor for alice:tablet runs ahead of the (fresh) local one, as if the live
    # deliveries of seq 1-3 had been lost: its catch-up starts at seq 4, a hole the client
    # must notice and fill with sync_messages.
    async with connect_device(server, "alice", "tablet", alice_token, subscribe=False) as raw:
        await raw.publish({"type": "ack", "seq": 3})
        async with asyncio.timeout(10):
            while True:  # the ack is stored in the background; every SUBSCRIBE runs a catch-up
                await raw.client.subscribe("chat/device/alice/tablet", qos=1)
                page = await raw.next("sync_response")
                if [e["seq"] for e in page["events"]] == [4, 5]:
                    break
                await asyncio.sleep(0.1)

    alice = client_for(server, "alice", alice_token, tmp_path, device_id="tablet")
    async with started(alice):
        events = alice.events()
        got = await messages(events, 5)
        assert [m.seq for m in got] == [1, 2, 3, 4, 5]
        assert [m.content for m in got] == [f"m{i}" for i in range(5)]
        assert await quiet(events) == []


async def test_receipts_read_markers_recall_and_typing(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    alice = client_for(server, "alice", alice_token, tmp_path)
    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(alice, bob), event_log(alice) as alice_events, event_log(bob) as bob_events:
        ack = await asyncio.wait_for(alice.send(to_user="bob", content="read me"), 15)
        [incoming] = await bob_events.messages(1)
        # bob's client acks what bob's application took: alice learns it was delivered.
        delivered = await alice_events.next(MessageDelivered)
        assert (delivered.message_id, delivered.delivered_to) == (ack.server_msg_id, "bob")

        await bob.mark_read(incoming.server_msg_id)
        read = await alice_events.next(MessageRead)
        assert (read.message_id, read.read_by, read.conversation_id) == (ack.server_msg_id, "bob", "user:bob")
        marker = await bob_events.next(ReadMarker)
        assert (marker.message_id, marker.conversation_id) == (ack.server_msg_id, "user:alice")

        assert await alice.typing(to_user="bob", state="started")
        typing = await asyncio.wait_for(anext(bob.typing_events()), 10)
        assert (typing.from_user, typing.state) == ("alice", "started")

        await alice.recall(ack.server_msg_id)
        recalled = await bob_events.next(MessageRecalled)
        assert (recalled.message_id, recalled.recalled_by) == (ack.server_msg_id, "alice")

        conversations = await bob.conversations()
        assert [(c.conversation_id, c.unread_count) for c in conversations] == [("user:alice", 0)]
        history = await bob.history("user:alice")
        assert [(m.server_msg_id, m.content) for m in history] == [(ack.server_msg_id, None)]  # a tombstone


async def test_group_messages(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    alice = client_for(server, "alice", alice_token, tmp_path)
    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(alice, bob):
        created = await alice.http.request(
            "POST", "/v1/groups", body={"name": "Team", "members": ["bob"]}, token=alice_token
        )
        group_id = created["group_id"]
        await bob.watch_group_typing(group_id)
        ack = await asyncio.wait_for(alice.send_to_group(group_id, "hello team"), 15)
        got = await next_of(bob.events(), NewMessage)
        assert (got.group_id, got.content, got.server_msg_id) == (group_id, "hello team", ack.server_msg_id)
        assert await alice.typing(group_id=group_id, state="started")
        typing = await asyncio.wait_for(anext(bob.typing_events()), 10)
        assert (typing.group_id, typing.from_user) == (group_id, "alice")


async def test_login_with_a_password_and_a_refused_one(server: RunningServer, tmp_path: Path) -> None:
    await register(server, "alice")
    good = make_client(
        "alice", tmp_path / "a.db", password=PASSWORD, mqtt_port=server.mqtt_port, http_port=server.http_port
    )
    async with started(good):
        assert good.token and good.connected
    bad = make_client(
        "alice", tmp_path / "b.db", password="wrong-password", mqtt_port=server.mqtt_port, http_port=server.http_port
    )
    async with bad:
        with pytest.raises(LoginFailed):
            async with asyncio.timeout(15):
                await bad.wait_connected()
        with pytest.raises(LoginFailed):
            await bad.send(to_user="alice", content="x")
    # CONNACK 0x05 alone is ambiguous (it also means "too many connections"): the client asks
    # the HTTP API about the token, which refuses it too, and gives up.
    forged = make_client(
        "alice", tmp_path / "c.db", token="not-a-token", mqtt_port=server.mqtt_port, http_port=server.http_port
    )
    async with forged:
        with pytest.raises(LoginFailed):
            async with asyncio.timeout(15):
                await forged.wait_connected()
    with pytest.raises(ClientClosed):
        await forged.send(to_user="alice", content="x")


async def test_over_websocket(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    alice = ChatClient(
        "alice",
        token=alice_token,
        host="127.0.0.1",
        mqtt_port=server.ws_port,
        http_port=server.http_port,  # for the event key: a token alone does not carry it
        transport="websockets",
        store_path=tmp_path / "alice.db",
    )
    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(alice, bob):
        ack = await asyncio.wait_for(alice.send(to_user="bob", content="over ws"), 15)
        [got] = await messages(bob.events(), 1)
        assert got.server_msg_id == ack.server_msg_id
        await bob.send(to_user="alice", content="back over tcp")
        replies = await messages(alice.events(), 2)  # its own message, then bob's
        assert [m.content for m in replies] == ["over ws", "back over tcp"]
        assert alice.drop_connection()  # the WebSocket transport reconnects too
        await until(lambda: alice.connections >= 2 and alice.connected)
        assert (await asyncio.wait_for(alice.send(to_user="bob", content="again"), 15)).duplicate is False


async def test_the_synchronous_client(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")

    def alice_in_blocking_code() -> tuple[MessageAck, str | None]:
        options = {"token": alice_token, "mqtt_port": server.mqtt_port, "http_port": server.http_port}
        with SyncChatClient("alice", store_path=tmp_path / "alice-sync.db", backoff=FAST, **options) as alice:
            alice.wait_connected(15)
            ack = alice.send("bob", "from blocking code", timeout=15)
            for event in alice.iter_events(timeout=15):
                if isinstance(event, NewMessage) and event.from_user == "bob":
                    return ack, event.content
        raise AssertionError("no answer from bob")

    bob = client_for(server, "bob", bob_token, tmp_path)
    async with started(bob):
        alice_done = asyncio.create_task(asyncio.to_thread(alice_in_blocking_code))
        [got] = await messages(bob.events(), 1)
        assert got.content == "from blocking code"
        await bob.send(to_user="alice", content="answered")
        ack, answer = await asyncio.wait_for(alice_done, 30)
    assert ack.server_msg_id == got.server_msg_id and answer == "answered"


@contextlib.asynccontextmanager
async def tls_proxy(target_port: int, cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS-terminating proxy in front of the broker's plain MQTT port (as in production)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writers.extend((client_writer, broker_writer))
        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield int(proxy.sockets[0].getsockname()[1])
    finally:
        proxy.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        await proxy.wait_closed()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_over_tls(server: RunningServer, tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    async with tls_proxy(server.mqtt_port, cert, key) as port:
        trusted = ssl.create_default_context(cafile=str(cert))
        # The proxy covers MQTT only: the event key comes from the plain HTTP port.
        api = f"http://127.0.0.1:{server.http_port}"
        alice = make_client(
            "alice", tmp_path / "alice.db", token=alice_token, mqtt_port=port, http_url=api, tls=trusted
        )
        bob = client_for(server, "bob", bob_token, tmp_path)
        async with started(alice, bob):
            ack = await asyncio.wait_for(alice.send(to_user="bob", content="over TLS"), 15)
            [got] = await messages(bob.events(), 1)
            assert got.server_msg_id == ack.server_msg_id


async def test_a_file_is_sent_with_attachment_and_saved_by_the_peer(server: RunningServer, tmp_path: Path) -> None:
    alice_token, bob_token = await register(server, "alice"), await register(server, "bob")
    alice = client_for(server, "alice", alice_token, tmp_path)
    bob = client_for(server, "bob", bob_token, tmp_path)
    note = tmp_path / "notes.txt"
    note.write_text("bring the tent\n")
    refused = tmp_path / "page.html"
    refused.write_bytes(b"\x00\x01 binary")
    async with started(alice, bob):
        ack = await asyncio.wait_for(alice.send("bob", "the list", attachment=note), 15)
        [incoming] = await messages(bob.events(), 1)
        assert incoming.server_msg_id == ack.server_msg_id and incoming.msg_type == "file"
        assert incoming.attachment is not None and incoming.attachment.name == "notes.txt"
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        first = await bob.save_attachment(incoming.attachment, downloads)
        second = await bob.save_attachment(incoming.attachment, downloads)
        assert first == downloads / "notes.txt" and second == downloads / "notes (1).txt"
        assert first.read_text() == second.read_text() == "bring the tent\n"
        assert sorted(p.name for p in downloads.iterdir()) == ["notes (1).txt", "notes.txt"]  # no .part left
        [page] = await bob.history("user:alice")
        assert page.attachment == incoming.attachment
        with pytest.raises(UnsupportedFileType):
            await alice.send("bob", attachment=refused)
        assert alice.outbox() == []  # a refused upload never reaches the outbox
