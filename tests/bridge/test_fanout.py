"""The fan-out encodes a message once for all its streams: byte for byte what encoding each gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqchat.bridge.fanout import _Encoded
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
