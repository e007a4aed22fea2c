"""Values that check themselves: conversation ids in their one wire form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqchat.core.errors import InvalidCommand
from mqchat.core.ids import ID_PATTERN, ConversationId, is_valid_id

ids = st.from_regex(f"\\A{ID_PATTERN}\\Z")
kinds = st.sampled_from(["user", "group"])


@given(kinds, ids)
def test_the_string_form_parses_back_to_the_same_value(kind: str, ident: str) -> None:
    conversation = ConversationId.parse(f"{kind}:{ident}")
    assert (conversation.kind, conversation.id) == (kind, ident)
    assert str(conversation) == f"{kind}:{ident}"
    assert ConversationId.parse(str(conversation)) == conversation
    assert conversation.group_id == (ident if kind == "group" else None)


@given(st.text(max_size=80))
def test_parse_takes_exactly_the_two_forms(value: str) -> None:
    kind, sep, ident = value.partition(":")
    well_formed = bool(sep) and kind in ("user", "group") and is_valid_id(ident)
    try:
        parsed = ConversationId.parse(value)
    except InvalidCommand as exc:
        assert not well_formed
        assert exc.message == "conversation_id must be 'user:{user_id}' or 'group:{group_id}'"
    else:
        assert well_formed and str(parsed) == value


@pytest.mark.parametrize(
    "value", ["", "bob", "user", "user:", "group:", "users:bob", "User:bob", "user:b/c", "user:bob:x", "group:g#1"]
)
def test_malformed_conversation_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidCommand):
        ConversationId.parse(value)


@pytest.mark.parametrize(("kind", "ident"), [("user", ""), ("group", "a+b"), ("channel", "bob"), ("user", "x" * 65)])
def test_the_constructor_checks_too(kind: str, ident: str) -> None:
    with pytest.raises(InvalidCommand):
        ConversationId(kind, ident)  # type: ignore[arg-type]


@given(ids, ids, ids)
def test_a_direct_message_is_the_other_party_on_each_side(sender: str, recipient: str, third: str) -> None:
    def view(viewer: str) -> ConversationId:
        return ConversationId.for_viewer(viewer, sender=sender, to_user=recipient, group_id=None)

    assert view(sender) == ConversationId.user(recipient) == ConversationId.addressed(recipient, None)
    if recipient != sender:
        assert view(recipient) == ConversationId.user(sender)
        # What a receipt of the recipient's tells the sender: the conversation as the sender sees it.
        assert view(recipient).for_peer(recipient) == view(sender)
        assert view(sender).for_peer(sender) == view(recipient)
    else:
        assert view(sender) == ConversationId.user(sender)  # a note to self
    if third not in (sender, recipient):
        assert view(third) == ConversationId.user(sender)


@given(ids, ids, ids)
def test_a_group_message_is_the_group_for_everyone(sender: str, viewer: str, group: str) -> None:
    seen = ConversationId.for_viewer(viewer, sender=sender, to_user=None, group_id=group)
    assert seen == ConversationId.group(group) == ConversationId.addressed(None, group)
    assert seen.for_peer(viewer) == seen
    assert str(seen) == f"group:{group}"


def test_a_message_addressed_to_nobody_is_refused() -> None:
    with pytest.raises(InvalidCommand):
        ConversationId.addressed(None, None)


def test_values_are_hashable_and_compare_by_content() -> None:
    assert {ConversationId.user("bob"), ConversationId("user", "bob")} == {ConversationId.parse("user:bob")}
    assert ConversationId.user("bob") != ConversationId.group("bob")
