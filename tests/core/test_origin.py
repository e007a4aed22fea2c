"""The event signature (core/origin.py): made by the server's key, refused for anything else."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from mqchat.core.origin import decode_key, encode_key, event_key, sign, verify

SECRET = b"server-secret"


def test_a_signed_event_verifies_and_loses_only_its_sig() -> None:
    key = event_key(SECRET, "bob")
    payload = json.dumps({"type": "new_message", "seq": 1, "content": "hi"}, separators=(",", ":")).encode()
    signed = sign(key, payload)
    assert json.loads(signed)["sig"]
    assert verify(key, signed) == payload


def test_another_users_key_or_a_changed_byte_does_not_verify() -> None:
    bob, carol = event_key(SECRET, "bob"), event_key(SECRET, "carol")
    signed = sign(carol, b'{"type":"new_message","seq":1}')
    assert verify(bob, signed) is None
    assert verify(carol, signed.replace(b'"seq":1', b'"seq":2')) is None
    assert verify(bob, b'{"type":"new_message","seq":1}') is None
    assert verify(bob, b'{"type":"new_message","seq":1,"sig":"forged"}') is None


def test_keys_differ_per_user_and_per_secret_and_survive_encoding() -> None:
    assert event_key(SECRET, "bob") != event_key(SECRET, "bobb")
    assert event_key(SECRET, "bob") != event_key(b"other", "bob")
    key = event_key(SECRET, "bob")
    assert decode_key(encode_key(key)) == key


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=20)), max_size=5))
def test_any_object_round_trips(fields: dict[str, object]) -> None:
    key = event_key(SECRET, "u")
    payload = json.dumps(fields).encode()
    assert verify(key, sign(key, payload)) == payload
