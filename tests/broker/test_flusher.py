"""What connections queue in one turn of the event loop goes out in one write each, from one
callback for all of them (``Flusher``), and one transport's failure holds no other back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from mqchat.broker.connection import Flusher, MqttConnection
from mqchat.config import LimitsSettings


class _Writer:
    def __init__(self, fail_first: bool = False) -> None:
        self.writes: list[bytes] = []
        self._fail = fail_first

    def write(self, data: bytes) -> None:
        if self._fail:
            self._fail = False
            raise RuntimeError("transport broke")
        self.writes.append(data)

    def buffered(self) -> int:
        return 0

    def close(self, *, abort: bool) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Broker:
    """The part of ``MqttServer`` a connection uses to send."""

    def __init__(self) -> None:
        self.flusher = Flusher()

    def connection_lost(self, connection: MqttConnection) -> None:
        pass


@pytest.fixture
def connected() -> Iterator[Any]:
    opened: list[MqttConnection] = []

    def connect(broker: _Broker, writer: _Writer) -> MqttConnection:
        connection = MqttConnection(broker, LimitsSettings(), "test")  # type: ignore[arg-type]
        connection.attach(writer, None)
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        connection.connection_lost(None)  # ends its connect watchdog


async def test_one_write_per_connection_per_turn(connected: Any) -> None:
    broker, first, second = _Broker(), _Writer(), _Writer()
    a, b = connected(broker, first), connected(broker, second)
    a.send(b"1")
    b.send(b"x")
    a.send(b"2")
    assert first.writes == second.writes == []  # nothing is written before the turn ends
    await asyncio.sleep(0)
    assert (first.writes, second.writes) == ([b"12"], [b"x"])
    b.send(b"y")
    await asyncio.sleep(0)
    assert (first.writes, second.writes) == ([b"12"], [b"x", b"y"])


async def test_a_failed_write_holds_back_no_other_connection(connected: Any, caplog: pytest.LogCaptureFixture) -> None:
    broker, broken, fine = _Broker(), _Writer(fail_first=True), _Writer()
    a, b = connected(broker, broken), connected(broker, fine)
    a.send(b"lost")
    b.send(b"x")
    with caplog.at_level(logging.ERROR, logger="mqchat.broker.connection"):
        await asyncio.sleep(0)
    assert fine.writes == [b"x"]
    assert "writing to" in caplog.text and "transport broke" in caplog.text
    a.send(b"next")  # the connection is queued again on its next send
    await asyncio.sleep(0)
    assert broken.writes == [b"next"]


async def test_a_connection_closed_with_bytes_queued_writes_them_once(connected: Any) -> None:
    broker, writer = _Broker(), _Writer()
    a = connected(broker, writer)
    a.send(b"bye")
    a.close()  # a graceful close writes what is queued first
    await asyncio.sleep(0)
    assert writer.writes == [b"bye"]
