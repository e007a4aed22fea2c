"""The fan-out encodes a message once for all its streams: byte for byte what encoding each gives."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from mqchat.bridge.fanout import Fanout, _Encoded
from mqchat.bridge.notify import StreamNotifier
from mqchat.bridge.store import Emitted, MessageEntries
from mqchat.core.protocol import Attachment, NewMessage, encode_event

texts = st.text(max_size=30)
messages = st.builds(
    NewMessage,
    seq=st.integers(1, 2**40),
    server_msg_id=st.integers(1, 2**40),
    client_msg_id=st.text(min_size=1, max_size=10),
    from_user=st.just("alice"),
    to_user=st.one_of(st.none(), st.just("bob")),
    group_id=st.one_of(st.none(), st.just("g1")),
    content=st.one_of(st.none(), texts),
    msg_type=st.sampled_from(["text", "image", "video", "file"]),
    created_at=st.just("2026-01-01T00:00:00.000Z"),
    recalled_at=st.one_of(st.none(), st.just("2026-01-01T00:01:00.000Z")),
    attachment=st.one_of(
        st.none(),
        st.builds(Attachment, id=st.just("f1"), name=texts, size=st.integers(0, 99), content_type=st.just("image/png")),
    ),
)


@given(messages, st.lists(st.integers(1, 2**40), min_size=1, max_size=5))
def test_a_message_in_many_streams_encodes_as_each_would_alone(message: NewMessage, seqs: list[int]) -> None:
    encoded = _Encoded()
    for seq in [message.seq, *seqs]:
        copy = message.model_copy(update={"seq": seq})
        assert encoded(copy) == encode_event(copy)


@given(messages, st.lists(st.integers(1, 2**40), min_size=1, max_size=5))
def test_a_message_s_entries_encode_as_each_event_would(message: NewMessage, seqs: list[int]) -> None:
    """The fan-out's path for ``MessageEntries`` (no event per stream) sends what encoding
    each stream's own event sends."""
    users = [f"u{i}" for i in range(len(seqs))]
    entries = MessageEntries(message, users, seqs)
    sent = _delivered(entries)
    assert sent == [
        (f"chat/user/{user}", encode_event(message.model_copy(update={"seq": seq})))
        for user, seq in zip(users, seqs, strict=True)
    ]
    assert _delivered(tuple(entries)) == sent  # the same entries as plain pairs


def _delivered(*chunks: Emitted) -> list[tuple[str, bytes]]:
    sent: list[tuple[str, bytes]] = []

    class Broker:
        async def publish(self, topic: str, payload: bytes) -> None:
            raise AssertionError("stream events are delivered, not published")

        def deliver(self, topic: str, payload: bytes, users: frozenset[str] | None = None) -> int:
            sent.append((topic, payload))
            return 1

    fanout = Fanout(StreamNotifier(), None, None)
    fanout.attach(Broker(), None)
    asyncio.run(fanout.stream_events(*chunks))
    return sent
