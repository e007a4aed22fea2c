"""Forged stream events against a real server: the SDK keeps only the server's (issue 10).

The broker's ACL keeps other clients off a user's stream topic, so the forgeries are handed to
the client's input (``ChatClient.feed``, what its MQTT reader calls for every delivery), as a
Last Will that slipped past the ACL once delivered them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mqchat.clients import HttpApi
from mqchat.core.errors import NotAuthorized
from mqchat.core.origin import event_key, sign
from mqchat.core.protocol import MessageDelivered, NewMessage, encode_event
from mqchat.runner import RunningServer
from tests.clients.support import client_for, event_log, quiet, started, until
from tests.support.accounts import PASSWORD, register

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"  # signatures do not depend on the store


def forged(seq: int, content: str) -> bytes:
    return encode_event(
        NewMessage(
            seq=seq, server_msg_id=9000 + seq, client_msg_id=f"forged-{seq}", from_user="carol", to_user="bob",
            content=content, msg_type="text", created_at="2026-01-01T00:00:00.000Z",
        )
    )  # fmt: skip


async def test_the_event_key_comes_with_the_login_and_from_the_token(server: RunningServer) -> None:
    token = await register(server, "bob")
    api = HttpApi(f"http://127.0.0.1:{server.http_port}")
    session = await api.session("bob", PASSWORD, device_id="phone")
    assert session.event_key is not None and len(session.event_key) == 32
    assert await api.event_key(token) == session.event_key == await api.event_key(session.token)
    with pytest.raises(NotAuthorized):
        await api.event_key("not-a-token")


async def test_forged_events_do_not_displace_the_real_ones(server: RunningServer, tmp_path: Path) -> None:
    bob_token, carol_token = await register(server, "bob"), await register(server, "carol")
    bob = client_for(server, "bob", bob_token, tmp_path)
    carol = client_for(server, "carol", carol_token, tmp_path)
    carols_key = await carol.http.event_key(carol_token)
    async with started(bob, carol), event_log(bob) as bob_events, event_log(carol) as carol_events:
        # What a Last Will on chat/user/bob once delivered: carol's messages at seqs 1-3, before
        # the real ones. Unsigned, and signed with the only key carol has (her own).
        for seq in (1, 2, 3):
            bob.feed("chat/user/bob", forged(seq, f"forged {seq}"))
            bob.feed("chat/user/bob", sign(carols_key, forged(seq, f"forged and signed {seq}")))
        assert bob.rejected_events == {"stream: unsigned": 3, "stream: bad signature": 3}
        assert bob.cursor == 0 and bob_events.queue.empty()

        acks = [await asyncio.wait_for(carol.send(to_user="bob", content=f"real {n}"), 15) for n in (1, 2, 3)]
        got = await bob_events.messages(3)
        assert [(m.seq, m.content, m.server_msg_id) for m in got] == [
            (n, f"real {n}", ack.server_msg_id) for n, ack in zip((1, 2, 3), acks, strict=True)
        ]
        assert [e for e in await quiet_queue(bob_events.queue) if isinstance(e, NewMessage)] == []  # once each
        # bob's client acked all three: carol gets the delivered receipt of the last one.
        delivered = await carol_events.next(MessageDelivered)
        while delivered.message_id < acks[-1].server_msg_id:
            delivered = await carol_events.next(MessageDelivered)
        assert delivered.delivered_to == "bob"
        await until(lambda: bob.cursor == 3)


async def test_two_signed_versions_of_a_seq_are_settled_by_the_server_over_http(
    server: RunningServer, tmp_path: Path
) -> None:
    """With bob's own key (leaked, say), a forgery verifies: the second version of seq 1 makes
    the client ask ``GET /v1/sync``, and the server's version is what the application gets."""
    bob_token, carol_token = await register(server, "bob"), await register(server, "carol")
    bob = client_for(server, "bob", bob_token, tmp_path)
    carol = client_for(server, "carol", carol_token, tmp_path)
    leaked = await bob.http.event_key(bob_token)
    assert leaked == event_key(server.services.settings.resolved_secret().encode(), "bob")
    async with started(bob, carol):
        events = bob.events()
        bob.feed("chat/user/bob", sign(leaked, forged(1, "forged with bob's key")))
        first = await asyncio.wait_for(anext(events), 15)
        assert isinstance(first, NewMessage) and first.content == "forged with bob's key"  # it verified

        ack = await asyncio.wait_for(carol.send(to_user="bob", content="the real one"), 15)
        second = await asyncio.wait_for(anext(events), 15)  # the server's version of seq 1, from HTTP
        assert isinstance(second, NewMessage)
        assert (second.seq, second.content, second.server_msg_id) == (1, "the real one", ack.server_msg_id)
        assert await quiet(events, 1.0) == []
        bob.feed("chat/user/bob", sign(leaked, forged(1, "forged again")))  # disputed again, refuted again
        assert await quiet(events, 1.0) == []


async def quiet_queue(queue: asyncio.Queue[object], seconds: float = 1.0) -> list[object]:
    await asyncio.sleep(seconds)
    got = []
    while not queue.empty():
        got.append(queue.get_nowait())
    return got
