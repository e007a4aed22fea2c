"""The sans-IO codec: any bytes give a command or a typed error, never anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqchat.core.errors import ChatError, InvalidCommand, InvalidJson, PayloadTooLarge, UnknownCommand
from mqchat.core.ids import DeviceAddress
from mqchat.core.protocol import (
    COMMANDS,
    MAX_CONTENT_CHARS,
    Ack,
    MessageAck,
    NewMessage,
    SendMessage,
    SyncMessages,
    SyncResponse,
    decode_event,
    encode_event,
    error_event,
    parse_command,
)
from mqchat.core.topics import may_publish, may_subscribe


def send(**fields: object) -> bytes:
    base = {"type": "send_message", "client_msg_id": "uuid-12345", "to_user": "bob", "content": "Hello Bob!"}
    return json.dumps({**base, **fields}).encode()


def test_parses_the_three_commands() -> None:
    assert parse_command(send()) == SendMessage(client_msg_id="uuid-12345", to_user="bob", content="Hello Bob!")
    assert parse_command(b'{"type":"sync_messages","since_seq":67800}') == SyncMessages(since_seq=67800, limit=100)
    assert parse_command(b'{"type":"ack","seq":67890}') == Ack(seq=67890)


@pytest.mark.parametrize(
    ("payload", "error", "ref"),
    [
        (b"not json", InvalidJson, None),
        (b"\xff\xfe", InvalidJson, None),
        (b"[1,2]", InvalidCommand, None),
        (b'{"type":"dance"}', UnknownCommand, None),
        (b'{"content":"x"}', UnknownCommand, None),
        (send(to_user="b/ob"), InvalidCommand, "uuid-12345"),
        (send(to_user="#"), InvalidCommand, "uuid-12345"),
        (send(content=""), InvalidCommand, "uuid-12345"),
        (send(content="x" * (MAX_CONTENT_CHARS + 1)), InvalidCommand, "uuid-12345"),
        (send(content="a\u0000b"), InvalidCommand, "uuid-12345"),
        (send(content="\ud800"), InvalidCommand, "uuid-12345"),
        (send(msg_type="sticker"), InvalidCommand, "uuid-12345"),
        (send(client_msg_id="x" * 65), InvalidCommand, None),
        (send(client_msg_id=""), InvalidCommand, ""),
        (b'{"type":"sync_messages","limit":501}', InvalidCommand, None),
        (b'{"type":"ack","seq":-1}', InvalidCommand, None),
        (b'{"type":"ack","seq":"7"}', InvalidCommand, None),
        (b"[" * 100_000, PayloadTooLarge, None),
        (b"[" * 50_000, InvalidJson, None),
    ],
)
def test_rejects_with_a_typed_error(payload: bytes, error: type[ChatError], ref: str | None) -> None:
    with pytest.raises(error) as caught:
        parse_command(payload)
    assert type(caught.value) is error
    assert caught.value.ref == ref


@given(st.binary(max_size=512))
def test_any_bytes_give_a_command_or_a_chat_error(payload: bytes) -> None:
    try:
        command = parse_command(payload)
    except ChatError as exc:
        assert exc.code and error_event(exc).code == exc.code
    else:
        assert type(command) in COMMANDS.values()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from(["type", "client_msg_id", "to_user", "content", "msg_type", "seq", "since_seq", "limit"]),
        json_values | st.sampled_from(list(COMMANDS)),
    )
)
def test_any_json_object_gives_a_command_or_a_chat_error(data: dict[str, object]) -> None:
    try:
        command = parse_command(json.dumps(data).encode())
    except ChatError:
        return
    assert command.type == data["type"]


@given(
    st.text(min_size=1, max_size=200).filter(lambda s: "\x00" not in s),
    st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s),
)
def test_valid_sends_round_trip(content: str, client_msg_id: str) -> None:
    command = parse_command(send(content=content, client_msg_id=client_msg_id))
    assert isinstance(command, SendMessage)
    assert (command.content, command.client_msg_id) == (content, client_msg_id)


def test_events_encode_and_decode() -> None:
    message = NewMessage(
        seq=17,
        server_msg_id=67890,
        client_msg_id="uuid-12345",
        from_user="alice",
        to_user="bob",
        content="Hello Bob!",
        msg_type="text",
        created_at="2026-01-15T10:30:00.000Z",
    )
    ack = MessageAck(client_msg_id="uuid-12345", server_msg_id=67890, seq=41, created_at=message.created_at)
    sync = SyncResponse(events=[message], latest_seq=17, has_more=False)
    for event in (message, ack, sync, error_event(InvalidCommand("bad", ref="r"))):
        assert decode_event(encode_event(event)) == event
    assert json.loads(encode_event(ack)) == {
        "type": "message_ack",
        "client_msg_id": "uuid-12345",
        "server_msg_id": 67890,
        "seq": 41,
        "status": "sent",
        "created_at": "2026-01-15T10:30:00.000Z",
        "duplicate": False,
    }


@pytest.mark.parametrize(
    "client_id",
    [
        "alice",
        "alice:",
        ":phone",
        "alice:ph/one",
        "al+ice:phone",
        "a:b:c",
        "alice:" + "x" * 65,
        "alice:ph one",
        "alice:#",
    ],
)
def test_malformed_client_ids_are_rejected(client_id: str) -> None:
    with pytest.raises(InvalidCommand):
        DeviceAddress.from_client_id(client_id)


def test_acl_is_exact() -> None:
    phone = DeviceAddress("alice", "phone")
    assert may_subscribe(phone, "chat/user/alice") and may_subscribe(phone, "chat/device/alice/phone")
    for topic in [
        "chat/user/bob",
        "chat/device/alice/laptop",
        "chat/user/+",
        "#",
        "chat/#",
        "chat/+/alice",
        "chat/in/alice/phone",
        "$SYS/#",
        "chat/user/alice/#",
    ]:
        assert not may_subscribe(phone, topic), topic
    assert may_publish(phone, "chat/in/alice/phone")
    assert not may_publish(phone, "chat/in/alice/laptop") and not may_publish(phone, "chat/user/bob")
