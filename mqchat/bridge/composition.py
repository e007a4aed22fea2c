"""The composition root: builds the store, accounts and chat service, and closes them in order.

The broker plugin and the FastAPI app both receive the one ``Services`` made here;
nothing creates engines or clients at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mqchat.bridge.auth import Accounts, EventKeys, TokenIssuer
from mqchat.bridge.chat import ChatService
from mqchat.bridge.health import HealthMonitor
from mqchat.bridge.metrics import Metrics
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.store import MessageStore
from mqchat.config import Settings

log = logging.getLogger(__name__)

WAIT_FIRST_SECONDS = 0.5
WAIT_MAX_SECONDS = 10.0
"""Backoff of ``mqchat serve`` waiting for its database at start: doubling, up to this."""


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: MessageStore
    accounts: Accounts
    chat: ChatService
    event_keys: EventKeys
    metrics: Metrics
    health: HealthMonitor

    @property
    def tokens(self) -> TokenIssuer:
        return self.accounts.tokens


async def wait_for_database(store: SqlStore) -> None:
    """Return once the database answers; until then log each failed attempt and back off."""
    delay = WAIT_FIRST_SECONDS
    attempt = 1
    while (why := await store.unreachable()) is not None:
        log.warning("waiting for the database (attempt %d): %s; next try in %g s", attempt, why, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, WAIT_MAX_SECONDS)
        attempt += 1
    if attempt > 1:
        log.warning("the database answers after %d attempts: starting", attempt)


@asynccontextmanager
async def build_services(settings: Settings, *, serving: bool = False) -> AsyncIterator[Services]:
    """``serving`` (``mqchat serve``): wait for a database that does not answer yet rather than
    fail, and check its health in the background (one-shot commands do neither)."""
    settings.prepare_data_dir()
    node_id = settings.resolved_node_id()
    metrics = Metrics(node_id)
    sql = SqlStore.from_url(
        settings.resolved_database_url(), statement_timeout=settings.database.statement_timeout_seconds
    )
    store: MessageStore = sql
    try:
        if serving:
            await wait_for_database(sql)
        # Pending migrations are applied under a database lock, so nodes starting together
        # are safe; a schema newer than this code is refused (SchemaError).
        await sql.migrate(apply=settings.database.auto_migrate)
        secret = settings.resolved_secret()
        tokens = TokenIssuer(secret, settings.auth.token_ttl_seconds)
        event_keys = EventKeys(secret)
        limits = settings.limits
        chat = ChatService(
            store,
            settings.bridge,
            max_payload_bytes=settings.mqtt.max_payload_bytes,
            limits=limits,
            event_keys=event_keys,
            metrics=metrics,
        )
        health = HealthMonitor(store, node_id, settings.database.health_timeout_seconds, metrics)
        await chat.start()
        if serving:
            health.start()
        try:
            yield Services(settings, store, Accounts(store, tokens, settings.auth), chat, event_keys, metrics, health)
        finally:
            await health.stop()
            await chat.stop()
    finally:
        await store.close()
