"""The ``server_process`` fixture: ``mqchat serve`` in a subprocess (SQLite or PostgreSQL).

Tests whose client processes exit, crash or cut their connections use it rather than the
in-process server: amqtt 0.12.1 leaks the server side of a connection reset by its peer
(``StreamWriterAdapter.close`` awaits ``drain()`` before ``close()``), and in-process that
leak surfaces as a ResourceWarning in whichever test happens to collect it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess


@pytest.fixture
async def server_process(tmp_path: Path, database_url: str) -> AsyncIterator[ServerProcess]:
    running = ServerProcess(tmp_path / "server", database_url)
    await running.start()
    try:
        yield running
    finally:
        await running.kill()
