"""The per-stream copy of a message event (``with_seq``) is the event pydantic's copy makes, and
a message's entries (``MessageEntries``) read as the pairs of those copies."""

from __future__ import annotations

import pytest

from mqchat.bridge.store import MessageEntries, with_seq
from mqchat.core.protocol import Attachment, NewMessage, encode_event


def _event() -> NewMessage:
    return NewMessage(
        seq=3,
        server_msg_id=41,
        client_msg_id="c-1",
        from_user="alice",
        group_id="g1",
        content="hello",
        msg_type="image",
        created_at="2026-11-30T03:00:00.000Z",
        attachment=Attachment(id="f1", name="a.png", size=3, content_type="image/png"),
    )


def test_with_seq_is_the_event_with_another_seq() -> None:
    event = _event()
    copy = with_seq(event, 9)
    assert copy == event.model_copy(update={"seq": 9})
    assert encode_event(copy) == encode_event(event.model_copy(update={"seq": 9}))
    assert copy.model_fields_set == event.model_copy(update={"seq": 9}).model_fields_set
    assert (event.seq, copy.seq) == (3, 9)  # the original is untouched


def test_copies_do_not_share_their_seq() -> None:
    event = _event()
    copies = [with_seq(event, seq) for seq in (5, 6, 7)]
    assert [c.seq for c in copies] == [5, 6, 7]
    assert NewMessage.model_validate_json(encode_event(copies[1])).seq == 6


def test_the_event_has_nothing_the_copy_leaves_out() -> None:
    """``with_seq`` sets no extra fields and no private attributes: the model must have none."""
    assert NewMessage.model_config.get("extra") != "allow"
    assert not NewMessage.__private_attributes__
    event = _event()
    copy = with_seq(event, 4)
    assert copy.model_fields_set is not event.model_fields_set


def test_a_message_s_entries_read_as_one_event_per_stream() -> None:
    event = _event()
    entries = MessageEntries(event, ["alice", "bob", "cat"], [3, 10, 7])
    expected = [(user, event.model_copy(update={"seq": seq})) for user, seq in (("alice", 3), ("bob", 10), ("cat", 7))]
    assert len(entries) == 3
    assert list(entries) == expected
    assert entries[1] == expected[1] and entries[-1] == expected[2]
    assert list(entries[1:]) == expected[1:]
    assert isinstance(entries[1:], MessageEntries)
    with pytest.raises(IndexError):
        entries[3]


def test_entries_need_one_seq_per_stream() -> None:
    with pytest.raises(ValueError):
        MessageEntries(_event(), ["alice", "bob"], [1])
