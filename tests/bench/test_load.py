"""The load generator's own arithmetic (no server)."""

from __future__ import annotations

from mqchat.bench.load import CLIENTS_PER_SOURCE, source_address


def test_clients_beyond_one_source_address_of_ports_connect_from_other_loopback_addresses() -> None:
    # Below the first 25,000 the kernel picks, so a HAProxy run can still match by source port.
    assert source_address(0, "127.0.0.1") is None
    assert source_address(CLIENTS_PER_SOURCE - 1, "127.0.0.1") is None
    assert source_address(CLIENTS_PER_SOURCE, "127.0.0.1") == ("127.0.0.2", 0)
    assert source_address(2 * CLIENTS_PER_SOURCE + 7, "127.0.0.1") == ("127.0.0.3", 0)
    # A remote server: the machine's own addresses are not ours to pick.
    assert source_address(3 * CLIENTS_PER_SOURCE, "10.1.2.3") is None
