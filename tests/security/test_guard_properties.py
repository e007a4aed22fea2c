"""The packet guard's pure checks: any input gives an answer or a ``PacketRefused``, nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqchat.broker.guard import PacketRefused, check_fixed_header, connect_version
from tests.security.raw import connect


@given(st.integers(0, 255), st.integers(0, 2**28), st.integers(1024, 2**20))
def test_any_fixed_header_is_accepted_or_refused(first: int, length: int, limit: int) -> None:
    try:
        check_fixed_header(first, length, limit)
    except PacketRefused:
        return
    assert length <= limit and first >> 4 in (1, 3, 4, 5, 6, 7, 8, 10, 12, 14)


@given(st.binary(max_size=200))
def test_any_connect_body_is_read_or_refused(body: bytes) -> None:
    try:
        name, level, client_id = connect_version(body)
    except PacketRefused:
        return
    assert isinstance(name, str) and 0 <= level <= 255 and len(client_id) <= 128


def test_the_versions_are_read_right() -> None:
    def body(packet: bytes) -> bytes:
        return packet[2:]  # these packets have a one-byte remaining length

    assert connect_version(body(connect("alice:phone", "alice", "t"))) == ("MQTT", 4, "alice:phone")
    assert connect_version(body(connect("a:b", level=5)))[:2] == ("MQTT", 5)
    assert connect_version(body(connect("a:b", name="MQIsdp", level=3)))[:2] == ("MQIsdp", 3)
