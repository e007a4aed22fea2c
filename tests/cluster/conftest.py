"""What every cluster test starts from: one fresh PostgreSQL database that all its nodes share,
and a Redis of the test's own (so that it can kill it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.cluster import RedisProcess


@pytest.fixture
def database(postgres_url: str) -> str:
    """The nodes' shared database (tests/conftest.py makes it fresh and drops it after)."""
    return postgres_url


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
