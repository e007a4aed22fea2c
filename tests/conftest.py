"""Fixtures: a real server on ephemeral ports, over SQLite and over the machine's PostgreSQL.

PostgreSQL tests use ``MQCHAT_TEST_POSTGRES_URL`` (default: the local server's
``test`` database) and a fresh database per test. When it cannot be reached they
skip, unless ``MQCHAT_REQUIRE_SERVICES=1`` (set by .ci/run), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from mqchat.config import Settings
from mqchat.runner import RunningServer, run_server
from tests.support import postgres
from tests.support.logthrottles import reset_log_throttles

pytest_plugins = ["tests.support.browser"]

# The suite shares 2 cores with servers under load: wall-clock deadlines would only add flakes.
hypothesis_settings.register_profile("mqchat", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("mqchat")

# The suite registers many users from 127.0.0.1, in this process and in the servers it starts:
# the per-address registration limit (10 an hour by default) is tested on its own.
os.environ.setdefault("MQCHAT_AUTH__REGISTRATIONS_PER_IP_PER_HOUR", "1000000")

PG_URL = postgres.PG_URL


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"
        return
    url, name = await postgres.fresh_database()
    try:
        yield url
    finally:
        await postgres.drop_database(name)


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database of its own (its SQLAlchemy URL), dropped afterwards."""
    url, name = await postgres.fresh_database()
    try:
        yield url
    finally:
        await postgres.drop_database(name)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings.load(
        None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
    )


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with run_server(settings) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_log_throttles() -> None:
    """In-process servers share the log throttles: each test starts with none spent."""
    reset_log_throttles()
