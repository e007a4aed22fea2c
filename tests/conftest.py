"""Fixtures: a real server on ephemeral ports, over SQLite and over the machine's PostgreSQL.

PostgreSQL tests use ``MQCHAT_TEST_POSTGRES_URL`` (default: the local server's
``test`` database) and a fresh database per test. When it cannot be reached they
skip, unless ``MQCHAT_REQUIRE_SERVICES=1`` (set by .ci/run), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from mqchat.config import Settings
from mqchat.runner import RunningServer, run_server

# The suite shares 2 cores with servers under load: wall-clock deadlines would only add flakes.
hypothesis_settings.register_profile("mqchat", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("mqchat")

# The suite registers many users from 127.0.0.1, in this process and in the servers it starts:
# the per-address registration limit (10 an hour by default) is tested on its own.
os.environ.setdefault("MQCHAT_AUTH__REGISTRATIONS_PER_IP_PER_HOUR", "1000000")

PG_URL = os.environ.get("MQCHAT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("MQCHAT_REQUIRE_SERVICES") == "1"


def _service_missing(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (MQCHAT_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(reason)


async def _fresh_pg_database() -> tuple[str, str]:
    """Create an empty database; return its SQLAlchemy URL and its name."""
    admin_dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = f"mqchat_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(admin_dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _service_missing(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}", name


async def _drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"
        return
    url, name = await _fresh_pg_database()
    try:
        yield url
    finally:
        await _drop_pg_database(name)


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database of its own (its SQLAlchemy URL), dropped afterwards."""
    url, name = await _fresh_pg_database()
    try:
        yield url
    finally:
        await _drop_pg_database(name)


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
