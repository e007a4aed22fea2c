"""A fresh PostgreSQL database per test, on the machine's server (``MQCHAT_TEST_POSTGRES_URL``)."""

from __future__ import annotations

import os
import uuid

import asyncpg

from tests.support.services import service_missing

PG_URL = os.environ.get("MQCHAT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
_ADMIN_DSN = PG_URL.replace("postgresql+asyncpg://", "postgresql://")


async def fresh_database() -> tuple[str, str]:
    """Create an empty database; return its SQLAlchemy URL and its name."""
    name = f"mqchat_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}", name


async def require_server() -> None:
    """Skip (fail under ``MQCHAT_REQUIRE_SERVICES=1``) when the server is unreachable: for tests
    that hand ``PG_URL`` to a process that creates its own databases (``mqchat bench``)."""
    try:
        conn = await asyncpg.connect(_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    await conn.close()


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
